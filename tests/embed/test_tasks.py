"""Target-task image layouts (pipeline/embed/tasks.py): ImageFolder and torchvision's on-disk trees.

The torchvision trees are built here file by file as torchvision's dataset classes leave them
after a download (same folder names, annotation files and .mat structures), so the readers
are checked against the real layouts without the datasets.
"""

from __future__ import annotations

import json
import os
import urllib.request

import numpy as np
import pytest

from pipeline.core import io
from pipeline.core.config import DatasetSpec, load_dataset
from pipeline.demo.imageserver import fashion_mnist_bytes, load_fashion_mnist
from pipeline.embed.tasks import (
    folder_name,
    list_task_images,
    torchvision_download,
    write_imagefolder,
)

JPEG = fashion_mnist_bytes("test", 0)


def _spec(classes, layout="imagefolder"):
    return DatasetSpec(name="toy", classes=tuple(classes), templates=("a {}.",), layout=layout)


def test_write_imagefolder_round_trip_with_fashion_mnist(tmp_path):
    images, labels = load_fashion_mnist("test")
    names = ["T-shirt/top", "trouser", "pullover", "dress", "coat"]
    keep = np.flatnonzero(labels < 5)[:20]
    root = str(tmp_path / "task")
    paths = write_imagefolder(images[keep], labels[keep], names, os.path.join(root, "train"))
    assert len(paths) == 20 and all(os.path.exists(p) for p in paths)
    assert folder_name("T-shirt/top") == "T-shirt_top"
    items = list_task_images(_spec(names), root, "train")
    by_path = {it.path: it.label for it in items}
    assert [by_path[p] for p in paths] == labels[keep].tolist()  # labels survive the round trip
    assert items[0].uid("train") == io.make_uid(f"task:train/{items[0].rel}", "")
    with pytest.raises(ValueError, match="labels must lie"):
        write_imagefolder(images[:1], [7], names[:2], str(tmp_path / "x"))


def test_imagefolder_folder_names_wnids_indices_and_mismatch(tmp_path):
    spec = _spec(["great white shark", "tench", "goldfish"])
    for folders, expect in (
        (
            ["Tench", "great_white_shark", "GOLDFISH"],
            {"Tench": 1, "great_white_shark": 0, "GOLDFISH": 2},
        ),
        (["n01440764", "n01443537", "n01484850"], {"n01440764": 0, "n01443537": 1, "n01484850": 2}),
        (["0", "2"], {"0": 0, "2": 2}),  # ImageNet-V2's folders are label indices
    ):
        root = tmp_path / "_".join(folders)
        for f in folders:
            (root / "test" / f).mkdir(parents=True)
            (root / "test" / f / "a.jpg").write_bytes(JPEG)
        items = list_task_images(spec, str(root), "test")
        assert {it.rel.split("/")[1]: it.label for it in items} == expect
    bad = tmp_path / "bad"
    for f in ("tench", "catfish"):
        (bad / "test" / f).mkdir(parents=True)
        (bad / "test" / f / "a.jpg").write_bytes(JPEG)
    with pytest.raises(io.InputError, match="catfish"):
        list_task_images(spec, str(bad), "test")
    with pytest.raises(io.InputError, match="not found"):
        list_task_images(spec, str(bad), "train")


def test_flowers102_layout(tmp_path):
    """flowers-102/{jpg/image_%05d.jpg, imagelabels.mat, setid.mat}, labels 1-based."""
    import scipy.io

    base = tmp_path / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    labels = np.array([1, 2, 3, 1, 2, 3, 102, 5])
    for i in range(1, len(labels) + 1):
        (base / "jpg" / f"image_{i:05d}.jpg").write_bytes(JPEG)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": labels[None, :]})
    scipy.io.savemat(
        base / "setid.mat",
        {
            "trnid": np.array([[1, 2]]),
            "valid": np.array([[3]]),
            "tstid": np.array([[4, 5, 6, 7, 8]]),
        },
    )
    spec = load_dataset("Flowers102")
    train = list_task_images(spec, str(tmp_path), "train")
    test = list_task_images(spec, str(tmp_path), "test")
    assert [t.label for t in train] == [0, 1, 2] and [t.label for t in test] == [0, 1, 2, 101, 4]
    assert test[0].rel == os.path.join("flowers-102", "jpg", "image_00004.jpg")
    assert not {t.rel for t in train} & {t.rel for t in test}


