"""What Primer changes inside img2dataset 1.47 (imported only when a download runs).

img2dataset stays the downloader (sharding, threads, resizing, writers, incremental mode);
this module swaps four of its parts, each for a stated reason:

- ``download_image``: img2dataset reads a whole response into memory (``r.read()``) and
  decodes it with OpenCV before checking its area, so one multi-gigabyte response or one
  decompression bomb can exhaust a worker. Ours caps the bytes read, refuses text/HTML
  responses, reads the declared width x height from the image header (Pillow reads only the
  header) before anything is decoded, and opens connections through
  :func:`checked_create_connection`, which refuses a connection whose peer is not a public
  address (a redirect to ``169.254.169.254``, or a public hostname whose DNS answer is
  private) before a byte of the request is sent.
- ``Downloader`` -> :class:`LimitedDownloader`: the limits travel as attributes of the
  downloader that img2dataset pickles to its workers (spawned processes or Spark executors on
  other machines, which inherit nothing from the driver); unpickling it imports this module,
  which installs our ``download_image`` in that worker.
- ``multiprocessing_distributor``: img2dataset's spawns a fresh interpreter per worker (and a
  new one every 5 shards); each pays for importing img2dataset, torch and wandb again. Ours
  uses a ``forkserver`` that imports them once per driver process; workers fork from it
  (fork-safe: the server is single-threaded), and the driver shows a progress bar.
- ``LoggerProcess``: img2dataset spawns one more interpreter only to print its stats files;
  ours is a no-op (Primer writes ``stats.json`` and logs its own summary).
"""

from __future__ import annotations

import contextlib
import http.client
import importlib
import io
import ipaddress
import logging
import socket
import time
import urllib.request
from collections.abc import Iterator

import img2dataset.downloader as _downloader
from img2dataset.distributor import retrier

from pipeline.download.urlcheck import is_public_address

log = logging.getLogger(__name__)

# The module: the package re-exports a function named `main` that hides it from `import as`.
_i2d_main = importlib.import_module("img2dataset.main")
_ORIGINAL = getattr(_downloader, "_primer_original_download_image", _downloader.download_image)
_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"

# Set in each worker by LimitedDownloader.__call__ (one downloader per worker process).
_LIMITS = {"max_bytes": 32 * 2**20, "max_pixels": 89_478_485, "allow_private": False}


def header_pixels(data: bytes) -> int | None:
    """Width x height declared by an image header (Pillow reads only the header), or None."""
    import re
    import warnings

    from PIL import Image

    # Pillow's own bomb guard is left as it is (setting Image.MAX_IMAGE_PIXELS would switch it
    # off for everything else in this process, the embedder's decoding included): above twice
    # its limit Pillow refuses to open the header, and its message carries the pixel count.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                return int(w) * int(h)
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        return int(m.group(1)) if m else 2**63 - 1
    except Exception:  # not an image Pillow knows: img2dataset's decoder will judge it
        return None


def to_8bit(data: bytes) -> bytes:
    """A 16-bit image re-encoded as an 8-bit PNG (the high byte of each sample); any other
    image unchanged.

    img2dataset decodes with OpenCV's ``IMREAD_UNCHANGED``, which keeps 16-bit samples, and its
    JPEG/WebP encoding then saturates every value above 255: a 16-bit photo comes out almost
    all white. Only 16-bit PNGs (bit depth in the header) and TIFF/PGM files in Pillow's 16-bit
    modes are decoded here, after the pixel cap has been checked.
    """
    png16 = data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 and data[24] == 16
    if not png16:
        if not data.startswith((b"II*\x00", b"MM\x00*", b"P5", b"P2")):
            return data  # JPEG, WebP, GIF, 8-bit PNG: 8 bits by format
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                if not im.mode.startswith("I;16"):
                    return data
        except Exception:
            return data
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint16:
        return data
    ok, buf = cv2.imencode(".png", (img >> 8).astype(np.uint8))
    return buf.tobytes() if ok else data


def checked_create_connection(
    address,
    timeout=socket._GLOBAL_DEFAULT_TIMEOUT,
    source_address=None,
    *,
    allow_private: bool | None = None,
):
    """``socket.create_connection`` that refuses a non-public peer before anything is sent.

    The URL pre-check (:mod:`pipeline.download.urlcheck`) sees only the text of a URL; this sees the
    address the name actually resolved to, so it also stops redirects to internal addresses and
    DNS answers that point a public name at one. Raises ``ConnectionRefusedError`` whose message
    starts with ``refused_address``.
    """
    allow = _LIMITS["allow_private"] if allow_private is None else allow_private
    sock = socket.create_connection(address, timeout, source_address)
    if not allow:
        peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
        if not is_public_address(peer):
            sock.close()
            raise ConnectionRefusedError(
                f"refused_address: {address[0]} is {peer}, not a public address"
            )
    return sock


