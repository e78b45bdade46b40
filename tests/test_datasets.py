"""Issue 2: the dataset registry: counts, label-order anchors, templates, user YAMLs."""

from __future__ import annotations

import shutil

import pytest

from pipeline.config import ConfigError, list_datasets, load_dataset

EXPECTED = {
    "ImageNet": (1000, {0: "tench", 1: "goldfish", 999: "toilet paper"}),
    "ImageNet-V2": (1000, {0: "tench", 999: "toilet paper"}),
    "ImageNet-Sketch": (1000, {0: "tench", 999: "toilet paper"}),
    "ImageNet-R": (200, {0: "goldfish", 1: "great white shark", 199: "acorn"}),
    "ImageNet-A": (200, {0: "stingray", 1: "goldfinch", 199: "acorn"}),
    "StanfordCars": (196, {0: "AM General Hummer SUV 2000", 195: "smart fortwo Convertible 2012"}),
    "FGVCAircraft": (100, {0: "707-320", 1: "727-200", 99: "Yak-42"}),
    "Flowers102": (102, {0: "pink primrose", 101: "blackberry lily"}),
    "Food101": (101, {0: "apple pie", 100: "waffles"}),
    "OxfordIIITPet": (37, {0: "Abyssinian", 1: "American Bulldog", 36: "Yorkshire Terrier"}),
    "SUN397": (397, {0: "abbey", 1: "airplane cabin", 396: "youth hostel"}),
    "FashionMNIST": (10, {0: "T-shirt", 9: "ankle boot"}),
}


def test_every_dataset_is_registered():
    assert set(EXPECTED) <= set(list_datasets())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_anchors_templates(name):
    spec = load_dataset(name)
    count, anchors = EXPECTED[name]
    assert spec.num_classes == count
    for i, cls in anchors.items():
        assert spec.classes[i] == cls, (name, i)
    assert len(set(spec.classes)) == count and all(spec.classes)
    assert spec.templates
    for t in spec.templates:
        formatted = t.replace("{}", "X")
        assert t.count("{}") == 1 and "X" in formatted and "{" not in formatted
    assert spec.prompts(0)[0] == spec.templates[0].replace("{}", spec.classes[0])


def test_imagenet_subsets_point_into_imagenet():
    imagenet = load_dataset("ImageNet")
    for name in ("ImageNet-R", "ImageNet-A"):
        spec = load_dataset(name)
        idx = spec.imagenet_indices
        assert len(idx) == 200 and list(idx) == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < 1000
        assert [imagenet.classes[i] for i in idx] == list(spec.classes)
    assert load_dataset("ImageNet-R").imagenet_indices[0] == 1  # goldfish
    assert load_dataset("ImageNet-A").imagenet_indices[:2] == (6, 11)  # stingray, goldfinch


def test_imagenet_descriptions_cover_every_class():
    spec = load_dataset("ImageNet")
    assert spec.descriptions and all(spec.class_descriptions(i) for i in range(spec.num_classes))


def test_user_yaml_by_path_loads_like_the_bundled_name(tmp_path):
    src = load_dataset("StanfordCars")
    copy = tmp_path / "mycars.yaml"
    shutil.copy(src.path, copy)
    mine = load_dataset(str(copy))
    assert (mine.classes, mine.templates, mine.synonyms, mine.layout) == (src.classes, src.templates, src.synonyms, src.layout)


@pytest.mark.parametrize(
    "body,message",
    [
        ("classes: []\n", "non-empty list"),
        ("classes: [a, a]\n", "duplicate class name 'a'"),
        ("classes: [a, '']\n", "empty class name"),
        ("classes: [a]\ntemplates: ['{} and {}']\n", "exactly one"),
        ("classes: [a]\nsynonyms: {b: [c]}\n", "unknown class 'b'"),
        ("classes: [a]\ndescriptions: nope.json\n", "does not exist"),
        ("classes: [a\n", "not valid YAML"),
    ],
)
def test_bad_dataset_yamls_are_clear_errors(tmp_path, body, message):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=message) as e:
        load_dataset(str(p))
    assert str(p) in str(e.value)
