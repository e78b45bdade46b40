"""Issue 9: the hostile-input corpus, one named case per input, each with one expected outcome.

This module is the catalogue (:mod:`tests.hostile.test_hostile` runs it). Every entry of
``CASES`` is a :class:`HostileCase`: a name (the pytest id,
``tests/hostile/test_hostile.py::test_hostile_input[<name>]``), the stage whose real code it goes
through, a function that builds the input, and the expected outcome, one of

- ``error(Exc, pattern)``: the stage raises ``Exc`` whose message matches ``pattern`` and
  names the offending file (for file inputs);
- ``counted(reason)``: the record is skipped and counted under ``reason`` in the stage's
  stats/manifest (exactly once for this input);
- ``accepted(check)``: the input is processed correctly (``check`` says what that means).

How each stage is run (all inputs built in ``tmp_path``, only loopback is ever contacted):

- ``filter-footer``: the text filter's driver-side footer check (:func:`check_inputs`) on a
  real parquet file;
- ``filter-spark``: one real local[2] Spark run of :func:`run_text_filter` with
  ``skip_bad_files`` over one directory holding every such file plus a good one;
- ``filter-core``: the pure core :func:`filter_batch` on an Arrow record batch;
- ``dataset-yaml``: :func:`pipeline.core.config.load_dataset` on a YAML file;
- ``url-check``: :func:`pipeline.download.urlcheck.check_url` (and the vectorised ``check_urls``),
  no network: internal addresses are only ever judged, never contacted;
- ``download``: one real img2dataset run (``allow_private_addresses`` on, for the loopback
  image server) over every such URL;
- ``embed``: one :func:`embed_shards` run of the tiny untrained ViT over one tar per case;
- ``materialise``: :func:`run_materialise` of a one-tar input per case;
- ``checkpoint``: the embedder's checkpoint loader (:func:`load_model`).

``python -m tests.catalogue > docs/testing.md`` writes it there as a Markdown table.
"""

from __future__ import annotations

import io as _io
import json
import os
import pickle
import re
import tarfile
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import io
from pipeline.core.config import ConfigError
from tests.hostile.model import (
    Expect,
    HostileCase,
    accepted,
    counted,
    error,
    readable,
)

CLASSES = ["tabby cat", "rose"]


def _parquet(table: pa.Table, **kw) -> Callable[[str], None]:
    return lambda path: pq.write_table(table, path, **kw)


def _parquet_bytes(table: pa.Table, mangle: Callable[[bytearray], bytes]) -> Callable[[str], None]:
    def build(path: str) -> None:
        buf = _io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        with open(path, "wb") as f:
            f.write(mangle(bytearray(buf.getvalue())))

    return build


def laion_rows(n: int = 300) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table(
        {
            "url": [f"http://a.test/{i}.jpg" for i in range(n)],
            "caption": [f"a tabby cat no. {rng.integers(10**9)}" for _ in range(n)],
        }
    )


def _corrupt_footer(data: bytearray) -> bytes:
    footer_len = int.from_bytes(data[-8:-4], "little")
    data[-8 - footer_len + 5 : -8] = b"\xff" * (footer_len - 5)
    return bytes(data)


def _corrupt_page(data: bytearray) -> bytes:
    mid = len(data) // 3  # inside the zstd-compressed column chunks; the footer stays intact
    data[mid : mid + 64] = b"\x00" * 64
    return bytes(data)


def _bad_file(pattern: str, where: str) -> Expect:
    """Listed in ``_stats.json`` ``bad_files`` with a reason matching ``pattern``."""
    return counted(
        "bad_file",
        lambda d: re.search(pattern, d["message"]),
        note=f"{where}; listed in `_stats.json` `bad_files` as `{readable(pattern)}…`",
    )


def _raw(data: bytes) -> Callable[[str], None]:
    def build(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)

    return build


def _batch(caption: pa.Array, url: pa.Array | None = None) -> Callable[[], pa.RecordBatch]:
    url = url if url is not None else pa.array(["http://a.test/1.jpg"] * len(caption))
    return lambda: pa.record_batch({"url": url, "caption": caption})


