"""Issue 9: every case of the hostile-input catalogue (:mod:`tests.hostile.cases`) through the
real code of its stage, each checked against its one expected outcome; a Spark run, a download
and an embedding run are shared by the cases of their stage."""

from __future__ import annotations

import io as _io
import os
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.core.config import ConfigError
from tests.hostile.cases import CASES, CLASSES, STAGES, cases_of, laion_rows, tar_bytes
from tests.hostile.model import (
    HostileCase,
    Outcome,
    verify,
)


def _files_outside(root: str, allowed: list[str]) -> list[str]:
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if not any(p.startswith(a + os.sep) for a in allowed):
                out.append(p)
    return out


def run_filter_footer(case: HostileCase, tmp_path) -> tuple[Outcome, str]:
    from pipeline.text_filter.config import TextFilterConfig
    from pipeline.text_filter.plan import check_inputs

    path = str(tmp_path / f"{case.name}.parquet")
    case.build_input(path)
    try:
        good, bad, _ = check_inputs([path], TextFilterConfig())
    except io.InputError as e:
        return Outcome("error", str(e), e), path
    return Outcome("accepted", detail={"good": good, "bad": bad}), path


def run_filter_core(case: HostileCase) -> Outcome:
    from pipeline.text_filter.batch import filter_batch, resolve_columns
    from pipeline.text_filter.config import TextFilterConfig
    from pipeline.text_filter.matcher import Matcher

    cfg = TextFilterConfig()
    batch = case.build_input()
    cols = resolve_columns(batch.schema, cfg.columns, case.name)
    stats: Counter = Counter()
    out = filter_batch(batch, cols, Matcher(CLASSES, {}), cfg, CLASSES, stats)
    assert stats["rows_scanned"] == batch.num_rows
    if out.num_rows:
        return Outcome("accepted", detail=out.to_pylist()[0])
    drops = {k[len("dropped_") :]: v for k, v in stats.items() if k.startswith("dropped_") and v}
    assert len(drops) == 1, stats
    ((reason, n),) = drops.items()
    return Outcome("counted", reason, detail={"count": n})


def run_dataset_yaml(case: HostileCase, tmp_path) -> tuple[Outcome, str]:
    from pipeline.core.config import load_dataset

    path = str(tmp_path / f"{case.name}.yaml")
    case.build_input(path)
    try:
        spec = load_dataset(path)
    except ConfigError as e:
        return Outcome("error", str(e), e), path
    return Outcome("accepted", detail={"spec": spec}), path


def run_url_check(case: HostileCase) -> Outcome:
    from pipeline.download.urlcheck import check_url, check_urls

    url = case.build_input()
    reason = check_url(url)
    assert check_urls([url]) == [reason]  # the vectorised path agrees
    return Outcome("accepted") if reason is None else Outcome("counted", reason)


def run_checkpoint(case: HostileCase, tmp_path, tiny_model_name) -> tuple[Outcome, str]:
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.model import load_model

    path = str(tmp_path / f"{case.name}.pt")
    case.build_input(path)
    cfg = EmbedConfig(model=tiny_model_name, pretrained="", checkpoint=path, device="cpu")
    try:
        load_model(cfg)
    except io.InputError as e:
        return Outcome("error", str(e), e, {"input": path}), path
    return Outcome("accepted", detail={"input": path}), path


def run_materialise_case(case: HostileCase, tmp_path) -> Outcome:
    from pipeline.materialise import run_materialise

    work = tmp_path / "a" / "b" / "c"  # room for ../../.. to land inside tmp_path
    (work / "shards").mkdir(parents=True)
    members, kept, fmt = case.build_input()
    (work / "shards" / "00000.tar").write_bytes(tar_bytes(members))
    dec = str(work / "dec")
    E.write_decision(
        dec,
        pa.table(
            {
                "uid": kept,
                "label": pa.array([1] * len(kept), pa.int32()),
                "score": pa.array([0.5] * len(kept), pa.float32()),
                "kept": [True] * len(kept),
                "reason": ["kept"] * len(kept),
            }
        ),
        {"pool": "unused", "filter": "test"},
        {},
    )
    out = str(work / "out")
    stats = run_materialise(dec, str(work / "shards"), out, fmt)
    paths = io.read_parquet(io.join(out, "manifest.parquet")).column("path").to_pylist()
    detail = {
        "paths": paths,
        "stats": stats,
        "escaped": _files_outside(str(tmp_path), [str(work / d) for d in ("shards", "dec", "out")]),
    }
    for p in paths:  # what the manifest names is really there
        assert os.path.exists(os.path.join(out, p.split("/")[0]))
    if stats["skipped"]:
        ((reason, n),) = stats["skipped"].items()
        return Outcome("counted", reason, detail={**detail, "count": n})
    return Outcome("accepted", detail=detail)