def test_stanford_cars_layout(tmp_path):
    """stanford_cars/{devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, ...}."""
    import scipy.io

    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    dt = [("fname", "O"), ("class", "O")]
    train = np.array([("00001.jpg", 1), ("00002.jpg", 196)], dtype=dt)
    test = np.array([("00001.jpg", 3)], dtype=dt)
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": train[None, :]})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": test[None, :]})
    spec = load_dataset("StanfordCars")
    tr = list_task_images(spec, str(tmp_path), "train")
    assert [(t.rel, t.label) for t in tr] == [
        (os.path.join("stanford_cars", "cars_train", "00001.jpg"), 0),
        (os.path.join("stanford_cars", "cars_train", "00002.jpg"), 195),
    ]
    assert [t.label for t in list_task_images(spec, str(tmp_path), "test")] == [2]


def test_food101_and_aircraft_layouts(tmp_path):
    food = load_dataset("Food101")
    meta = tmp_path / "food-101" / "meta"
    meta.mkdir(parents=True)
    per_class = {
        folder_name(c).lower(): [f"{folder_name(c).lower()}/{i}" for i in range(2)]
        for c in food.classes
    }
    (meta / "train.json").write_text(json.dumps(per_class))
    items = list_task_images(food, str(tmp_path), "train")
    assert len(items) == 2 * food.num_classes
    assert {it.label for it in items if "waffles" in it.rel} == {food.classes.index("waffles")}

    air = load_dataset("FGVCAircraft")
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "images_variant_trainval.txt").write_text(
        f"1025794 {air.classes[5]}\n0034309 {air.classes[0]}\n"
    )
    (data / "images_variant_test.txt").write_text(f"1514522 {air.classes[99]}\n")
    assert [t.label for t in list_task_images(air, str(tmp_path), "train")] == [5, 0]
    (data / "images_variant_test.txt").write_text("1514522 Concorde-2\n")
    with pytest.raises(io.InputError, match="Concorde-2"):
        list_task_images(air, str(tmp_path), "test")


def test_sun397_split_is_seeded_disjoint_and_name_matched(tmp_path):
    spec = load_dataset("SUN397")
    base = tmp_path / "SUN397"
    names = [f"/{c[0].lower()}/{c.replace(' ', '_')}" for c in spec.classes]
    for rel in names[:3]:
        (base / rel.lstrip("/")).mkdir(parents=True)
        for j in range(7):
            (base / rel.lstrip("/") / f"sun_{j}.jpg").write_bytes(b"x")
    (base / "ClassName.txt").write_text("\n".join(names) + "\n")
    train = list_task_images(spec, str(tmp_path), "train")
    test = list_task_images(spec, str(tmp_path), "test")
    assert len(train) + len(test) == 21 and abs(len(train) - len(test)) <= 3
    assert not {t.rel for t in train} & {t.rel for t in test}
    assert [t.rel for t in train] == [t.rel for t in list_task_images(spec, str(tmp_path), "train")]
    assert {t.label for t in train} <= {0, 1, 2}
    other = list_task_images(spec, str(tmp_path), "train", seed=1)
    assert {t.rel for t in other} != {t.rel for t in train}  # the seed chooses the split
    (base / "ClassName.txt").write_text("\n".join(names[:10]) + "\n")
    with pytest.raises(io.InputError, match="lists 10 classes"):
        list_task_images(spec, str(tmp_path), "train")


def test_missing_layout_files_are_named(tmp_path):
    with pytest.raises(io.InputError, match="trainval.txt"):
        list_task_images(load_dataset("OxfordIIITPet"), str(tmp_path), "train")
    with pytest.raises(io.InputError, match="unknown layout"):
        list_task_images(load_dataset("OxfordIIITPet"), str(tmp_path), "train", layout="coco")
    with pytest.raises(io.InputError, match="does not exist"):
        list_task_images(load_dataset("OxfordIIITPet"), str(tmp_path / "nope"), "train")


def test_download_without_network_fails_clearly(tmp_path, monkeypatch):
    """torchvision's own download, pointed at a closed loopback proxy: the request never
    leaves 127.0.0.1, and the error says what to do."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    # urlopen caches one opener per process, with the proxies of its first call: the one built
    # here is dropped afterwards, or later loopback requests would go to the dead proxy.
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(io.InputError, match="needs network") as e:
        torchvision_download("Flowers102", str(tmp_path), "train")
    assert "copy it to" in str(e.value)
    with pytest.raises(io.InputError, match="torchvision's datasets"):
        torchvision_download("imagefolder", str(tmp_path), "train")