def _invalid_utf8_string_array(raw: bytes) -> pa.Array:
    """A ``string`` array holding bytes that are not UTF-8 (what a foreign writer can leave)."""
    offsets = pa.py_buffer(np.array([0, len(raw)], np.int32).tobytes())
    return pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(raw)])


def _yaml(text: str | bytes, extra: dict[str, str] | None = None) -> Callable[[str], None]:
    def build(path: str) -> None:
        with open(path, "wb") as f:
            f.write(text if isinstance(text, bytes) else text.encode())
        for name, body in (extra or {}).items():
            with open(os.path.join(os.path.dirname(path), name), "w") as f:
                f.write(body)

    return build


def _awkward(name: str) -> bytes:
    from pipeline.demo.imageserver import awkward_images

    return awkward_images()[name]


def _png_bomb(width: int, height: int) -> bytes:
    from pipeline.demo.imageserver import png_bomb

    return png_bomb(width, height)


def _photo() -> bytes:
    from pipeline.demo.imageserver import skimage_bytes

    return skimage_bytes("chelsea")


def tar_bytes(members: list[tuple[str, bytes | tarfile.TarInfo]]) -> bytes:
    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            if isinstance(data, tarfile.TarInfo):
                tf.addfile(data)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, _io.BytesIO(data))
    return buf.getvalue()


def _sample(uid: str, image: bytes | None, ext: str = "jpg", key: str = "000000000") -> list:
    meta = json.dumps({"uid": uid, "label": 1, "class_name": "rose"}).encode()
    members = [(f"{key}.{ext}", image)] if image is not None else []
    return members + [(f"{key}.txt", b"a rose"), (f"{key}.json", meta)]


def _symlink(name: str, target: str) -> tuple[str, tarfile.TarInfo]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return name, info


def _embed_tar(members_of: Callable[[str], list]) -> Callable[[str], bytes]:
    """Builder of an embed case: ``uid -> tar bytes``, the case's sample under uid ``uid``."""
    return lambda uid: tar_bytes(members_of(uid))


def _truncated_tar(uid: str) -> bytes:
    """Two samples, cut 100 bytes into the second one's image: the first is whole."""
    whole = tar_bytes(_sample(uid, _photo()) + _sample(uid + "-cut", _photo(), key="000000001"))
    with tarfile.open(fileobj=_io.BytesIO(whole)) as tf:
        second = tf.getmember("000000001.jpg")
    return whole[: second.offset_data + 100]


def _evil_checkpoint(path: str) -> None:
    """A torch.save'd file whose pickle runs ``touch <path>.pwned`` when unpickled."""
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path}.pwned",))

    torch.save({"visual.proj": Evil()}, path)


def _evil_plain_pickle(path: str) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path}.pwned",))

    with open(path, "wb") as f:
        pickle.dump({"visual.proj": Evil()}, f)


def _code_not_run(d: dict) -> bool:
    return not os.path.exists(d["input"] + ".pwned")


def _reference_mean(name: str) -> float:
    """Mean 8-bit intensity the image should keep: Pillow's RGB for 8-bit sources, the
    ramp's high byte (127.5) for the 16-bit greyscale one."""
    from PIL import Image

    if name == "gray16.png":
        return 127.5
    return float(np.asarray(Image.open(_io.BytesIO(_awkward(name))).convert("RGB")).mean())


def _downloaded_like(name: str, mode: str) -> Callable[[dict], bool]:
    """The downloaded sample is a JPEG of ``mode``, short side 64, whose mean intensity is
    within 6 levels of the source's (a saturated 16-bit image or inverted CMYK is far off)."""

    def check(d: dict) -> bool:
        img = d["image"]
        mean = float(np.asarray(img.convert("RGB")).mean())
        assert abs(mean - _reference_mean(name)) < 6, (name, mean, _reference_mean(name))
        return img.format == "JPEG" and img.mode == mode and min(img.size) == 64

    return check


def _decoded_like(name: str) -> Callable[[dict], bool]:
    """The embedder's decoder (:func:`pipeline.embed.shards.decode_image`) keeps the intensities."""

    def check(d: dict) -> bool:
        from pipeline.embed.shards import decode_image

        rgb = decode_image(_awkward(name), None, lambda im: np.asarray(im), 64)
        assert abs(float(rgb.mean()) - _reference_mean(name)) < 2, rgb.mean()
        return rgb.dtype == np.uint8 and rgb.shape[2] == 3

    return check


