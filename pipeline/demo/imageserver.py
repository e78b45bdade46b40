"""Real images served from loopback, for tests, benchmarks and the offline demo.

Image sources that exist offline:
- Fashion-MNIST (Debian's ``dataset-fashion-mnist``: 70k labelled 28x28 photos of clothes),
- scikit-image's bundled photos (astronaut, chelsea the cat, coffee, rocket, ...).

:class:`ImageServer` is a threaded ``http.server`` bound to 127.0.0.1 (never another address)
with routes for the failure modes a downloader must survive::

    /fmnist/<split>/<index>.jpg|png   a Fashion-MNIST image (upscaled, RGB)
    /fmnist/<split>/<style>/<index>.jpg|png   the same in a style of :mod:`pipeline.demo.data`
    /skimage/<name>.jpg|png           a scikit-image photo
    /status/<code>                    an empty response with that HTTP status (404, 500, ...)
    /slow/<seconds>/<path>            <path> after a delay
    /truncated/<path>                 the first half of <path>'s bytes (a truncated image)
    /notimage/<anything>              an HTML page served as text/html
    /garbage/<anything>               random bytes claiming to be image/jpeg
    /noai/<path>                      <path> with ``X-Robots-Tag: noai, noimageai``
    /reset/<anything>                 the connection is closed without a response
    /bomb.png                         a PNG declaring 30000x30000 pixels (a decompression bomb)
    /awkward/<name>                   a real but awkward image (see :func:`awkward_images`):
                                      cmyk.jpg, gray16.png, rgb16.png, animated.gif,
                                      1x1.png, rgba.png, palette.png
"""

from __future__ import annotations

import gzip
import io as _io
import logging
import os
import struct
import threading
import time
import zlib
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = os.environ.get("PRIMER_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "cat",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle_left",
    "retina",
)


