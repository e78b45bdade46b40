"""Shared I/O conventions for every stage.

- Locations are fsspec URLs: plain local paths, ``file://``, ``s3://``, ``hf://`` or any
  protocol fsspec knows. ``url_to_fs`` is the only place that turns one into a filesystem.
- Writes are atomic: local files are written under a temporary name in the same directory
  and renamed; object stores get a single ``put`` (an object appears whole or not at all).
- A directory is complete when its completion marker (``_SUCCESS`` by default) exists. The
  marker is always the last thing written, so a reader that sees it sees everything.
- Every LAION row carries a stable ``uid``: a 128-bit BLAKE2b hash of url and caption, hex.

S3 endpoints and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...) or from ``storage_options`` passed through.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import hashlib
import json
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"


class InputError(ValueError):
    """Bad or missing input data; the message names the file and what is wrong with it."""


_LOCAL_PROTOCOLS = {"file", "local"}


_CONFIGURED: dict[str, dict] = {}


def configure(storage_options: dict[str, dict]) -> None:
    """Default fsspec options per protocol (the ``io.storage_options`` setting) for every URL of
    that protocol this process opens; options passed to a call still win. Spark tasks get them
    from :func:`configured` through their closure."""
    for protocol, options in (storage_options or {}).items():
        fsspec.config.conf.setdefault(protocol, {}).update(options)
        _CONFIGURED.setdefault(protocol, {}).update(options)


def configured() -> dict[str, dict]:
    """What :func:`configure` set in this process (to hand to another one)."""
    return {k: dict(v) for k, v in _CONFIGURED.items()}


def url_to_fs(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for an fsspec URL or local path."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, path


def is_local(url: str) -> bool:
    """True when ``url`` is a plain path or a ``file://`` URL."""
    proto = url.split("://", 1)[0] if "://" in url else "file"
    return proto in _LOCAL_PROTOCOLS


def protocol(url: str) -> str:
    """The URL's protocol (``file`` for plain paths)."""
    return url.split("://", 1)[0] if "://" in url else "file"


def join(base: str, *parts: str) -> str:
    """Join URL parts with ``/`` (works for local paths and object-store URLs alike)."""
    out = base.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def relative(target: str, base: str) -> str:
    """``target`` as a path relative to the directory ``base`` where both are on one
    filesystem (local paths, or one bucket), so a directory tree can move; else ``target``.
    :func:`resolve` turns it back."""
    import posixpath

    if is_local(target) and is_local(base):
        t, b = (os.path.abspath(url_to_fs(u)[1]) for u in (target, base))
        return os.path.relpath(t, b)
    if protocol(target) == protocol(base):
        t, b = (u.split("://", 1)[1] for u in (target, base))
        if t.split("/", 1)[0] == b.split("/", 1)[0]:
            return posixpath.relpath(t, b)
    return target