class _CheckedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = checked_create_connection


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = checked_create_connection


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_CheckedHTTPConnection, req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_CheckedHTTPSConnection, req, context=self._context)


def _opener() -> urllib.request.OpenerDirector:
    # Behind a proxy (http_proxy in the environment) the peer is the proxy, whose address says
    # nothing about the target: keep urllib's own handlers there and rely on the pre-check.
    if urllib.request.getproxies():
        return urllib.request.build_opener()
    return urllib.request.build_opener(_CheckedHTTPHandler, _CheckedHTTPSHandler)


_OPENER = _opener()


def download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """img2dataset's ``download_image`` with Primer's limits (see the module docstring).

    Returns ``(key, BytesIO or None, error message or None)`` like the original.
    """
    key, url = row
    max_bytes, max_pixels = _LIMITS["max_bytes"], _LIMITS["max_pixels"]
    agent = _USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": agent})
        with _OPENER.open(request, timeout=timeout) as r:
            if disallowed_header_directives and _downloader.is_disallowed(
                r.headers, user_agent_token, disallowed_header_directives
            ):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            ctype = (r.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype.startswith(("text/", "application/json", "application/xml")):
                return key, None, f"not an image (Content-Type {ctype})"
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                return key, None, f"image too large: {length} bytes > {max_bytes}"
            data = r.read(max_bytes + 1)  # never more than the cap in memory
        if len(data) > max_bytes:
            return key, None, f"image too large: more than {max_bytes} bytes"
        pixels = header_pixels(data)
        if pixels is not None and pixels > max_pixels:
            return key, None, f"image too large: {pixels} pixels > {max_pixels}"
        return key, io.BytesIO(to_8bit(data)), None
    except Exception as err:  # img2dataset records every failure as a message, as we do
        return key, None, str(err) or type(err).__name__


_downloader._primer_original_download_image = _ORIGINAL
_downloader.download_image = download_image


class LimitedDownloader(_downloader.Downloader):
    """img2dataset's Downloader carrying Primer's limits to wherever it is unpickled.

    Args (besides img2dataset's): ``max_image_bytes`` (response size cap), ``max_image_pixels``
    (declared width x height cap), ``allow_private`` (lets non-public peers through: test
    servers and the offline demo only).
    """

    def __init__(
        self, *args, max_image_bytes: int, max_image_pixels: int, allow_private: bool, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.limits = {
            "max_bytes": int(max_image_bytes),
            "max_pixels": int(max_image_pixels),
            "allow_private": bool(allow_private),
        }

    def __call__(self, row):
        _LIMITS.update(self.limits)
        return super().__call__(row)


class _NoLogger:
    """Stands in for img2dataset's LoggerProcess (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        self.done_shards: set[int] = set()

    def start(self) -> None:
        pass

    def join(self, timeout=None) -> None:
        pass

    def terminate(self) -> None:
        pass


def multiprocessing_distributor(
    processes_count, downloader, reader, _subjob_size, max_shard_retry, total=None
):
    """img2dataset's multiprocessing distributor on a preloaded forkserver, with a progress bar."""
    import multiprocessing

    from pipeline.core.progress import progress

    ctx = multiprocessing.get_context("forkserver")
    # Takes effect when this process starts its forkserver (once); later runs reuse it.
    ctx.set_forkserver_preload([__name__])
    with ctx.Pool(processes_count, maxtasksperchild=5) as pool:

        def run(gen):
            failed = []
            for status, row in progress(
                pool.imap_unordered(downloader, gen),
                total=total,
                desc="shards",
                unit="shard",
                mininterval=2,
            ):
                if status is False:
                    failed.append(row)
            return failed

        failed = run(reader)
        retrier(run, failed, max_shard_retry)
        pool.terminate()
        pool.join()


@contextlib.contextmanager
def patched(
    max_image_bytes: int,
    max_image_pixels: int,
    allow_private: bool,
    total_shards: int | None = None,
) -> Iterator[None]:
    """Install Primer's parts into ``img2dataset.main`` for one ``download`` call, then restore."""
    import functools

    names = ("Downloader", "LoggerProcess", "multiprocessing_distributor")
    saved = {n: getattr(_i2d_main, n) for n in names}
    _LIMITS.update(
        max_bytes=int(max_image_bytes),
        max_pixels=int(max_image_pixels),
        allow_private=bool(allow_private),
    )
    _i2d_main.Downloader = functools.partial(
        LimitedDownloader,
        max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels,
        allow_private=allow_private,
    )
    _i2d_main.LoggerProcess = _NoLogger
    _i2d_main.multiprocessing_distributor = functools.partial(
        multiprocessing_distributor, total=total_shards
    )
    t0 = time.perf_counter()
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(_i2d_main, n, v)
        log.debug("img2dataset ran %.1f s", time.perf_counter() - t0)