_LOAD_LOCK = threading.Lock()


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` from Debian's IDX files (cached).

    ``split`` is ``train`` (60k) or ``test`` (10k). Raises ``FileNotFoundError`` with the
    package to install when the files are missing. Thread-safe: the server's request threads
    share one decoded copy.
    """
    with _LOAD_LOCK:
        return _load_fashion_mnist(split)


@lru_cache(maxsize=2)
def _load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` from Debian's IDX files.

    ``split`` is ``train`` (60k) or ``test`` (10k). Raises ``FileNotFoundError`` with the
    package to install when the files are missing.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    img_path = os.path.join(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz")
    lbl_path = os.path.join(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz")
    if not os.path.exists(img_path):
        raise FileNotFoundError(
            f"{img_path} not found: install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist, done by `make install`) or set PRIMER_FASHION_MNIST"
        )
    with gzip.open(img_path, "rb") as f:
        magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != 2051:
            raise ValueError(f"{img_path}: not an IDX image file")
        images = np.frombuffer(f.read(n * rows * cols), dtype=np.uint8).reshape(n, rows, cols)
    with gzip.open(lbl_path, "rb") as f:
        magic, n2 = struct.unpack(">II", f.read(8))
        labels = np.frombuffer(f.read(n2), dtype=np.uint8).astype(np.int64)
    return images, labels


def encode_image(array: np.ndarray, fmt: str = "jpg", size: int | None = None) -> bytes:
    """Encode an HxW or HxWx3 uint8 array as JPEG or PNG, optionally resized to ``size`` px."""
    from PIL import Image

    img = Image.fromarray(array)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if size:
        img = img.resize((size, size), Image.BICUBIC)
    buf = _io.BytesIO()
    img.save(buf, format="JPEG" if fmt in ("jpg", "jpeg") else "PNG", quality=90)
    return buf.getvalue()


@lru_cache(maxsize=4096)
def fashion_mnist_bytes(
    split: str, index: int, fmt: str = "jpg", size: int = 64, style: str = "photo"
) -> bytes:
    """Fashion-MNIST image ``index`` of ``split`` in ``style``, encoded at ``size`` px."""
    from pipeline.demo.data import stylise

    images, _ = load_fashion_mnist(split)
    return encode_image(stylise(images[index : index + 1], style)[0], fmt, size)


@lru_cache(maxsize=64)
def skimage_bytes(name: str, fmt: str = "jpg") -> bytes:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype != np.uint8:
        arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-9)).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    return encode_image(arr, fmt)


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG that declares ``width x height`` grey pixels (decompresses to ~900 MB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    raw = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * width
    body = b"".join(raw.compress(row) for _ in range(64)) + raw.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@lru_cache(maxsize=1)
def awkward_images() -> dict[str, bytes]:
    """Real images in the modes and shapes that trip decoders, built with Pillow from the
    scikit-image cat: a CMYK JPEG, a 16-bit greyscale PNG (a ramp, mode ``I;16``), a 16-bit
    RGB PNG, a two-frame animated GIF, a 1x1 PNG, an RGBA PNG and a palette (``P``) PNG with
    transparency.
    Returns ``{file name: bytes}``."""
    from PIL import Image

    def enc(img, fmt: str, **kw) -> bytes:
        buf = _io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    photo = Image.open(_io.BytesIO(skimage_bytes("chelsea"))).convert("RGB")
    small = photo.resize((80, 60))
    ramp = np.linspace(0, 65535, 96 * 64).reshape(64, 96).astype(np.uint16)
    return {
        "cmyk.jpg": enc(photo.convert("CMYK"), "JPEG"),
        "gray16.png": enc(Image.fromarray(ramp), "PNG"),
        "rgb16.png": _png_rgb16(np.asarray(small).astype(np.uint16) * 257),
        "animated.gif": enc(
            small, "GIF", save_all=True, append_images=[small.rotate(90)], duration=50, loop=0
        ),
        "1x1.png": enc(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "rgba.png": enc(photo.convert("RGBA"), "PNG"),
        "palette.png": enc(small.convert("P"), "PNG", transparency=0),
    }


def _png_rgb16(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG of an ``[H, W, 3]`` uint16 array (Pillow cannot write one)."""
    h, w, _ = rgb.shape
    rows = rgb.astype(">u2").reshape(h, w * 6 // 2).view(np.uint8).reshape(h, w * 6)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "PrimerTestImageServer/1.0"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        log.debug("imageserver: " + format, *args)

    def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        self.server.hits += 1  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0].lstrip("/")
        try:
            result = self.server.resolve(path)  # type: ignore[attr-defined]
        except Exception as e:  # a bad path in a test server is a 404, not a crash
            log.debug("imageserver: %s -> %s", path, e)
            result = (404, b"not found", "text/plain", {})
        if result is None:  # connection reset
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return
        self._send(*result)


class ImageServer:
    """A loopback HTTP server of real images and failure modes (see the module docstring).

    Use as a context manager; ``url(path)`` builds a full URL. Binds 127.0.0.1 only.
    """

    def __init__(self, port: int = 0, image_size: int = 64):
        self.image_size = image_size
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.resolve = self.resolve  # type: ignore[attr-defined]
        self._httpd.hits = 0  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hits(self) -> int:
        return self._httpd.hits  # type: ignore[attr-defined]

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def start(self) -> ImageServer:
        # Decode the training images before the first request, not under a client's timeout.
        if os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
            load_fashion_mnist("train")
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="imageserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def resolve(self, path: str):
        """Map a request path to ``(status, body, content type, headers)``; ``None`` resets."""
        parts = path.split("/")
        head = parts[0]
        if head == "fmnist":
            from pipeline.demo.data import STYLES

            split, name = parts[1], parts[-1]
            style = parts[2] if len(parts) == 4 else "photo"
            if style not in STYLES:
                return 404, b"no such style", "text/plain", {}
            index, ext = name.rsplit(".", 1)
            body = fashion_mnist_bytes(split, int(index), ext, self.image_size, style)
            return 200, body, "image/jpeg" if ext == "jpg" else "image/png", {}
        if head == "skimage":
            name, ext = parts[1].rsplit(".", 1)
            if name not in SKIMAGE_PHOTOS:
                return 404, b"no such photo", "text/plain", {}
            return 200, skimage_bytes(name, ext), "image/jpeg" if ext == "jpg" else "image/png", {}
        if head == "status":
            return int(parts[1]), b"", "text/plain", {}
        if head == "slow":
            time.sleep(float(parts[1]))
            return self.resolve("/".join(parts[2:]))
        if head == "truncated":
            code, body, ctype, headers = self.resolve("/".join(parts[1:]))
            return code, body[: len(body) // 2], ctype, headers
        if head == "notimage":
            return 200, b"<html><body>this is not an image</body></html>", "text/html", {}
        if head == "garbage":
            rng = np.random.default_rng(abs(hash(path)) % (2**32))
            return 200, rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(), "image/jpeg", {}
        if head == "noai":
            code, body, ctype, headers = self.resolve("/".join(parts[1:]))
            return code, body, ctype, {**headers, "X-Robots-Tag": "noai, noimageai"}
        if head == "reset":
            return None
        if head == "bomb.png":
            return 200, _bomb_bytes(), "image/png", {}
        if head == "awkward":
            body = awkward_images().get(parts[1])
            if body is None:
                return 404, b"no such image", "text/plain", {}
            ext = parts[1].rsplit(".", 1)[1]
            return 200, body, "image/jpeg" if ext == "jpg" else f"image/{ext}", {}
        return 404, b"not found", "text/plain", {}


@lru_cache(maxsize=1)
def _bomb_bytes() -> bytes:
    return png_bomb()
