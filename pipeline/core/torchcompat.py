"""Import open_clip on a CPU torch whose matching torchvision wheel is a CUDA build.

The only torchvision for torch 2.13.0 on PyPI is compiled against CUDA; its C++ ops cannot
load beside the CPU torch and ``import torchvision`` fails with
``operator torchvision::nms does not exist`` while registering fake kernels for them.
open_clip needs only torchvision's pure-Python transforms, so declaring the two op schemas
(never calling them) lets the import succeed. Nothing is patched when the ops exist.
"""

from __future__ import annotations

import functools


@functools.cache
def ensure_torchvision() -> None:
    """Make ``import torchvision`` work (idempotent). A working torchvision (GPU machines) is
    imported as is; only when its ops fail to load are the two schemas declared first."""
    import sys

    import torch

    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # Keep the library object alive for the life of the process.
    ensure_torchvision._lib = lib  # type: ignore[attr-defined]
    import torchvision  # noqa: F401, F811


def import_open_clip():
    """Return the ``open_clip`` module, importing torchvision safely first."""
    ensure_torchvision()
    import open_clip

    return open_clip
