"""Where the scan keeps its state, under ``<out>/_scan/``: per unit its matches
(``part-<index>.parquet``), their keys (``part-<index>.keys``), its stats (``part-<index>.stats.json``,
the resume marker, written last) and, for parts the global filters cut, the kept row numbers
(``keep-<index>.rows``)."""

from __future__ import annotations

from pipeline.core import io
from pipeline.text_filter.config import SCAN_DIR


def _keys_path(out: str, index: int) -> str:
    return io.join(out, SCAN_DIR, f"part-{index:05d}.keys")


def _piece_paths(out: str, index: int) -> tuple[str, str]:
    return io.join(out, SCAN_DIR, f"part-{index:05d}.parquet"), io.join(
        out, SCAN_DIR, f"part-{index:05d}.stats.json"
    )


def _scan_listing(out: str) -> dict[str, int]:
    """The files of the scan directory, name -> size in bytes, from one fresh listing (empty
    where the directory does not exist)."""
    scan = io.join(out, SCAN_DIR)
    if not io.exists(scan):
        return {}
    fs, path = io.url_to_fs(scan)
    fs.invalidate_cache(path)
    listed = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in fs.ls(path, detail=True)}
    # Object-store filesystems cache the listing; the files written next must not be hidden.
    fs.invalidate_cache(path)
    return listed


def _scanned_indices(out: str, indices: list[int]) -> set[int]:
    """Those of ``indices`` whose scan is complete (the stats file of :func:`_piece_paths`
    exists, as :func:`scan_file` checks), from one listing of the scan directory."""
    names = _scan_listing(out)
    return {i for i in indices if _piece_paths(out, i)[1].rsplit("/", 1)[-1] in names}


def _keep_path(out: str, index: int) -> str:
    return io.join(out, SCAN_DIR, f"keep-{index:05d}.rows")