@pytest.fixture(scope="module")
def spark_filter_run(tmp_path_factory, spark):
    """One text-filter run (local Spark, ``skip_bad_files``) over every ``filter-spark`` input
    plus one good file; returns ``{case name: Outcome}`` and the run's stats."""
    from pipeline.text_filter.config import TextFilterConfig
    from pipeline.text_filter.stage import run_text_filter

    root = tmp_path_factory.mktemp("filter")
    d = root / "in"
    d.mkdir()
    for case in cases_of("filter-spark"):
        case.build_input(str(d / f"{case.name}.parquet"))
    pq.write_table(laion_rows(50), d / "good.parquet")
    yaml = root / "d.yaml"
    yaml.write_text("name: D\nclasses: [tabby cat, rose]\n")
    out = str(root / "out")
    stats = run_text_filter(TextFilterConfig(skip_bad_files=True), str(yaml), str(d), out)
    files = io.list_files(str(d), suffixes=(".parquet",))  # the run's file order: part indices
    outcomes = {}
    for case in cases_of("filter-spark"):
        path = str(d / f"{case.name}.parquet")
        if path in stats["bad_files"]:
            outcomes[case.name] = Outcome("counted", "bad_file", detail={
                "message": stats["bad_files"][path]})  # fmt: skip
        else:
            part = io.join(out, f"part-{files.index(path):05d}.parquet")
            outcomes[case.name] = Outcome(
                "accepted", detail={"rows": io.read_parquet(part).num_rows}
            )
    return outcomes, stats, out


@pytest.fixture(scope="module")
def download_run(tmp_path_factory, image_server):
    """One real download (img2dataset) of every ``download`` case's URL from the loopback
    server; returns ``{case name: Outcome}``, the stats and the number of server hits."""
    import tarfile as _tarfile

    from PIL import Image

    from pipeline.download.stage import DownloadConfig, run_download

    root = tmp_path_factory.mktemp("download")
    cases = cases_of("download")
    urls = [c.build_input(image_server) for c in cases]
    uids = [io.make_uid(f"case:{c.name}", c.name) for c in cases]
    matches = str(root / "matches")
    io.write_parquet(
        pa.table(
            {
                "uid": uids,
                "url": pa.array(urls, pa.string()),
                "caption": [c.name for c in cases],
                "label": pa.array([0] * len(cases), pa.int32()),
                "class_name": ["c"] * len(cases),
                "matched_term": ["c"] * len(cases),
            }
        ),
        io.join(matches, "part-00000.parquet"),
    )
    io.mark_done(matches)
    cfg = DownloadConfig(
        processes=1, threads=8, timeout=5, retries=0, image_size=64, samples_per_shard=64,
        allow_private_addresses=True,
    )  # fmt: skip
    hits = image_server.hits
    out = str(root / "shards")
    stats = run_download(cfg, matches, out)
    hits = image_server.hits - hits
    manifest = {r["uid"]: r for r in io.read_parquet(io.join(out, "manifest.parquet")).to_pylist()}
    outcomes = {}
    for case, uid in zip(cases, uids):
        row = manifest[uid]
        if row["status"] == "success":
            with _tarfile.open(os.path.join(out, f"{row['shard']}.tar")) as tf:
                data = tf.extractfile(f"{row['key']}.jpg").read()
            img = Image.open(_io.BytesIO(data))
            img.load()
            outcomes[case.name] = Outcome("accepted", detail={**row, "image": img})
        else:
            n = stats["failures_by_reason"].get(row["reason"], 0)
            same = sum(1 for r in manifest.values() if r["reason"] == row["reason"])
            assert n == same  # stats.json counts what the manifest records
            outcomes[case.name] = Outcome("counted", row["reason"], detail={**row, "count": 1})
    return outcomes, stats, hits


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory, tiny_model_name):
    """One embedding run over a tar per ``embed`` case (the case's name is its sample's uid
    and its tar's name); returns ``{case name: Outcome}`` and the stats."""
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.pool import embed_shards

    root = tmp_path_factory.mktemp("embed")
    shards = root / "x" / "y" / "shards"
    shards.mkdir(parents=True)
    for case in cases_of("embed"):
        (shards / f"{case.name}.tar").write_bytes(case.build_input(case.name))
    cfg = EmbedConfig(
        model=tiny_model_name, pretrained="none", device="cpu", batch_size=8, workers=0
    )
    out = str(root / "emb")
    stats = embed_shards(cfg, str(shards), out)
    uids, _, feats = E.load(out)
    uids = list(uids)
    escaped = _files_outside(str(root), [str(shards), out])
    outcomes = {}
    for case in cases_of("embed"):
        fails = [(u, r) for s, u, r in stats["failures"] if s == case.name]
        mine = [u for u in uids if u == case.name or u.startswith(case.name + "-")]
        detail = {"uid": case.name, "embedded": mine, "escaped": escaped,
                  "features": feats[[uids.index(u) for u in mine]]}  # fmt: skip
        if fails:
            reasons = Counter(str(r).split(":", 1)[0] for _, r in fails)
            ((reason, n),) = reasons.items()
            outcomes[case.name] = Outcome("counted", reason, detail={**detail, "count": n})
        else:
            outcomes[case.name] = Outcome("accepted", detail=detail)
    return outcomes, stats