def resolve(base: str, path: str) -> str:
    """A path stored by :func:`relative`, resolved against the directory ``base``."""
    import posixpath

    if "://" in path or os.path.isabs(path):
        return path
    if is_local(base):
        return os.path.normpath(os.path.join(url_to_fs(base)[1], path))
    proto, rest = base.split("://", 1)
    return f"{proto}://{posixpath.normpath(posixpath.join(rest, path))}"


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-relative path back into a full URL (``bucket/key`` -> ``s3://bucket/key``)."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in _LOCAL_PROTOCOLS:
        return path
    return fs.unstrip_protocol(path)


def exists(url: str, **storage_options: Any) -> bool:
    fs, path = url_to_fs(url, **storage_options)
    return fs.exists(path)


def makedirs(url: str, **storage_options: Any) -> None:
    """Create a directory (a no-op on object stores, where directories are implicit)."""
    fs, path = url_to_fs(url, **storage_options)
    fs.makedirs(path, exist_ok=True)


def remove(url: str, recursive: bool = True, **storage_options: Any) -> None:
    """Delete a file or directory tree if it exists."""
    fs, path = url_to_fs(url, **storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def list_files(
    url: str | Iterable[str], suffixes: tuple[str, ...] = (), **storage_options: Any
) -> list[str]:
    """Expand a URL, a glob, a directory or a list of them into a sorted list of file URLs.

    Directories are searched recursively; hidden names and names starting with ``_`` (such as
    ``_SUCCESS``) are skipped. ``suffixes`` keeps only files ending in one of them.
    Raises ``FileNotFoundError`` when nothing matches.
    """
    urls = [url] if isinstance(url, str) else list(url)
    out: set[str] = set()
    for u in urls:
        fs, path = url_to_fs(u, **storage_options)
        if _glob.has_magic(path):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = fs.find(path)
        elif fs.exists(path):
            found = [path]
        else:
            found = []
        for f in found:
            name = f.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith((".", "_")):
                continue
            if suffixes and not name.endswith(suffixes):
                continue
            if fs.isdir(f):
                continue
            out.add(unstrip(fs, f))
    if not out:
        raise FileNotFoundError(
            f"no input files match {url!r}" + (f" (suffixes {suffixes})" if suffixes else "")
        )
    return sorted(out)


class StagedFile:
    """A file written now and published later: :meth:`commit` makes it appear whole at ``url``
    (or :meth:`discard` drops it); until then ``url`` is untouched.

    Local files are written under a hidden temporary name in the target's directory; commit
    fsyncs and renames it. Other filesystems get a local temporary file; commit uploads it
    with one ``put``. Splitting the write from the commit lets a caller publish from another
    thread (the fsync's wait, or the upload, overlapping its next piece of work).
    """

    def __init__(self, url: str, mode: str = "wb", **storage_options: Any) -> None:
        if mode not in ("wb", "w"):
            raise ValueError("atomic writes are 'wb' or 'w'")
        self.url, self.mode = url, mode
        self._fs, self._path = url_to_fs(url, **storage_options)
        self._local = is_local(url)
        if self._local:
            directory = os.path.dirname(os.path.abspath(self._path)) or "."
            os.makedirs(directory, exist_ok=True)
            name = f".{os.path.basename(self._path)}.tmp-{uuid.uuid4().hex[:12]}"
            self._tmp = os.path.join(directory, name)
        else:
            with tempfile.NamedTemporaryFile(suffix=".part", delete=False) as f:
                self._tmp = f.name
        self._fd: int | None = None
        self._opened = False

    def open(self) -> IO:
        """The temporary file, opened for writing (close it before :meth:`commit`)."""
        f = open(self._tmp, self.mode, **({"encoding": "utf-8"} if self.mode == "w" else {}))
        self._opened = True
        if self._local:
            # A duplicate of the writing descriptor for commit's fsync: it shares that
            # descriptor's writeback error state, which a file opened again later may not see.
            self._fd = os.dup(f.fileno())
        return f

    def commit(self) -> None:
        """Publish the written file at ``url`` (durable first where local: fsync, rename)."""
        try:
            # Never publish the empty temporary (an object store's is created up front).
            if not self._opened:
                raise RuntimeError(f"{self.url}: commit before open")
            if self._local:
                os.fsync(self._fd)
                os.replace(self._tmp, self._path)
            else:
                self._fs.put_file(self._tmp, self._path)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the temporary file, if it is still there (nothing is left to commit)."""
        self._opened = False
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb", **storage_options: Any) -> Iterator[IO]:
    """Open ``url`` for writing so that it appears whole or not at all (a
    :class:`StagedFile` committed when the block exits without error)."""
    staged = StagedFile(url, mode, **storage_options)
    try:
        with staged.open() as f:
            yield f
        staged.commit()
    finally:
        staged.discard()


def write_bytes(url: str, data: bytes, **storage_options: Any) -> None:
    """Atomically write ``data`` to ``url``."""
    with atomic_open(url, "wb", **storage_options) as f:
        f.write(data)


def read_bytes(url: str, **storage_options: Any) -> bytes:
    fs, path = url_to_fs(url, **storage_options)
    return fs.cat_file(path)


def write_json(url: str, obj: Any, **storage_options: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON (stable bytes for stable input)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default, ensure_ascii=False)
    write_bytes(url, (text + "\n").encode("utf-8"), **storage_options)


def read_json(url: str, **storage_options: Any) -> Any:
    return json.loads(read_bytes(url, **storage_options))


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_parquet(table: pa.Table, url: str, **storage_options: Any) -> None:
    """Atomically write an Arrow table as one parquet file (zstd, statistics on)."""
    with atomic_open(url, "wb", **storage_options) as f:
        pq.write_table(table, f, compression="zstd")


def read_parquet(url: str, columns: list[str] | None = None, **storage_options: Any) -> pa.Table:
    """Read one parquet file or a directory/glob of them (sorted, concatenated)."""
    files = list_files(url, suffixes=(".parquet",), **storage_options)
    tables = []
    for f in files:
        fs, path = url_to_fs(f, **storage_options)
        with fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns))
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def mark_done(
    url: str, payload: dict | None = None, name: str = SUCCESS, **storage_options: Any
) -> None:
    """Write the completion marker ``url/name``. Call it after every other output is written."""
    write_json(join(url, name), payload or {}, **storage_options)


def is_done(url: str, name: str = SUCCESS, **storage_options: Any) -> bool:
    """True when ``url`` holds a completion marker."""
    try:
        return exists(join(url, name), **storage_options)
    except FileNotFoundError:
        return False


def make_uid(url: str | None, caption: str | None) -> str:
    """Stable 128-bit row id: BLAKE2b-128 over ``url``, a unit separator, and ``caption``.

    Null fields hash as empty strings, so a row keeps its uid through every stage and every
    schema (original LAION-2B-en and Re-LAION name the same fields differently).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update((url or "").encode("utf-8", "surrogatepass"))
    h.update(b"\x1f")
    h.update((caption or "").encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def make_uids(urls: pa.Array | list, captions: pa.Array | list) -> pa.Array:
    """Vectorised ``make_uid`` over two aligned columns; returns a string array."""
    u = urls.to_pylist() if isinstance(urls, (pa.Array, pa.ChunkedArray)) else urls
    c = captions.to_pylist() if isinstance(captions, (pa.Array, pa.ChunkedArray)) else captions
    return pa.array([make_uid(a, b) for a, b in zip(u, c)], type=pa.string())


def setup_logging(level: str | int = "INFO") -> None:
    """Configure root logging once: timestamps, level and logger name, to stderr."""
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    root = logging.getLogger()
    if not any(getattr(h, "_primer", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        handler._primer = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("py4j", "botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


class LockedError(RuntimeError):
    """Another run holds the lock on this run directory."""


class RunLock:
    """An exclusive lock on a run directory, so two runs never write the same outputs.

    Local directories use ``fcntl.flock`` on ``<dir>/_LOCK``: the kernel releases it when the
    holder exits, even on SIGKILL, so a crashed run never blocks the next one. Object stores
    have no locks: there ``_LOCK`` holds the owner, a token and a heartbeat time that a thread
    of the holder renews every ``heartbeat_s``, so a live run is never taken over however long
    it runs; a lock whose heartbeat is older than ``stale_after_s`` (its holder died) is taken
    over, and the taker reads the lock back to make sure its own write won. A holder releases
    only a lock that still holds its token. Raises :class:`LockedError` naming the holder.
    """

    def __init__(
        self,
        url: str,
        stale_after_s: float = 600.0,
        heartbeat_s: float = 60.0,
        **storage_options: Any,
    ):
        self.url = url
        self.lock_url = join(url, "_LOCK")
        self.stale_after_s = stale_after_s
        self.heartbeat_s = min(heartbeat_s, stale_after_s / 3)
        self.storage_options = storage_options
        self.token = uuid.uuid4().hex
        self._fh: IO | None = None
        self._beat: Any = None
        self._stop: Any = None

    def _owner(self) -> dict:
        import socket
        import time

        return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                "token": self.token}  # fmt: skip

    def _holder(self) -> dict:
        try:
            return read_json(self.lock_url, **self.storage_options)
        except (FileNotFoundError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        import threading
        import time

        makedirs(self.url, **self.storage_options)
        if is_local(self.url):
            import fcntl

            fs, path = url_to_fs(self.lock_url)
            fh = open(path, "a+", encoding="utf-8")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                fh.close()
                raise LockedError(
                    f"{self.url} is in use by another run ({holder}); wait for it to finish or use another run directory"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(self._owner()))
            fh.flush()
            self._fh = fh
            return self
        holder = self._holder()
        if holder:
            age = time.time() - float(holder.get("time", 0))
            if age < self.stale_after_s:
                raise LockedError(
                    f"{self.url} is in use by another run ({holder}, heartbeat {age:.0f} s ago); "
                    f"wait, or delete {self.lock_url} if that run is dead"
                )
            log.warning("taking over a stale lock on %s (%s)", self.url, holder)
        write_json(self.lock_url, self._owner(), **self.storage_options)
        # Two runs taking a free or stale lock at once: the later write wins, and the other
        # sees it here (a read after a write is consistent on S3).
        time.sleep(min(1.0, self.heartbeat_s / 4))
        if self._holder().get("token") != self.token:
            raise LockedError(f"{self.url} was taken by another run at the same moment")
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="primer-lock", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._holder().get("token") != self.token:
                    log.error("the lock on %s was taken over by another run", self.url)
                    return
                write_json(self.lock_url, self._owner(), **self.storage_options)
            except Exception as e:  # a failed renewal is retried at the next beat
                log.warning("could not renew the lock on %s: %r", self.url, e)

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
        elif self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None
            if self._holder().get("token") == self.token:  # never another run's lock
                remove(self.lock_url, **self.storage_options)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