def _unit_vector(d: dict) -> bool:
    f = d["features"].astype(np.float32)
    return f.shape[0] == 1 and np.isfinite(f).all() and abs(np.linalg.norm(f) - 1) < 2e-3


def _nothing_outside(d: dict) -> bool:
    return not d["escaped"]


# ------------------------------------------------------------------------------ the catalogue

_W = "http://a.test/1.jpg"


CASES: list[HostileCase] = [
    # --- LAION metadata parquet: checked at the footer, before Spark starts (always fatal:
    # a mis-mapped column would silently filter on nonsense).
    HostileCase("parquet_missing_caption_column", "filter-footer",
        _parquet(pa.table({"URL": [_W], "ALT": ["a rose"]})),
        error(io.InputError, r"required column 'caption' not found .*'ALT'")),
    HostileCase("parquet_renamed_url_column", "filter-footer",
        _parquet(pa.table({"link": [_W], "TEXT": ["a rose"]})),
        error(io.InputError, r"required column 'url' not found .*'link'.*filter\.columns")),
    HostileCase("parquet_caption_of_integer_type", "filter-footer",
        _parquet(pa.table({"url": [_W], "caption": pa.array([3], pa.int64())})),
        error(io.InputError, r"column 'caption' .* type int64, expected string or binary")),
    HostileCase("parquet_url_of_float_type", "filter-footer",
        _parquet(pa.table({"url": [1.5], "caption": ["a rose"]})),
        error(io.InputError, r"column 'url' .* type double, expected string or binary")),
    HostileCase("parquet_punsafe_of_string_type", "filter-footer",
        _parquet(pa.table({"url": [_W], "caption": ["a rose"], "punsafe": ["high"]})),
        error(io.InputError, r"column 'punsafe' .* type string, expected numeric")),
    # --- unreadable files: one Spark run with skip_bad_files; each listed with its reason.
    HostileCase("parquet_zero_rows", "filter-spark",
        _parquet(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())})),
        accepted("scanned, 0 rows, not a bad file", lambda d: d["rows"] == 0)),
    HostileCase("parquet_corrupt_footer", "filter-spark",
        _parquet_bytes(laion_rows(), _corrupt_footer),
        _bad_file(r"^OSError: Couldn't deserialize thrift", "at the footer check")),
    HostileCase("parquet_truncated", "filter-spark",
        _parquet_bytes(laion_rows(), lambda b: bytes(b[: len(b) // 2])),
        _bad_file(r"^ArrowInvalid: Parquet magic bytes not found", "at the footer check")),
    HostileCase("parquet_corrupt_data_page", "filter-spark",
        _parquet_bytes(laion_rows(), _corrupt_page),
        _bad_file(r"^OSError: ZSTD decompression failed", "in the Spark task; footer intact")),
    HostileCase("parquet_zero_bytes", "filter-spark", _raw(b""),
        _bad_file(r"^ArrowInvalid: Parquet file size is 0 bytes", "at the footer check")),
    HostileCase("parquet_is_an_html_error_page", "filter-spark",
        _raw(b"<html><body>403 Forbidden</body></html>"),
        _bad_file(r"^ArrowInvalid: Parquet magic bytes not found", "at the footer check")),
    # --- captions (and urls) through the text filter's pure core.
    HostileCase("caption_null", "filter-core", _batch(pa.array([None], pa.string())),
        counted("null_or_empty_caption")),
    HostileCase("caption_empty", "filter-core", _batch(pa.array([""])),
        counted("null_or_empty_caption")),
    HostileCase("caption_column_of_null_type", "filter-core", _batch(pa.nulls(1)),
        counted("null_or_empty_caption")),
    HostileCase("caption_whitespace_only", "filter-core", _batch(pa.array([" \t\n "])),
        counted("no_match")),
    HostileCase("caption_5_megabytes", "filter-core",
        _batch(pa.array(["a tabby cat " + "x" * 5_000_000])),
        counted("caption_too_long")),
    HostileCase("caption_invalid_utf8_binary_column", "filter-core",
        _batch(pa.array([b"\xff\xfe a tabby cat \xc3"], pa.binary())),
        accepted("undecodable bytes replaced (U+FFFD), matched",
                 lambda d: d["class_name"] == "tabby cat" and "\ufffd" in d["caption"])),
    HostileCase("caption_invalid_utf8_string_column", "filter-core",
        _batch(_invalid_utf8_string_array(b"\xff\xfe a rose")),
        accepted("undecodable bytes replaced (U+FFFD), matched",
                 lambda d: d["class_name"] == "rose" and d["caption"] == "\ufffd\ufffd a rose")),
    HostileCase("caption_right_to_left_override", "filter-core",
        _batch(pa.array(["\u202ea rose\u202c"])),
        accepted("bidi controls ignored, matched", lambda d: d["class_name"] == "rose")),
    HostileCase("caption_right_to_left_script", "filter-core",
        _batch(pa.array(["\u0642\u0637\u0629 tabby cat \u05d7\u05ea\u05d5\u05dc"])),
        accepted("matched", lambda d: d["class_name"] == "tabby cat")),
    HostileCase("caption_zero_width_inside_a_word", "filter-core",
        _batch(pa.array(["ta\u200bbby\u200d c\ufeffat"])),
        accepted("invisible characters deleted, matched", lambda d: d["class_name"] == "tabby cat")),
    HostileCase("caption_zero_width_joining_two_words", "filter-core",
        _batch(pa.array(["tabby\u200bcat"])),
        counted("no_match")),  # reads "tabbycat" on screen: not the class "tabby cat"
    HostileCase("caption_control_characters", "filter-core",
        _batch(pa.array(["\x00\x01 rose \x7f\x1b[31m"])),
        accepted("controls are separators, matched", lambda d: d["class_name"] == "rose")),
    HostileCase("url_null_with_matching_caption", "filter-core",
        _batch(pa.array(["a rose"]), url=pa.array([None], pa.string())),
        counted("null_or_empty_url")),
    HostileCase("url_empty_with_matching_caption", "filter-core",
        _batch(pa.array(["a rose"]), url=pa.array([""], pa.string())),
        counted("null_or_empty_url")),
    # 0x1F joins URL and caption in the uid: "a\x1fb" + "c" would share the uid of "a" + "b\x1fc".
    HostileCase("url_with_the_uid_separator", "filter-core",
        _batch(pa.array(["a rose"]), url=pa.array(["http://a.test/x\x1fa rose.jpg"])),
        counted("url_with_control_character")),
    HostileCase("url_with_a_newline", "filter-core",
        _batch(pa.array(["a rose"]), url=pa.array(["http://a.test/x.jpg\nHost: b"])),
        counted("url_with_control_character")),
    HostileCase("url_binary_with_del", "filter-core",
        _batch(pa.array(["a rose"]), url=pa.array([b"http://a.test/\x7f.jpg"], pa.binary())),
        counted("url_with_control_character")),
    # --- dataset YAMLs: ConfigError naming the file.
    HostileCase("yaml_duplicate_class_names", "dataset-yaml", _yaml("classes: [rose, cat, rose]\n"),
        error(ConfigError, r"duplicate class name 'rose' at labels 0 and 2")),
    HostileCase("yaml_empty_class_name", "dataset-yaml", _yaml("classes: [rose, '']\n"),
        error(ConfigError, r"empty class name at label\(s\) \[1\]")),
    HostileCase("yaml_whitespace_and_null_class_names", "dataset-yaml",
        _yaml("classes: [rose, '   ', null]\n"),
        error(ConfigError, r"empty class name at label\(s\) \[1, 2\]")),
    HostileCase("yaml_classes_equal_after_normalisation", "dataset-yaml",
        _yaml("classes: [Tabby-Cat, tabby cat]\n"),
        error(ConfigError, r"'Tabby-Cat' \(label 0\) and class name 'tabby cat' \(label 1\) are the same name to the caption matcher")),
    HostileCase("yaml_class_name_without_letters", "dataset-yaml", _yaml("classes: [rose, '!!!']\n"),
        error(ConfigError, r"class name '!!!' \(label 1\) has no letter or digit")),
    HostileCase("yaml_synonym_naming_another_class", "dataset-yaml",
        _yaml("classes: [cat, dog]\nsynonyms: {cat: [Dog]}\n"),
        error(ConfigError, r"synonym 'Dog' of 'cat' \(label 0\) are the same name")),
    HostileCase("yaml_empty_class_list", "dataset-yaml", _yaml("classes: []\n"),
        error(ConfigError, r"'classes' must be a non-empty list")),
    HostileCase("yaml_not_utf8", "dataset-yaml", _yaml(b"classes: [caf\xe9]\n"),
        error(ConfigError, r"not UTF-8 text")),
    HostileCase("yaml_templates_not_a_list", "dataset-yaml",
        _yaml("classes: [rose]\ntemplates: 'a photo of a {}.'\n"),
        error(ConfigError, r"'templates' must be a list of strings, not str")),
    HostileCase("yaml_descriptions_not_json", "dataset-yaml",
        _yaml("classes: [rose]\ndescriptions: d.json\n", {"d.json": "{rose: [oops"}),
        error(ConfigError, r"descriptions file .*d\.json' is not valid JSON")),
    # --- URLs, judged by the pre-check without any network.
    HostileCase("url_with_credentials", "url-check", lambda: "http://user:pw@example.com/a.jpg",
        counted("refused_credentials")),
    HostileCase("url_file_scheme", "url-check", lambda: "file:///etc/passwd",
        counted("refused_scheme")),
    HostileCase("url_private_ipv4_literal", "url-check", lambda: "http://10.0.0.5:8080/admin",
        counted("refused_address")),
    HostileCase("url_cloud_metadata_address", "url-check",
        lambda: "http://169.254.169.254/latest/meta-data/",
        counted("refused_address")),
    HostileCase("url_loopback_as_decimal_number", "url-check", lambda: "http://2130706433/a.jpg",
        counted("refused_address")),
    HostileCase("url_ipv4_mapped_ipv6_private", "url-check", lambda: "http://[::ffff:192.168.0.1]/",
        counted("refused_address")),
    HostileCase("url_idn_fullwidth_localhost", "url-check",
        lambda: "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/a.jpg",
        counted("refused_address")),
    HostileCase("url_idn_fullwidth_dots_metadata", "url-check",
        lambda: "http://169\uff0e254\uff0e169\uff0e254/",
        counted("refused_address")),
    HostileCase("url_idn_fullwidth_digits_loopback", "url-check",
        lambda: "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/a.jpg",
        counted("refused_address")),
    HostileCase("url_idn_circled_digits_loopback", "url-check",
        lambda: "http://\u2460\u2461\u2466.0.0.1/a.jpg",
        counted("refused_address")),
    HostileCase("url_idn_real_hostname", "url-check", lambda: "http://b\u00fccher.example/a.jpg",
        accepted("a public IDN name may be fetched")),
    HostileCase("url_idn_without_idna_form", "url-check", lambda: "http://\u200b.example/a.jpg",
        counted("invalid_url")),
    # --- images and URLs through the real download stage (loopback server).
    HostileCase("image_truncated", "download", lambda s: s.url("truncated/skimage/coffee.jpg"),
        counted("decode_error")),
    HostileCase("image_random_bytes", "download", lambda s: s.url("garbage/x.jpg"),
        counted("decode_error")),
    HostileCase("image_is_an_html_page", "download", lambda s: s.url("notimage/x.jpg"),
        counted("not_image")),
    HostileCase("image_decompression_bomb", "download", lambda s: s.url("bomb.png"),
        counted("too_large")),
    HostileCase("image_cmyk_jpeg", "download", lambda s: s.url("awkward/cmyk.jpg"),
        accepted("RGB JPEG, short side 64, colours kept", _downloaded_like("cmyk.jpg", "RGB"))),
    HostileCase("image_16bit_grey_png", "download", lambda s: s.url("awkward/gray16.png"),
        accepted("8-bit greyscale JPEG, short side 64, not saturated",
                 _downloaded_like("gray16.png", "L"))),
    HostileCase("image_16bit_rgb_png", "download", lambda s: s.url("awkward/rgb16.png"),
        accepted("RGB JPEG, short side 64, not saturated", _downloaded_like("rgb16.png", "RGB"))),
    HostileCase("image_animated_gif", "download", lambda s: s.url("awkward/animated.gif"),
        accepted("first frame as RGB JPEG, short side 64",
                 _downloaded_like("animated.gif", "RGB"))),
    HostileCase("image_1x1", "download", lambda s: s.url("awkward/1x1.png"),
        accepted("upscaled RGB JPEG 64x64",
                 lambda d: d["image"].size == (64, 64) and _downloaded_like("1x1.png", "RGB")(d))),
    HostileCase("image_rgba_png", "download", lambda s: s.url("awkward/rgba.png"),
        accepted("RGB JPEG, short side 64", _downloaded_like("rgba.png", "RGB"))),
    HostileCase("image_palette_png_with_transparency", "download",
        lambda s: s.url("awkward/palette.png"),
        accepted("RGB JPEG, short side 64", _downloaded_like("palette.png", "RGB"))),
    HostileCase("download_ftp_url", "download",
        lambda s: s.url("skimage/coffee.jpg").replace("http://", "ftp://"),
        counted("refused_scheme", lambda d: d["shard"] is None)),
    HostileCase("download_url_with_credentials", "download",
        lambda s: s.url("skimage/coffee.jpg").replace("http://", "http://user:pw@"),
        counted("refused_credentials", lambda d: d["shard"] is None)),
    HostileCase("download_null_url", "download", lambda s: None, counted("invalid_url")),
    # --- webdataset tars through the embedding stage (one tar per case).
    HostileCase("tar_member_names_with_path_traversal", "embed",
        _embed_tar(lambda u: [(f"../../evil/{n}", d) for n, d in _sample(u, _photo())]),
        accepted("embedded (names only group members; nothing is extracted)",
                 lambda d: _unit_vector(d) and not d["escaped"])),
    HostileCase("tar_absolute_member_names", "embed",
        _embed_tar(lambda u: [(f"/tmp/evil/{n}", d) for n, d in _sample(u, _photo())]),
        accepted("embedded", _unit_vector)),
    HostileCase("tar_sample_without_image", "embed", _embed_tar(lambda u: _sample(u, None)),
        counted("no image in sample")),
    HostileCase("tar_image_is_a_symlink", "embed",
        _embed_tar(lambda u: [_symlink("000000000.jpg", "/etc/passwd")] + _sample(u, None)),
        counted("no image in sample")),  # links are never followed
    HostileCase("tar_image_bytes_not_an_image", "embed",
        _embed_tar(lambda u: _sample(u, b"\xff\xd8 not really a jpeg")),
        counted("UnidentifiedImageError")),
    HostileCase("tar_truncated", "embed", _truncated_tar,
        counted("unreadable tar", lambda d: d["embedded"] == [d["uid"]])),
    HostileCase("tar_json_not_an_object", "embed",
        _embed_tar(lambda u: [("k.jpg", _photo()), ("k.json", b'["' + u.encode() + b'"]')]),
        counted("json is not an object")),
    HostileCase("tar_label_not_an_integer", "embed",
        _embed_tar(lambda u: [("k.jpg", _photo()),
                              ("k.json", json.dumps({"uid": u, "label": "cat"}).encode())]),
        counted("label 'cat' is not an integer")),
    HostileCase("tar_decompression_bomb", "embed",
        _embed_tar(lambda u: _sample(u, _png_bomb(30000, 30000), "png")),
        counted("ImageTooLarge")),
    HostileCase("tar_image_declaring_120m_pixels", "embed",
        _embed_tar(lambda u: _sample(u, _png_bomb(12000, 10000), "png")),
        counted("ImageTooLarge")),
    HostileCase("tar_cmyk_jpeg", "embed", _embed_tar(lambda u: _sample(u, _awkward("cmyk.jpg"))),
        accepted("unit vector", _unit_vector)),
    HostileCase("tar_16bit_grey_png", "embed",
        _embed_tar(lambda u: _sample(u, _awkward("gray16.png"), "png")),
        accepted("unit vector; decoded to 8 bits, not saturated",
                 lambda d: _unit_vector(d) and _decoded_like("gray16.png")(d))),
    HostileCase("tar_16bit_rgb_png", "embed",
        _embed_tar(lambda u: _sample(u, _awkward("rgb16.png"), "png")),
        accepted("unit vector; decoded to 8 bits, not saturated",
                 lambda d: _unit_vector(d) and _decoded_like("rgb16.png")(d))),
    HostileCase("tar_animated_gif_named_jpg", "embed",
        _embed_tar(lambda u: _sample(u, _awkward("animated.gif"))),
        accepted("first frame, unit vector", _unit_vector)),
    HostileCase("tar_1x1_png", "embed", _embed_tar(lambda u: _sample(u, _awkward("1x1.png"), "png")),
        accepted("unit vector", _unit_vector)),
    # --- materialising a decision from hostile download shards.
    HostileCase("materialise_member_names_with_path_traversal", "materialise",
        lambda: ([(f"../../../{n}", d) for n, d in _sample("u1", _photo())], ["u1"], "webdataset"),
        accepted("written as <shard>.tar/u1.jpg, nothing outside the output",
                 lambda d: d["paths"] == ["00000.tar/u1.jpg"] and _nothing_outside(d))),
    HostileCase("materialise_uid_with_path_traversal", "materialise",
        lambda: (_sample("../../../evil", _photo()), ["../../../evil"], "imagefolder"),
        counted("bad_uid", _nothing_outside)),
    HostileCase("materialise_class_name_with_path_traversal", "materialise",
        lambda: ([(n, json.dumps({"uid": "u1", "label": 1, "class_name": "../../../etc"}).encode()
                   if n.endswith(".json") else d) for n, d in _sample("u1", _photo())],
                 ["u1"], "imagefolder"),
        accepted("written as 0001_etc/u1.jpg inside the output",
                 lambda d: d["paths"] == ["0001_etc/u1.jpg"] and _nothing_outside(d))),
    HostileCase("materialise_json_not_an_object", "materialise",
        lambda: ([("k.jpg", _photo()), ("k.json", b"[1, 2]")], ["u1"], "webdataset"),
        counted("bad_json")),
    HostileCase("materialise_sample_without_image", "materialise",
        lambda: (_sample("u1", None), ["u1"], "webdataset"),
        counted("no_image")),
    # --- checkpoints: never unpickle code.
    HostileCase("checkpoint_torch_save_with_code", "checkpoint", _evil_checkpoint,
        error(io.InputError, r"refused: it is not a plain tensor state dict.*never executed",
              _code_not_run)),
    HostileCase("checkpoint_plain_pickle_with_code", "checkpoint", _evil_plain_pickle,
        error(io.InputError, r"refused: it is not a plain tensor state dict.*never executed",
              _code_not_run)),
    HostileCase("checkpoint_random_bytes", "checkpoint",
        _raw(np.random.default_rng(0).bytes(4096)),
        error(io.InputError, r"refused: it is not a plain tensor state dict")),
]  # fmt: skip


STAGES = {
    "filter-footer": "text filter: footer check (`check_inputs`)",
    "filter-spark": "text filter: local Spark run, `skip_bad_files`",
    "filter-core": "text filter: pure core (`filter_batch`)",
    "dataset-yaml": "dataset config (`load_dataset`)",
    "url-check": "URL pre-check (`check_url`, `check_urls`)",
    "download": "download (img2dataset, loopback server)",
    "embed": "embed (`embed_shards`, tiny ViT)",
    "materialise": "materialise (`run_materialise`)",
    "checkpoint": "embed: checkpoint loader (`load_model`)",
}


def cases_of(stage: str) -> list[HostileCase]:
    return [c for c in CASES if c.stage == stage]


HOSTILE_TEST = "tests/hostile/test_hostile.py::test_hostile_input"


def catalogue_markdown() -> str:
    """The catalogue as a Markdown table (for docs/testing.md)."""
    lines = ["| case | stage | expected outcome | test |", "|---|---|---|---|"]
    for c in CASES:
        exp = c.expected.describe() + (
            f" **(known bug, strict xfail: {c.xfail})**" if c.xfail else ""
        )
        exp = exp.replace("|", "\\|")
        lines.append(f"| `{c.name}` | {STAGES[c.stage]} | {exp} | `{HOSTILE_TEST}[{c.name}]` |")
    return "\n".join(lines)
