"""Target-task images on disk: which files make a split, and their labels.

Layouts (``DatasetSpec.layout``, or ``--layout``):

- ``imagefolder``: ``root/<split>/<class>/*.jpg``. Class folders are matched to the dataset's
  class names (case, ``_``, ``-`` and ``/`` ignored); folders named by WordNet id
  (``n01440764``: ImageNet, -Sketch, -R, -A) take sorted order when there is one per class;
  folders named by label index (``0`` .. ``999``: ImageNet-V2) take that label. Anything else
  is an error naming the folders. :func:`write_imagefolder` writes this layout from arrays.
- torchvision's on-disk layouts, as its dataset classes download them: ``StanfordCars``
  (``stanford_cars/``), ``Flowers102`` (``flowers-102/``), ``FGVCAircraft``
  (``fgvc-aircraft-2013b/``), ``OxfordIIITPet`` (``oxford-iiit-pet/``), ``Food101``
  (``food-101/``), ``SUN397`` (``SUN397/``).

Class order: Food101's folders and SUN397's ``ClassName.txt`` are matched to the dataset's
names (file order, with a warning, when the names differ); Pets, Flowers102 and StanfordCars
carry 1-based label ids in torchvision's order, which the bundled configs follow.

SUN397 ships no train/test split (the reference evaluated on images it also primed with);
here each class's images are shuffled with a seed and cut in two disjoint halves, so train
and test never share an image.

Every image gets ``uid = make_uid("task:<split>/<path relative to root>", "")``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np

from pipeline.core import io
from pipeline.core.config import DatasetSpec

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
LAYOUTS = (
    "imagefolder",
    "StanfordCars",
    "Flowers102",
    "FGVCAircraft",
    "OxfordIIITPet",
    "Food101",
    "SUN397",
)


@dataclass(frozen=True)
class TaskImage:
    path: str  # absolute path
    rel: str  # path relative to root (the uid's basis)
    label: int

    def uid(self, split: str) -> str:
        return io.make_uid(f"task:{split}/{self.rel}", "")


def images_identity(items: list[TaskImage]) -> dict:
    """The identity of a task split for a fingerprint: each image's path relative to the root,
    label, size and modification time (so a moved dataset root stays the same)."""
    from pipeline.core.fingerprint import digest

    rows = []
    for it in items:
        st = os.stat(it.path)
        rows.append([it.rel, it.label, st.st_size, st.st_mtime_ns])
    return {"images": len(rows), "sha256": digest(rows)}


def _norm(name: str) -> str:
    """Folder names and class names compare case-blind, with ``_ - /`` and spaces alike."""
    return re.sub(r"[\s_\-/]+", " ", name.strip().lower()).strip()


def folder_name(classname: str) -> str:
    """A class name as a folder name (``/`` and spaces become ``_``); :func:`_norm`-equal."""
    return re.sub(r"[\s/]+", "_", classname.strip())


def _images_under(d: str) -> list[str]:
    return sorted(
        f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")
    )


def _imagefolder(spec: DatasetSpec, root: str, split: str) -> list[TaskImage]:
    base = os.path.join(root, split)
    if not os.path.isdir(base):
        raise io.InputError(
            f"{base} not found: an ImageFolder task needs {root}/{split}/<class>/<image>"
        )
    folders = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    by_name = {_norm(c): i for i, c in enumerate(spec.classes)}
    mapping: dict[str, int] = {}
    if folders and all(_norm(f) in by_name for f in folders):
        mapping = {f: by_name[_norm(f)] for f in folders}
    elif (
        folders
        and all(re.fullmatch(r"n\d{8}", f) for f in folders)
        and len(folders) == spec.num_classes
    ):
        # ImageNet and its variants: WordNet-id folders sort into the label order.
        mapping = {f: i for i, f in enumerate(folders)}
    elif folders and all(f.isdigit() and int(f) < spec.num_classes for f in folders):
        # ImageNet-V2's layout: folders named by the label index itself.
        mapping = {f: int(f) for f in folders}
    else:
        unknown = [f for f in folders if _norm(f) not in by_name][:5]
        raise io.InputError(
            f"{base}: class folders {unknown or folders[:5]} match no class of {spec.name} (folders "
            f"must be class names, one WordNet id per class, or label indices)"
        )
    out = []
    for f, label in mapping.items():
        for name in _images_under(os.path.join(base, f)):
            rel = os.path.join(split, f, name)
            out.append(TaskImage(os.path.join(root, rel), rel, label))
    return out


def _read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        raise io.InputError(f"{path} not found (expected torchvision's on-disk layout)")
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip()]


def _match_names(names: list[str], spec: DatasetSpec, where: str, key=lambda n: n) -> dict:
    """``{name: label}``: by class name when every name matches one of ``spec``'s, else by
    position when the counts agree (a warning lists the mismatches); InputError otherwise."""
    by_name = {_norm(c): i for i, c in enumerate(spec.classes)}
    if len(names) != spec.num_classes:
        raise io.InputError(
            f"{where} lists {len(names)} classes; {spec.name} has {spec.num_classes}"
        )
    found = {n: by_name.get(_norm(key(n))) for n in names}
    if all(v is not None for v in found.values()) and len(set(found.values())) == len(names):
        return found
    odd = [n for n, v in found.items() if v is None][:5]
    log.warning("%s: classes %s not named as in %s; using the file's order", where, odd, spec.name)
    return {n: i for i, n in enumerate(names)}


def _pets(spec: DatasetSpec, root: str, split: str) -> list[TaskImage]:
    base = os.path.join(root, "oxford-iiit-pet")
    lines = _read_lines(
        os.path.join(base, "annotations", "trainval.txt" if split == "train" else "test.txt")
    )
    out = []
    for ln in lines:
        name, class_id = ln.split()[:2]
        rel = os.path.join("oxford-iiit-pet", "images", f"{name}.jpg")
        out.append(TaskImage(os.path.join(root, rel), rel, int(class_id) - 1))
    return out


def _food101(spec: DatasetSpec, root: str, split: str) -> list[TaskImage]:
    base = os.path.join(root, "food-101")
    meta = os.path.join(base, "meta", f"{split}.json")
    if not os.path.exists(meta):
        raise io.InputError(f"{meta} not found (expected torchvision's Food101 layout)")
    with open(meta, encoding="utf-8") as f:
        per_class = json.load(f)
    labels = _match_names(sorted(per_class), spec, meta)
    out = []
    for cls, label in labels.items():
        for item in per_class[cls]:
            rel = os.path.join("food-101", "images", f"{item}.jpg")
            out.append(TaskImage(os.path.join(root, rel), rel, label))
    return out


def _aircraft(spec: DatasetSpec, root: str, split: str) -> list[TaskImage]:
    base = os.path.join(root, "fgvc-aircraft-2013b", "data")
    which = "trainval" if split == "train" else "test"
    by_name = {c: i for i, c in enumerate(spec.classes)}
    out = []
    for ln in _read_lines(os.path.join(base, f"images_variant_{which}.txt")):
        image_id, variant = ln.split(" ", 1)
        if variant not in by_name:
            raise io.InputError(f"FGVCAircraft variant {variant!r} is not a class of {spec.name}")
        rel = os.path.join("fgvc-aircraft-2013b", "data", "images", f"{image_id}.jpg")
        out.append(TaskImage(os.path.join(root, rel), rel, by_name[variant]))
    return out


def _loadmat(path: str) -> dict:
    if not os.path.exists(path):
        raise io.InputError(f"{path} not found (expected torchvision's on-disk layout)")
    import scipy.io

    return scipy.io.loadmat(path, squeeze_me=True)


def _flowers(spec: DatasetSpec, root: str, split: str) -> list[TaskImage]:
    base = os.path.join(root, "flowers-102")
    labels = _loadmat(os.path.join(base, "imagelabels.mat"))["labels"]
    ids = _loadmat(os.path.join(base, "setid.mat"))
    chosen = (
        np.concatenate([np.atleast_1d(ids["trnid"]), np.atleast_1d(ids["valid"])])
        if split == "train"
        else np.atleast_1d(ids["tstid"])
    )
    out = []
    for i in sorted(int(x) for x in chosen):
        rel = os.path.join("flowers-102", "jpg", f"image_{i:05d}.jpg")
        out.append(TaskImage(os.path.join(root, rel), rel, int(labels[i - 1]) - 1))
    return out


def _cars(spec: DatasetSpec, root: str, split: str) -> list[TaskImage]:
    base = os.path.join(root, "stanford_cars")
    if split == "train":
        annos = _loadmat(os.path.join(base, "devkit", "cars_train_annos.mat"))["annotations"]
        folder = "cars_train"
    else:
        annos = _loadmat(os.path.join(base, "cars_test_annos_withlabels.mat"))["annotations"]
        folder = "cars_test"
    out = []
    for a in np.atleast_1d(annos):
        rel = os.path.join("stanford_cars", folder, str(a["fname"]))
        out.append(TaskImage(os.path.join(root, rel), rel, int(a["class"]) - 1))
    return out


def _sun397(
    spec: DatasetSpec, root: str, split: str, seed: int = 0, train_fraction: float = 0.5
) -> list[TaskImage]:
    base = os.path.join(root, "SUN397")
    names = _read_lines(os.path.join(base, "ClassName.txt"))  # "/a/abbey", ...
    # "/a/apartment_building/outdoor" -> "apartment building outdoor" (CLIP's names).
    labels = _match_names(names, spec, f"{base}/ClassName.txt", lambda n: n.strip("/")[2:])
    out = []
    for cls, label in labels.items():
        d = os.path.join(base, cls.lstrip("/"))
        files = _images_under(d) if os.path.isdir(d) else []
        # A per-class seeded permutation: the same split every run, disjoint by construction.
        rng = np.random.default_rng([seed, label])
        order = rng.permutation(len(files))
        cut = int(round(len(files) * train_fraction))
        chosen = order[:cut] if split == "train" else order[cut:]
        for i in sorted(chosen.tolist()):
            rel = os.path.join("SUN397", cls.lstrip("/"), files[i])
            out.append(TaskImage(os.path.join(root, rel), rel, label))
    return out


_READERS = {
    "imagefolder": _imagefolder,
    "OxfordIIITPet": _pets,
    "Food101": _food101,
    "FGVCAircraft": _aircraft,
    "Flowers102": _flowers,
    "StanfordCars": _cars,
    "SUN397": _sun397,
}


def list_task_images(
    spec: DatasetSpec, root: str, split: str, layout: str | None = None, seed: int = 0
) -> list[TaskImage]:
    """The images of ``split`` (``train`` or ``test``) with labels in ``spec``'s label order.

    Raises :class:`pipeline.core.io.InputError` naming the missing file or folder when ``root``
    does not hold the layout, and for labels outside the dataset's classes.
    """
    if split not in ("train", "test"):
        raise io.InputError(f"split must be train or test, not {split!r}")
    layout = layout or spec.layout
    if layout not in _READERS:
        raise io.InputError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if not os.path.isdir(root):
        raise io.InputError(f"task image root {root!r} does not exist")
    images = (
        _sun397(spec, root, split, seed)
        if layout == "SUN397"
        else _READERS[layout](spec, root, split)
    )
    bad = [im for im in images if not 0 <= im.label < spec.num_classes]
    if bad:
        raise io.InputError(
            f"{root}: label {bad[0].label} of {bad[0].rel} is outside {spec.name}'s {spec.num_classes} classes"
        )
    if not images:
        raise io.InputError(f"{root}: no {split} images found in the {layout} layout")
    return images


def torchvision_download(layout: str, root: str, split: str) -> None:
    """Let torchvision download a dataset into ``root`` (needs network; clear error without)."""
    from pipeline.core.torchcompat import import_open_clip

    import_open_clip()  # makes torchvision importable on this machine's CPU torch too
    import torchvision.datasets as tvd

    if layout not in (
        "StanfordCars",
        "Flowers102",
        "FGVCAircraft",
        "OxfordIIITPet",
        "Food101",
        "SUN397",
    ):
        raise io.InputError(f"--download supports torchvision's datasets, not layout {layout!r}")
    cls = getattr(tvd, layout)
    kwargs = {"root": root, "download": True}
    if layout == "OxfordIIITPet":
        kwargs["split"] = "trainval" if split == "train" else "test"
    elif layout == "FGVCAircraft":
        kwargs["split"] = "trainval" if split == "train" else "test"
    elif layout == "Flowers102":
        kwargs["split"] = "train" if split == "train" else "test"
    elif layout in ("StanfordCars", "Food101"):
        kwargs["split"] = split
    try:
        cls(**kwargs)
    except Exception as e:
        raise io.InputError(
            f"torchvision could not download {layout} into {root} ({type(e).__name__}: {e}). It needs network "
            f"access; on an offline machine, download it elsewhere and copy it to {root}."
        ) from None


def write_imagefolder(
    images: np.ndarray,
    labels: np.ndarray,
    classnames: list[str] | tuple[str, ...],
    root: str,
    fmt: str = "png",
    size: int | None = None,
) -> list[str]:
    """Write arrays as an ImageFolder: ``root/<class folder>/<index:05d>.<fmt>``.

    Args:
        images: uint8 ``[N, H, W]`` or ``[N, H, W, 3]`` (e.g. Fashion-MNIST).
        labels: int ``[N]`` indices into ``classnames``.
        classnames: the class names in label order (folders via :func:`folder_name`, which
            :func:`list_task_images` maps back to the same labels).
        root: local directory or fsspec URL; give ``<task>/train`` or ``<task>/test`` for the
            ``imagefolder`` layout.
        fmt: ``png`` (lossless) or ``jpg``.
        size: resize to ``size`` x ``size`` px (bicubic); None keeps the array's size.

    Returns:
        The written paths, in input order. Raises ValueError for mismatched lengths or labels.
    """
    from pipeline.demo.imageserver import encode_image

    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and not (0 <= labels.min() and labels.max() < len(classnames)):
        raise ValueError(f"labels must lie in [0, {len(classnames)})")
    paths = []
    for i, (img, y) in enumerate(zip(images, labels)):
        path = io.join(root, folder_name(classnames[int(y)]), f"{i:05d}.{fmt}")
        io.write_bytes(path, encode_image(np.asarray(img, dtype=np.uint8), fmt, size))
        paths.append(path)
    return paths
