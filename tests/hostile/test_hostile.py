"""Issue 9: the hostile-input corpus, one named case per input, each with one expected outcome.

This file is the catalogue. Every entry of ``CASES`` is a :class:`HostileCase`: a name (the
pytest id, ``test_hostile.py::test_hostile_input[<name>]``), the stage whose real code it goes
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

``python -m tests.test_hostile`` prints the catalogue as a Markdown table.
"""

from __future__ import annotations

import io as _io
import json
import os
import pickle
import re
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.core.config import ConfigError

# ------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class Expect:
    """An expected outcome (build with :func:`error`, :func:`counted` or :func:`accepted`)."""

    kind: str  # "error" | "counted" | "accepted"
    what: str  # error: message pattern; counted: the reason; accepted: a description
    exc: type[BaseException] | None = None
    check: Callable[[dict], Any] | None = None
    note: str = ""

    def describe(self) -> str:
        note = f" ({self.note})" if self.note else ""
        if self.kind == "error":
            return f"{self.exc.__name__} naming the file: `{_readable(self.what)}`{note}"
        if self.kind == "counted":
            return f"skipped, counted as `{self.what}`{note}"
        return f"accepted: {self.what}"


def _readable(pattern: str) -> str:
    """A message pattern as prose: ``.*`` becomes an ellipsis, escapes are dropped."""
    return re.sub(r"\\(.)", r"\1", pattern.replace(".*", "…").lstrip("^"))


def error(
    exc: type[BaseException], pattern: str, check: Callable[[dict], Any] | None = None
) -> Expect:
    return Expect("error", pattern, exc, check)


def counted(reason: str, check: Callable[[dict], Any] | None = None, note: str = "") -> Expect:
    return Expect("counted", reason, check=check, note=note)


def accepted(what: str, check: Callable[[dict], Any] | None = None) -> Expect:
    return Expect("accepted", what, check=check)


@dataclass(frozen=True)
class HostileCase:
    name: str
    stage: str
    build_input: Callable[..., Any]
    expected: Expect
    xfail: str = ""  # a known bug in a module this file may not change: strict xfail


@dataclass
class Outcome:
    """What a stage did with one input: ``kind`` as in :class:`Expect`; ``text`` is the error
    message or the counted reason; ``detail`` what a ``check`` may look at."""

    kind: str
    text: str = ""
    exc: BaseException | None = None
    detail: dict = field(default_factory=dict)


def verify(case: HostileCase, got: Outcome, where: str | None = None) -> None:
    exp = case.expected
    assert got.kind == exp.kind, f"{case.name}: expected {exp.describe()}, got {got}"
    if exp.kind == "error":
        assert isinstance(got.exc, exp.exc), got.exc
        assert re.search(exp.what, got.text), got.text
        if where is not None:
            assert where in got.text, f"the message does not name {where}: {got.text}"
    elif exp.kind == "counted":
        assert got.text == exp.what, got
        assert got.detail.get("count", 1) == 1, got.detail
    if exp.check is not None:
        assert exp.check(got.detail), got.detail


# ------------------------------------------------------------------------------ builders

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


def _rows(n: int = 300) -> pa.Table:
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
        note=f"{where}; listed in `_stats.json` `bad_files` as `{_readable(pattern)}…`",
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


def _tar_bytes(members: list[tuple[str, bytes | tarfile.TarInfo]]) -> bytes:
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
    return lambda uid: _tar_bytes(members_of(uid))


