"""Byte and pixel limits for img2dataset's fetches.

img2dataset 1.47 reads a whole response into memory (``r.read()``) and decodes it with
OpenCV before checking its area, so one multi-gigabyte response or one decompression bomb can
exhaust a worker's memory. It runs its workers with the ``spawn`` start method, so a patch in
the parent is not inherited; instead :class:`LimitedDownloader` (the class img2dataset pickles
to its workers) lives in this module, and importing this module, in the parent and in every
worker that unpickles the downloader, installs :func:`download_image` in its place.

Limits come from the environment, which spawned workers inherit:
``PRIMER_MAX_IMAGE_BYTES`` (response size) and ``PRIMER_MAX_IMAGE_PIXELS`` (declared width x
height, read from the image header before anything is decoded).
"""

from __future__ import annotations

import io
import os
import urllib.request

import img2dataset.downloader as _downloader

_ORIGINAL = getattr(_downloader, "_primer_original_download_image", _downloader.download_image)
_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


def _limits() -> tuple[int, int]:
    return int(os.environ.get("PRIMER_MAX_IMAGE_BYTES", 32 * 2**20)), int(os.environ.get("PRIMER_MAX_IMAGE_PIXELS", 89_478_485))


def header_pixels(data: bytes) -> int | None:
    """Width x height declared by an image header (Pillow reads only the header), or None."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # we judge the size ourselves, from the header alone
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            return int(w) * int(h)
    except Exception:  # not an image Pillow knows: img2dataset's decoder will judge it
        return None


def download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """img2dataset's ``download_image`` with a byte cap, a content-type check and a pixel cap.

    Returns ``(key, BytesIO or None, error message or None)`` like the original.
    """
    key, url = row
    max_bytes, max_pixels = _limits()
    agent = _USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": agent})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            if disallowed_header_directives and _downloader.is_disallowed(r.headers, user_agent_token, disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            ctype = (r.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype.startswith(("text/", "application/json", "application/xml")):
                return key, None, f"not an image (Content-Type {ctype})"
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                return key, None, f"image too large: {length} bytes > {max_bytes}"
            data = r.read(max_bytes + 1)
        if len(data) > max_bytes:
            return key, None, f"image too large: more than {max_bytes} bytes"
        pixels = header_pixels(data)
        if pixels is not None and pixels > max_pixels:
            return key, None, f"image too large: {pixels} pixels > {max_pixels}"
        return key, io.BytesIO(data), None
    except Exception as err:  # img2dataset records every failure as a message, as we do
        return key, None, str(err)


_downloader._primer_original_download_image = _ORIGINAL
_downloader.download_image = download_image


class LimitedDownloader(_downloader.Downloader):
    """img2dataset's Downloader; unpickling it in a worker imports this module (the patch)."""
