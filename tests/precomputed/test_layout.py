"""Issue 21: embedding folders in the LAION / clip-retrieval layout: pairing, checks that name
the file, rows read by byte range (local memory map, ranged reads on loopback S3), matches
resolved to rows and joined on URL."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline.core import io
from pipeline.core.config import CONF_DIR, build, to_dict
from pipeline.demo.embedding_folder import make_folder, npy_bytes
from pipeline.precomputed.config import PrecomputedConfig
from pipeline.precomputed.gather import (
    best_joins,
    gather_file,
    join_on_url,
    resolve_by_source,
    unit_rows,
)
from pipeline.precomputed.layout import open_folder, read_metadata
from pipeline.precomputed.reader import parse_npy_header, read_all, read_rows, row_runs


def test_yaml_defaults_agree_with_the_dataclass():
    raw = yaml.safe_load((CONF_DIR / "stages" / "precomputed.yaml").read_text())
    assert to_dict(build(PrecomputedConfig, raw)) == to_dict(PrecomputedConfig())


def test_pairs_by_number_leading_zeros_and_mixed_dtypes(tmp_path):
    root = str(tmp_path / "f")
    # Numbers 2, 10, 7: numeric order, whatever the padding; metadata padded differently.
    made = make_folder(root, sizes=(30, 50, 20), names=[2, 10, 7], digits=1)
    for n in (2, 7, 10):  # re-pad the metadata names: pairs go by number, not by name
        os.rename(
            f"{root}/metadata/metadata_{n}.parquet", f"{root}/metadata/metadata_{n:06d}.parquet"
        )
    folder = open_folder(root)
    assert [f.number for f in folder.files] == [2, 7, 10]
    assert [f.rows for f in folder.files] == [30, 20, 50]
    assert [f.header.dtype for f in folder.files] == ["<f2", "<f2", "<f4"]
    assert folder.rows == 100 and folder.dim == 16
    assert folder.files[1].meta.endswith("metadata_000007.parquet")
    # Global ids follow the folder order; locate inverts them.
    pos, rows = folder.locate(np.array([0, 29, 30, 49, 50, 99]))
    assert pos.tolist() == [0, 0, 1, 1, 2, 2] and rows.tolist() == [0, 29, 0, 19, 0, 49]
    want = np.concatenate([made["vectors"][:30], made["vectors"][80:], made["vectors"][30:80]])
    got = np.concatenate([read_all(f.emb, f.header).astype(np.float32) for f in folder.files])
    np.testing.assert_array_equal(got, want)


def _expect_error(root, match, **cfg):
    with pytest.raises(io.InputError, match=match):
        open_folder(root, PrecomputedConfig(**cfg) if cfg else None)


def test_bad_folders_name_the_file(tmp_path):
    root = str(tmp_path / "f")
    make_folder(root, sizes=(10, 12, 14))
    open_folder(root)
    # A metadata file with one row too many.
    good = io.read_parquet(f"{root}/metadata/metadata_0001.parquet")
    extra = pa.concat_tables([good, good.slice(0, 1)])
    io.write_parquet(extra, f"{root}/metadata/metadata_0001.parquet")
    _expect_error(root, r"metadata_0001.parquet has 13 rows but .*img_emb_0001.npy has 12")
    io.write_parquet(good, f"{root}/metadata/metadata_0001.parquet")
    # A missing metadata file, then a missing embedding file.
    os.rename(f"{root}/metadata/metadata_0002.parquet", f"{tmp_path}/m2")
    _expect_error(root, r"img_emb_0002.npy has no metadata file numbered 2")
    os.rename(f"{tmp_path}/m2", f"{root}/metadata/metadata_0002.parquet")
    os.rename(f"{root}/img_emb/img_emb_0000.npy", f"{tmp_path}/e0")
    _expect_error(root, r"metadata_0000.parquet has no embedding file numbered 0")
    os.rename(f"{tmp_path}/e0", f"{root}/img_emb/img_emb_0000.npy")
    # Mismatched dimensions.
    io.write_bytes(f"{root}/img_emb/img_emb_0002.npy", npy_bytes(np.ones((14, 8), np.float16)))
    _expect_error(root, r"img_emb_0002.npy has dimension 8 but .*img_emb_0000.npy has 16")
    # A truncated file, a 3-D array, integers, Fortran order, not .npy at all.
    full = npy_bytes(np.ones((14, 16), np.float32))
    io.write_bytes(f"{root}/img_emb/img_emb_0002.npy", full[:-10])
    _expect_error(root, r"img_emb_0002.npy: .* bytes but its header says 14 x 16 <f4")
    for bad, match in [
        (npy_bytes(np.ones((14, 4, 4), np.float32)), "must be 2-D"),
        (npy_bytes(np.ones((14, 16), np.int8)), "must be floating point"),
        (npy_bytes(np.asfortranarray(np.ones((14, 16), np.float32))), "Fortran-ordered"),
        (b"PK\x03\x04 a zip file, not npy", "not a .npy file"),
    ]:
        io.write_bytes(f"{root}/img_emb/img_emb_0002.npy", bad)
        _expect_error(root, r"img_emb_0002.npy: .*" + match)
    io.write_bytes(f"{root}/img_emb/img_emb_0002.npy", full)
    open_folder(root)
    # Two files with one number; a metadata file without a URL column; no files at all.
    io.write_bytes(f"{root}/img_emb/img_emb_02.npy", full)
    _expect_error(root, r"img_emb_0002.npy and .*img_emb_02.npy carry the same number 2")
    os.remove(f"{root}/img_emb/img_emb_02.npy")
    _expect_error(root, r"metadata_0000.parquet: no URL column", url_columns=("link",))
    _expect_error(root, r"no files match 'emb/\*.npy'", emb_glob="emb/*.npy")
    # Every problem is listed in one error.
    os.remove(f"{root}/metadata/metadata_0000.parquet")
    io.write_bytes(f"{root}/img_emb/img_emb_0002.npy", full[:-4])
    with pytest.raises(io.InputError) as e:
        open_folder(root)
    assert "img_emb_0000.npy has no metadata" in str(e.value) and "img_emb_0002.npy" in str(e.value)


def test_header_longer_than_the_first_read():
    x = np.ones((3, 4), np.float32)
    head = npy_bytes(x)
    h = parse_npy_header(head, "x.npy")
    assert (h.rows, h.dim, h.dtype, h.offset) == (3, 4, "<f4", 128)
    assert parse_npy_header(head[:20], "x.npy") == 128  # too short: the bytes it needs


def test_row_runs_merge_close_rows():
    rows = np.array([1, 2, 3, 10, 11, 40])
    assert row_runs(rows, 0).tolist() == [[1, 4], [10, 12], [40, 41]]
    assert row_runs(rows, 6).tolist() == [[1, 12], [40, 41]]
    assert row_runs(rows, 100).tolist() == [[1, 41]]
    assert row_runs(np.array([], np.int64), 5).shape == (0, 2)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_rows_by_range_equal_the_files(tmp_path, where, request):
    root = (
        str(tmp_path / "f")
        if where == "local"
        else io.join(request.getfixturevalue("s3_bucket"), "f")
    )
    made = make_folder(root, sizes=(400, 300), dtypes=("float32", "float16"))
    folder = open_folder(root)
    rng = np.random.default_rng(1)
    for f in folder.files:
        want = made["vectors"][f.first : f.first + f.rows]
        rows = rng.integers(0, f.rows, 60)  # unsorted, with repeats
        rows[:3] = [f.rows - 1, 0, 0]
        for gap in (0, 2, 1000):
            counters: dict = {}
            got = read_rows(f.emb, f.header, rows, gap * f.header.row_bytes, counters)
            assert got.dtype == np.dtype(f.header.dtype)
            np.testing.assert_array_equal(got.astype(np.float32), want[rows])
            uniq = np.unique(rows)
            if where == "s3":
                assert counters["requests"] == len(row_runs(uniq, gap))
                assert counters["bytes"] >= len(uniq) * f.header.row_bytes
                # Ranged reads fetch less than the file's rows, until the gap spans them all.
                assert (counters["bytes"] < f.rows * f.header.row_bytes) == (gap < 1000)
        np.testing.assert_array_equal(read_all(f.emb, f.header).astype(np.float32), want)
        with pytest.raises(io.InputError, match=r"row .* outside the file's"):
            read_rows(f.emb, f.header, np.array([f.rows]))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_metadata_rows_across_row_groups(tmp_path, where, request):
    root = (
        str(tmp_path / "f")
        if where == "local"
        else io.join(request.getfixturevalue("s3_bucket"), "f")
    )
    made = make_folder(root, sizes=(250,), row_group_size=40)
    f = open_folder(root).files[0]
    rows = np.array([249, 3, 41, 41, 120, 0])
    got = read_metadata(f, ["url", "caption"], rows)
    assert got.column("url").to_pylist() == [made["urls"][r] for r in rows]
    assert got.column("caption").to_pylist() == [made["captions"][r] for r in rows]
    assert read_metadata(f, ["url"]).num_rows == 250


def test_unit_rows_flag_unusable_vectors():
    x = np.array([[3, 4], [0, 0], [np.nan, 1], [np.inf, 0], [1, 0]], np.float16)
    u, ok = unit_rows(x)
    assert ok.tolist() == [True, False, False, False, True]
    np.testing.assert_allclose(u[0], [0.6, 0.8], rtol=1e-6)
    assert not u[1:4].any()


def test_resolve_by_source_and_url_join(tmp_path):
    root = str(tmp_path / "f")
    made = make_folder(root, sizes=(20, 30))
    folder = open_folder(root)
    meta0, meta1 = made["meta"]
    matches = pa.table(
        {
            "url": ["u"] * 6,
            "source_file": [
                meta1,
                meta0,
                None,
                "/elsewhere/metadata_0001.parquet",
                "/x/other.parquet",
                meta0,
            ],
            "source_row": pa.array([29, 0, 5, 3, 1, 20], pa.int64()),
        }
    )
    pos, rows, why = resolve_by_source(matches, folder)
    # A copy of the metadata elsewhere resolves by its file name; row 20 is past file 0's end.
    assert pos.tolist() == [1, 0, -1, 1, -1, -1] and rows.tolist() == [29, 0, -1, 3, -1, -1]
    assert why == {"no_source": 1, "file_not_in_folder": 1, "row_out_of_range": 1}
    pos, _, why = resolve_by_source(matches.drop_columns(["source_file", "source_row"]), folder)
    assert (pos == -1).all() and why == {"no_source": 6}

    # URL join: the row whose (url, caption) gives the uid wins over an earlier URL-only row.
    meta_urls = pa.array(["a", "b", "a", "c", None, "a"])
    caps = pa.array(["x", "y", "z", "w", "v", "z"])
    want_urls = ["a", "a", "c", "nope", "b"]
    want_uids = [io.make_uid("a", "z"), io.make_uid("a", "other"), io.make_uid("c", "w"), "u", "u"]
    idx, r, exact = join_on_url(meta_urls, caps, want_urls, want_uids)
    assert idx.tolist() == [0, 1, 2, 4] and r.tolist() == [2, 0, 3, 1]
    assert exact.tolist() == [True, False, True, False]
    # Across files: exact first, then folder order.
    found = [
        (1, np.array([0, 1]), np.array([7, 2]), np.array([True, False])),
        (0, np.array([0, 1, 2]), np.array([5, 9, 1]), np.array([False, False, True])),
    ]
    p, r, ex = best_joins(4, found)
    assert p.tolist() == [1, 0, 0, -1] and r.tolist() == [7, 9, 1, -1]
    assert ex.tolist() == [True, False, True, False]


def test_gather_file_checks_urls(tmp_path):
    root = str(tmp_path / "f")
    made = make_folder(root, sizes=(50,), dtypes=("float16",))
    f = open_folder(root).files[0]
    rows = np.array([4, 40, 4])
    urls = [made["urls"][4], "http://wrong.test/x.jpg", made["urls"][4]]
    feats, ok, agree = gather_file(f, rows, urls, gap_bytes=128)
    want = made["vectors"][rows]
    np.testing.assert_allclose(feats, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6)
    assert ok.all() and agree.tolist() == [True, False, True]