def _params():
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        yield pytest.param(c, id=c.name, marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_hostile_input(case: HostileCase, request, tmp_path):
    where = None
    if case.stage == "filter-footer":
        got, where = run_filter_footer(case, tmp_path)
    elif case.stage == "filter-spark":
        got = request.getfixturevalue("spark_filter_run")[0][case.name]
    elif case.stage == "filter-core":
        got = run_filter_core(case)
    elif case.stage == "dataset-yaml":
        got, where = run_dataset_yaml(case, tmp_path)
    elif case.stage == "url-check":
        got = run_url_check(case)
    elif case.stage == "download":
        got = request.getfixturevalue("download_run")[0][case.name]
    elif case.stage == "embed":
        got = request.getfixturevalue("embed_run")[0][case.name]
    elif case.stage == "materialise":
        got = run_materialise_case(case, tmp_path)
    elif case.stage == "checkpoint":
        got, where = run_checkpoint(case, tmp_path, request.getfixturevalue("tiny_model_name"))
    else:
        raise AssertionError(f"unknown stage {case.stage!r}")
    verify(case, got, where)


def test_catalogue_is_large_and_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) and len(CASES) >= 20
    assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in names)
    assert {c.stage for c in CASES} == set(STAGES)


def test_header_check_leaves_pillows_bomb_guard_on():
    """The download stage reads declared sizes with Pillow's bomb guard left in place (it used
    to switch it off for the whole process, the embedder's decoding included)."""
    from PIL import Image

    from pipeline.demo.imageserver import png_bomb
    from pipeline.download import limits as lim

    before = Image.MAX_IMAGE_PIXELS
    assert lim.header_pixels(png_bomb()) == 30000 * 30000
    assert lim.header_pixels(png_bomb(12000, 10000)) == 120_000_000
    assert lim.header_pixels(b"not an image") is None
    assert Image.MAX_IMAGE_PIXELS == before and before is not None


def test_bad_files_cost_no_good_rows(spark_filter_run):
    """The good file beside the bad ones is scanned in full and its rows kept, and the run
    completes (``_SUCCESS``) listing exactly the bad files."""
    _, stats, out = spark_filter_run
    bad = {c.name for c in cases_of("filter-spark") if c.expected.kind == "counted"}
    assert {os.path.basename(f)[: -len(".parquet")] for f in stats["bad_files"]} == bad
    assert stats["rows_scanned"] == 50 and stats["rows_matched"] == 50 and io.is_done(out)


def test_download_run_fetched_nothing_it_refused(download_run):
    """Refused URLs never reach the server: one request per fetched case, none for the rest."""
    outcomes, stats, hits = download_run
    refused = {"refused_scheme", "refused_credentials", "invalid_url", "refused_address"}
    fetched = [n for n, o in outcomes.items() if o.text not in refused]
    assert hits == len(fetched)
    assert stats["total"] == len(outcomes)


def test_embed_run_counts_every_failure_once(embed_run):
    outcomes, stats = embed_run
    failed = sum(o.detail.get("count", 0) for o in outcomes.values() if o.kind == "counted")
    assert stats["failed"] == failed
    assert stats["embedded"] == sum(len(o.detail["embedded"]) for o in outcomes.values())
