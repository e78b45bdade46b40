"""Stage 5: apply a decision: copy the kept images out of the download shards.

Formats: ``webdataset`` (``{00000..}.tar`` with jpg/txt/json per sample, key = uid) or
``imagefolder`` (``<label:04d>_<class>/<uid>.<ext>``, ext as downloaded, normally jpg); both
with ``manifest.parquet`` (uid, label, class_name, caption, score, reason, path), ``config.json``,
``stats.json`` and ``_SUCCESS`` last. Input member names are untrusted: samples are read as data
from the tar stream and written under names built from their uid (checked to be a plain
token) and a sanitised class name, never extracted by their own names, so ``../`` in a shard
cannot escape the output. Output tars have fixed member metadata (mtime 0, mode 0644), so the
same decision and shards give the same bytes.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import IO

import numpy as np
import pyarrow as pa

from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FORMATS = ("webdataset", "imagefolder")
_UID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MANIFEST_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float32()),
        ("reason", pa.string()),
        ("path", pa.string()),
    ]
)


# The output's layout (shards or folders, manifest); an output of another is never reused.
OUTPUT_FORMAT = 1


@dataclass(frozen=True)
class MaterialiseConfig:
    """Settings of materialise (section ``materialise``): ``format`` (``webdataset`` or
    ``imagefolder``) and ``samples_per_shard`` (webdataset only)."""

    format: str = "webdataset"
    samples_per_shard: int = 10000

    def __post_init__(self) -> None:
        problems = []
        if self.format not in FORMATS:
            problems.append(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.samples_per_shard < 1:
            problems.append("samples_per_shard must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Chosen:
    """What a decision says about one kept uid."""

    label: int
    score: float
    reason: str


def safe_name(text: str, max_len: int = 80) -> str:
    """A class name as one portable path component: accents folded to ASCII, anything but
    letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``, no leading dots (so never
    ``..``), at most ``max_len`` characters, ``class`` when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_text).strip("._") or "class"
    return s[:max_len]


def read_choice(url: str) -> dict[str, Chosen]:
    """``uid -> Chosen`` for the kept rows of a decision directory. An embedding directory
    (no filter ran) counts as keeping every row, with score NaN and reason ``pool``.

    Raises :class:`pipeline.core.io.InputError` when ``url`` is neither complete decision nor
    complete embeddings.
    """
    if E.is_decision(url):
        t = E.read_decision(url)
        t = t.filter(t.column("kept"))
        return {
            u: Chosen(int(lb), float(s) if s is not None else float("nan"), str(r))
            for u, lb, s, r in zip(
                *(t.column(c).to_pylist() for c in ("uid", "label", "score", "reason"))
            )
        }
    if io.is_done(url) and io.exists(io.join(url, E.META)):
        uids, labels, _ = E.load(url)
        return {
            u: Chosen(int(lb), float("nan"), "pool")
            for u, lb in zip(uids.tolist(), labels.tolist())
        }
    raise io.InputError(
        f"{url} is neither a complete decision nor complete embeddings (no {io.SUCCESS} / {E.DECISION})"
    )


class _ShardWriter:
    """Webdataset shards ``{00000..}.tar`` under ``out``, each written by webdataset's
    ``TarWriter`` into an atomic file (it appears whole or not at all)."""

    def __init__(self, out: str, per_shard: int):
        self.out, self.per_shard = out, per_shard
        self.shard, self.n = 0, 0
        self._staged: io.StagedFile | None = None
        self._fh: IO | None = None
        self._tar = None

    def _open(self) -> None:
        import webdataset

        self._staged = io.StagedFile(io.join(self.out, f"{self.shard:05d}.tar"))
        self._fh = self._staged.open()
        # Fixed member metadata: the same decision and shards give the same bytes.
        self._tar = webdataset.TarWriter(
            self._fh, encoder=False, mtime=0, mode=0o644, format=tarfile.USTAR_FORMAT
        )

    def add(self, uid: str, files: list[tuple[str, bytes]]) -> str:
        """Add one sample; returns its path ``<shard>.tar/<uid>.<first ext>``."""
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": uid, **dict(files)})  # type: ignore[union-attr]
        path = f"{self.shard:05d}.tar/{uid}.{files[0][0]}"
        self.n += 1
        if self.n >= self.per_shard:
            self.close()
        return path

    def close(self, error: BaseException | None = None) -> None:
        if self._tar is None:
            return
        staged, tar, fh = self._staged, self._tar, self._fh
        self._tar = self._fh = self._staged = None
        try:
            tar.close()  # closes the tar stream, not our file
            fh.close()  # type: ignore[union-attr]
            if error is None:
                staged.commit()  # type: ignore[union-attr]
                self.shard, self.n = self.shard + 1, 0
        finally:
            staged.discard()  # type: ignore[union-attr]  # a partial shard is dropped