def _truncated_tar(uid: str) -> bytes:
    """Two samples, cut 100 bytes into the second one's image: the first is whole."""
    whole = _tar_bytes(_sample(uid, _photo()) + _sample(uid + "-cut", _photo(), key="000000001"))
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
        _parquet_bytes(_rows(), _corrupt_footer),
        _bad_file(r"^OSError: Couldn't deserialize thrift", "at the footer check")),
    HostileCase("parquet_truncated", "filter-spark",
        _parquet_bytes(_rows(), lambda b: bytes(b[: len(b) // 2])),
        _bad_file(r"^ArrowInvalid: Parquet magic bytes not found", "at the footer check")),
    HostileCase("parquet_corrupt_data_page", "filter-spark",
        _parquet_bytes(_rows(), _corrupt_page),
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


def _of(stage: str) -> list[HostileCase]:
    return [c for c in CASES if c.stage == stage]


# ------------------------------------------------------------------------------ stage runners


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
    (work / "shards" / "00000.tar").write_bytes(_tar_bytes(members))
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


# ------------------------------------------------------------------------------ shared runs


@pytest.fixture(scope="module")
def spark_filter_run(tmp_path_factory, spark):
    """One text-filter run (local Spark, ``skip_bad_files``) over every ``filter-spark`` input
    plus one good file; returns ``{case name: Outcome}`` and the run's stats."""
    from pipeline.text_filter.config import TextFilterConfig
    from pipeline.text_filter.stage import run_text_filter

    root = tmp_path_factory.mktemp("filter")
    d = root / "in"
    d.mkdir()
    for case in _of("filter-spark"):
        case.build_input(str(d / f"{case.name}.parquet"))
    pq.write_table(_rows(50), d / "good.parquet")
    yaml = root / "d.yaml"
    yaml.write_text("name: D\nclasses: [tabby cat, rose]\n")
    out = str(root / "out")
    stats = run_text_filter(TextFilterConfig(skip_bad_files=True), str(yaml), str(d), out)
    files = io.list_files(str(d), suffixes=(".parquet",))  # the run's file order: part indices
    outcomes = {}
    for case in _of("filter-spark"):
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
    cases = _of("download")
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
    for case in _of("embed"):
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
    for case in _of("embed"):
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


# ------------------------------------------------------------------------------ the test


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
    bad = {c.name for c in _of("filter-spark") if c.expected.kind == "counted"}
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


# ------------------------------------------------------------------------------ S3 outage


@pytest.mark.parametrize("fail_at", [1, 4, 6])
def test_s3_failing_part_way_then_rerun_completes(
    tmp_path, s3_bucket, tiny_model_name, monkeypatch, fail_at
):
    """The object store starts failing after ``fail_at`` uploads while the embedding stage
    writes three shards to S3: the stage fails with the store's error, no ``_SUCCESS`` appears,
    every shard already marked done is whole, and a rerun (store back) completes with exactly
    the rows and features of a clean local run."""
    import s3fs

    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.pool import embed_shards
    from tests.embed.test_embed import make_shards

    shards = str(tmp_path / "shards")
    make_shards(shards, n_shards=3, per=5, bad=False)
    cfg = EmbedConfig(
        model=tiny_model_name, pretrained="none", device="cpu", batch_size=4, workers=0
    )
    clean = str(tmp_path / "clean")
    embed_shards(cfg, shards, clean)

    uploads = []
    real_put = s3fs.S3FileSystem._put_file

    async def flaky_put(self, lpath, rpath, *args, **kwargs):
        uploads.append(rpath)
        if len(uploads) > fail_at:
            raise OSError(f"injected S3 outage at upload {len(uploads)} ({rpath})")
        return await real_put(self, lpath, rpath, *args, **kwargs)

    out = io.join(s3_bucket, "emb")
    # fsspec binds each instance's sync methods when it is created, and caches instances:
    # drop the cache whenever the patch changes so the next filesystem sees it.
    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", flaky_put)
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(Exception, match="injected S3 outage"):
        embed_shards(cfg, shards, out)
    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", real_put)
    s3fs.S3FileSystem.clear_instance_cache()
    assert len(uploads) == fail_at + 1  # the run stopped at the first failed upload

    assert not io.is_done(out)
    fs, _ = io.url_to_fs(out)
    names = (
        {os.path.basename(p) for p in fs.ls(out.replace("s3://", ""), detail=False)}
        if fs.exists(out)
        else set()
    )
    for done in sorted(n for n in names if n.endswith(".done")):
        stem = done[: -len(".done")]
        assert {f"{stem}.npy", f"{stem}.parquet"} <= names, names  # data before its marker
        feats = np.load(_io.BytesIO(io.read_bytes(io.join(out, f"{stem}.npy"))))
        assert feats.shape[0] == io.read_parquet(io.join(out, f"{stem}.parquet")).num_rows
    with pytest.raises(io.InputError, match="not a complete embedding output"):
        E.load(out)  # incomplete output is refused by readers, not half-read

    embed_shards(cfg, shards, out)
    u1, y1, f1 = E.load(clean)
    u2, y2, f2 = E.load(out)
    assert list(u1) == list(u2) and (y1 == y2).all() and np.array_equal(f1, f2)


# ------------------------------------------------------------------------------ catalogue


def catalogue_markdown() -> str:
    """The catalogue as a Markdown table (for README.md)."""
    lines = ["| case | stage | expected outcome | test |", "|---|---|---|---|"]
    for c in CASES:
        exp = c.expected.describe() + (
            f" **(known bug, strict xfail: {c.xfail})**" if c.xfail else ""
        )
        exp = exp.replace("|", "\\|")
        lines.append(
            f"| `{c.name}` | {STAGES[c.stage]} | {exp} | `test_hostile.py::test_hostile_input[{c.name}]` |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(catalogue_markdown())