def run_materialise(
    decision: str,
    shards: str,
    out: str,
    fmt: str = "webdataset",
    samples_per_shard: int = 10000,
    overwrite: bool = False,
) -> dict:
    """Write the kept images of ``decision`` (a decision or, to keep everything, an embedding
    directory) found in the download ``shards`` to ``out`` in ``fmt``; returns the stats.

    Samples are taken in shard order, each uid once; the decision's label is authoritative,
    the class name and caption come from the shard. Samples skipped are counted by reason
    (``bad_json``, ``no_image``, ``duplicate``); kept uids absent from the shards are counted
    as ``missing_from_shards``. Skips a complete ``out`` unless ``overwrite``. Raises
    :class:`pipeline.core.io.InputError` for a bad format, decision or shard location.
    """
    from pipeline.core.progress import progress
    from pipeline.embed.shards import iter_tar_samples

    if fmt not in FORMATS:
        raise io.InputError(f"format must be webdataset or imagefolder, not {fmt!r}")
    if samples_per_shard < 1:
        raise io.InputError("samples_per_shard must be >= 1")
    fp = fingerprint.make(
        "materialise",
        OUTPUT_FORMAT,
        {"format": fmt, "samples_per_shard": samples_per_shard if fmt == "webdataset" else None},
        {
            "decision": fingerprint.input_identity(decision),
            "shards": fingerprint.input_identity(shards, (".tar",)),
        },
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    t0 = time.perf_counter()
    chosen = read_choice(decision)
    try:
        tars = io.list_files(shards, suffixes=(".tar",))
    except FileNotFoundError:
        raise io.InputError(f"no webdataset shards (*.tar) at {shards!r}") from None
    manifest: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    skipped: Counter = Counter()
    seen: set[str] = set()
    writer = _ShardWriter(out, samples_per_shard) if fmt == "webdataset" else None
    try:
        for tar_url in progress(tars, desc="materialise", unit="shard"):
            for _key, sample in iter_tar_samples(tar_url):
                try:
                    meta = json.loads(sample.get("json", b"{}"))
                    if not isinstance(meta, dict):
                        raise ValueError("not an object")
                except ValueError:
                    skipped["bad_json"] += 1
                    continue
                uid = meta.get("uid")
                if not isinstance(uid, str) or uid not in chosen:
                    continue
                if uid in seen:
                    skipped["duplicate"] += 1
                    continue
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None or not _UID_RE.match(uid):
                    skipped["no_image" if ext is None else "bad_uid"] += 1
                    continue
                seen.add(uid)
                row = chosen[uid]
                caption = sample.get("txt", b"").decode("utf-8", "replace")
                class_name = str(meta.get("class_name", row.label))
                if writer is not None:
                    side = {
                        **meta,
                        "label": row.label,
                        "score": None if np.isnan(row.score) else row.score,
                        "reason": row.reason,
                    }
                    files = [
                        (ext, sample[ext]),
                        ("txt", caption.encode("utf-8")),
                        ("json", json.dumps(side, sort_keys=True).encode()),
                    ]
                    path = writer.add(uid, files)
                else:
                    path = f"{row.label:04d}_{safe_name(class_name)}/{uid}.{ext}"
                    io.write_bytes(io.join(out, path), sample[ext])
                for name, value in zip(
                    MANIFEST_SCHEMA.names,
                    (uid, row.label, class_name, caption, row.score, row.reason, path),
                ):
                    manifest[name].append(value)
    except BaseException as e:
        if writer is not None:
            writer.close(e)
        raise
    if writer is not None:
        writer.close()
    t1 = time.perf_counter()
    table = pa.table(manifest, schema=MANIFEST_SCHEMA)
    io.write_parquet(table, io.join(out, "manifest.parquet"))
    io.write_json(
        io.join(out, "config.json"),
        {
            "decision": decision,
            "shards": shards,
            "format": fmt,
            "samples_per_shard": samples_per_shard,
        },
    )
    labels = np.asarray(manifest["label"], np.int64)
    per_class = {str(lb): int(n) for lb, n in zip(*np.unique(labels, return_counts=True))}
    stats = {
        "kept_in_decision": len(chosen),
        "written": len(seen),
        "missing_from_shards": len(chosen) - len(seen),
        "skipped": dict(sorted(skipped.items())),
        "per_label_written": per_class,
        "input_shards": len(tars),
        "format": fmt,
        "seconds": {"copy": round(t1 - t0, 3), "write": round(time.perf_counter() - t1, 3)},
    }
    io.write_json(io.join(out, "stats.json"), stats)
    io.mark_done(out, {"written": len(seen)})
    if stats["missing_from_shards"]:
        log.warning(
            "materialise: %d kept uids were not found in %s", stats["missing_from_shards"], shards
        )
    log.info("materialise: %d images -> %s (%s)", len(seen), out, fmt)
    return stats
