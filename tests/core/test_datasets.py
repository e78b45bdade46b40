"""The dataset registry: counts, label-order anchors, templates, synonyms, descriptions, user YAMLs.

Label-order anchors pin each file to its source (conf/datasets/_build.py says which): a class
list that is complete but shifted or re-sorted would silently mislabel every task image.
"""

from __future__ import annotations

import dataclasses
import shutil
from functools import cache
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import ConfigError, DatasetSpec, list_datasets, load_dataset
from pipeline.embed.tasks import LAYOUTS
from pipeline.text_filter.matcher import normalize_text

EXPECTED = {
    "ImageNet": (
        1000,
        {
            0: "tench",
            1: "goldfish",
            2: "great white shark",
            657: "missile",
            744: "projectile",
            836: "sunglass",
            837: "sunglasses",
            999: "toilet paper",
        },
    ),
    "ImageNet-V2": (1000, {0: "tench", 1: "goldfish", 999: "toilet paper"}),
    "ImageNet-Sketch": (1000, {0: "tench", 1: "goldfish", 999: "toilet paper"}),
    "ImageNet-R": (
        200,
        {0: "goldfish", 1: "great white shark", 2: "hammerhead shark", 199: "acorn"},
    ),
    "ImageNet-A": (200, {0: "stingray", 1: "goldfinch", 2: "junco", 198: "corn", 199: "acorn"}),
    "StanfordCars": (
        196,
        {
            0: "AM General Hummer SUV 2000",
            1: "Acura RL Sedan 2012",
            5: "Acura Integra Type R 2001",
            173: "Ram C/V Cargo Van Minivan 2012",
            195: "smart fortwo Convertible 2012",
        },
    ),
    "FGVCAircraft": (100, {0: "707-320", 1: "727-200", 72: "F-16A/B", 73: "F/A-18", 99: "Yak-42"}),
    "Flowers102": (
        102,
        {
            0: "pink primrose",
            1: "hard-leaved pocket orchid",
            11: "colt's foot",
            101: "blackberry lily",
        },
    ),
    "Food101": (101, {0: "apple pie", 1: "baby back ribs", 29: "cup cakes", 100: "waffles"}),
    # Class-id order (Bengal is label 5), not prompts.md's cats-first order.
    "OxfordIIITPet": (
        37,
        {0: "Abyssinian", 1: "American Bulldog", 5: "Bengal", 36: "Yorkshire Terrier"},
    ),
    "SUN397": (397, {0: "abbey", 1: "airplane cabin", 9: "apse indoor", 396: "youth hostel"}),
    "FashionMNIST": (10, {0: "T-shirt", 9: "ankle boot"}),
}
IMAGENET_FAMILY = ("ImageNet", "ImageNet-V2", "ImageNet-Sketch", "ImageNet-R", "ImageNet-A")
SCHEMA_KEYS = [
    "name",
    "source",
    "layout",
    "sense",
    "classes",
    "templates",
    "synonyms",
    "descriptions",
    "imagenet_indices",
    "names",
    "exclude",
]


@cache
def spec(name: str) -> DatasetSpec:
    return load_dataset(name)


def raw(name: str) -> dict:
    return yaml.safe_load(Path(spec(name).path).read_text(encoding="utf-8"))


def test_every_dataset_is_registered():
    assert set(EXPECTED) <= set(list_datasets())
    assert not [n for n in list_datasets() if n.startswith("_")]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_anchors_templates(name):
    s = spec(name)
    count, anchors = EXPECTED[name]
    assert s.name == name and Path(s.path).stem == name
    assert s.num_classes == count
    for i, cls in anchors.items():
        assert s.classes[i] == cls, (name, i)
    assert len(set(s.classes)) == count and all(s.classes)
    assert s.templates
    for t in s.templates:
        formatted = t.replace("{}", "X")
        assert (
            t.count("{}") == 1
            and "X" in formatted
            and "{" not in formatted
            and "}" not in formatted
        )
    for i in (0, count - 1):
        assert s.prompts(i) == [t.replace("{}", s.classes[i]) for t in s.templates]
    assert s.layout in LAYOUTS


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_yaml_is_the_schema_and_names_round_trip(name):
    doc = raw(name)
    keys = list(doc)
    assert keys == [k for k in SCHEMA_KEYS if k in keys], keys  # known keys, in schema order
    assert {"name", "classes", "templates", "layout"} <= set(keys)
    # Every class name is a string exactly as written (no YAML coercion to numbers or
    # booleans, no whitespace the loader would strip).
    assert all(type(c) is str for c in doc["classes"])
    assert tuple(doc["classes"]) == spec(name).classes
    assert tuple(doc["templates"]) == spec(name).templates
    assert ("imagenet_indices" in keys) == (name in ("ImageNet-R", "ImageNet-A"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_names_and_synonyms_stay_distinct_for_the_caption_matcher(name):
    """Captions are matched after normalisation (case, punctuation): two classes that
    normalise alike, or a synonym that names another class, could never be told apart."""
    s = spec(name)
    owner: dict[str, str] = {}
    for c in s.classes:
        key = normalize_text(c)
        assert key, c
        assert key not in owner, (c, owner.get(key))
        owner[key] = c
    for c, terms in s.synonyms.items():
        assert c in s.classes and terms
        for t in terms:
            key = normalize_text(t)
            assert key and owner.setdefault(key, c) == c, (c, t, owner[key])


def test_some_synonyms_are_given():
    assert "Yorkie" in spec("OxfordIIITPet").synonyms["Yorkshire Terrier"]
    assert "ball moss" in spec("Flowers102").synonyms["air plant"]  # the dataset's own name
    assert "cupcake" in spec("Food101").synonyms["cup cakes"]
    assert "crème brûlée" in spec("Food101").synonyms["creme brulee"]  # non-ASCII round-trips


def test_prompts_keep_apostrophes_and_slashes():
    assert spec("Flowers102").prompts(11) == ["a photo of a colt's foot, a type of flower."]
    assert spec("FGVCAircraft").prompts(73)[0] == "a photo of a F/A-18, a type of aircraft."


def test_imagenet_variants_share_imagenet_names_and_templates():
    imagenet = spec("ImageNet")
    assert len(imagenet.templates) == 80 and imagenet.templates[0] == "a bad photo of a {}."
    for name in ("ImageNet-V2", "ImageNet-Sketch"):
        assert spec(name).classes == imagenet.classes
    for name in IMAGENET_FAMILY:
        assert spec(name).templates == imagenet.templates
        assert spec(name).layout == "imagefolder"


def test_imagenet_subsets_point_into_imagenet():
    imagenet = spec("ImageNet")
    for name in ("ImageNet-R", "ImageNet-A"):
        s = spec(name)
        idx = s.imagenet_indices
        assert len(idx) == 200 and all(b > a for a, b in zip(idx, idx[1:]))
        assert 0 <= idx[0] and idx[-1] < 1000
        assert [imagenet.classes[i] for i in idx] == list(s.classes)
    assert spec("ImageNet-R").imagenet_indices[:3] == (1, 2, 4)  # goldfish, great white, hammerhead
    assert spec("ImageNet-A").imagenet_indices[:3] == (6, 11, 13)  # stingray, goldfinch, junco
    assert spec("ImageNet-A").imagenet_indices[-1] == spec("ImageNet-R").imagenet_indices[-1] == 988
    # The two subsets overlap but differ.
    shared = set(spec("ImageNet-R").imagenet_indices) & set(spec("ImageNet-A").imagenet_indices)
    assert len(shared) == 86


@pytest.mark.parametrize("name", IMAGENET_FAMILY)
def test_imagenet_descriptions_cover_every_class(name):
    s = spec(name)
    assert raw(name)["descriptions"] == "descriptions/ImageNet.json"
    assert s.descriptions
    for i in range(s.num_classes):
        sentences = s.class_descriptions(i)
        assert sentences and all(isinstance(x, str) and x.strip() for x in sentences), s.classes[i]


def test_imagenet_descriptions_are_keyed_by_imagenet_names():
    assert list(spec("ImageNet").descriptions) == list(spec("ImageNet").classes)


CUPL = {  # dataset -> (a class, a phrase its CuPL sentences contain)
    "FGVCAircraft": ("A380", "A380"),
    "StanfordCars": ("Ram C/V Cargo Van Minivan 2012", "Ram"),
    "Flowers102": ("sunflower", "sunflower"),
    "Food101": ("sushi", "sushi"),
    "OxfordIIITPet": ("Abyssinian", "Abyssinian"),
    "SUN397": ("apse indoor", "apse"),
}


@pytest.mark.parametrize("name", sorted(CUPL))
def test_cupl_descriptions_cover_every_class_under_its_own_name(name):
    """CuPL's files name some classes differently (letter case, SUN397's parentheses, one car);
    _build.py keyed them by this project's names."""
    s = spec(name)
    assert raw(name)["descriptions"] == f"descriptions/{name}.json"
    assert list(s.descriptions) == list(s.classes)
    assert all(s.class_descriptions(i) for i in range(s.num_classes))
    cls, phrase = CUPL[name]
    text = " ".join(s.descriptions[cls]).lower()
    assert phrase.lower() in text, (name, cls)


def test_fashion_mnist_says_why_it_has_no_descriptions():
    text = (Path(spec("FashionMNIST").path)).read_text(encoding="utf-8")
    assert raw("FashionMNIST")["descriptions"] is None and "No public LLM-generated" in text


def test_descriptions_can_be_skipped():
    """The text filter loads a dataset without its descriptions; the rest is the same."""
    from pipeline.core.config import load_dataset

    full, bare = load_dataset("ImageNet"), load_dataset("ImageNet", descriptions=False)
    assert bare.descriptions is None and full.descriptions
    assert (bare.classes, bare.templates, bare.synonyms) == (
        full.classes,
        full.templates,
        full.synonyms,
    )
    assert bare.class_descriptions(0) == []


def test_user_yaml_by_path_loads_like_the_bundled_name(tmp_path):
    src = spec("StanfordCars")
    copy = tmp_path / "mycars.yaml"
    shutil.copy(src.path, copy)
    # Its names file is found next to it, as descriptions are (a missing one is an error).
    with pytest.raises(ConfigError, match="names file .* does not exist"):
        load_dataset(str(copy))
    (tmp_path / "names").mkdir()
    shutil.copy(Path(src.path).parent / "names" / "StanfordCars.yaml", tmp_path / "names")
    (tmp_path / "descriptions").mkdir()  # the YAML names its CuPL file relative to itself
    shutil.copy(
        Path(src.path).parent / "descriptions" / "StanfordCars.json", tmp_path / "descriptions"
    )
    mine = load_dataset(str(copy))
    assert mine.path == str(copy)
    assert dataclasses.replace(mine, path=src.path) == src
    assert load_dataset(copy) == mine  # a Path works as well as a str


def test_user_yaml_with_descriptions_resolves_them_next_to_itself(tmp_path):
    src = spec("ImageNet-R")
    shutil.copy(src.path, tmp_path / "imr.yaml")
    (tmp_path / "descriptions").mkdir()
    shutil.copy(Path(src.path).parent / "descriptions" / "ImageNet.json", tmp_path / "descriptions")
    mine = load_dataset(str(tmp_path / "imr.yaml"))
    assert dataclasses.replace(mine, path=src.path) == src


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
        # match rules (issue 20)
        ("classes: [rose]\nexclude: {rose: [gold rush]}\n", "'gold rush' must contain 'rose'"),
        ("classes: [rose]\nexclude: {rose: [rose]}\n", "must contain 'rose' and more words"),
        ("classes: [rose]\nexclude: {tulip: [tulip bulb]}\n", "'tulip' is no class name"),
        ("classes: [rose, desert rose]\nexclude: {rose: [desert rose]}\n", "itself a name"),
        ("classes: [a, b]\nfamilies: {ab: [a, c]}\n", "family 'ab' names unknown classes"),
        ("classes: [a, b]\nfamilies: {x: [a]}\n", "two or more classes"),
        ("classes: [a, b]\nfamilies: {a: [a, b]}\n", "the same name to the caption matcher"),
        ("classes: [a]\nclass_kinds: {b: [k]}\n", "class_kinds given for unknown class 'b'"),
        ("classes: [a]\nclass_kinds: {a: [k]}\nkind_words: {w: [z]}\n", "kinds no class has"),
        ("classes: [a]\nclass_kinds: {a: [k]}\nkind_words: {a: [k]}\n", "also a name"),
        ("classes: [a]\nclass_years: {a: 1492}\n", "outside 1900-2039"),
        ("classes: [a]\nclass_years: {a: soon}\n", "integer years"),
        ("classes: [a]\nmax_year_gap: -1\n", "max_year_gap"),
        ("classes: [a]\nnames: nope.yaml\n", "names file .* does not exist"),
        ("classes: [a]\nexclude: [a b]\n", "'exclude' must map names"),
    ],
)
def test_bad_dataset_yamls_are_clear_errors(tmp_path, body, message):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=message) as e:
        load_dataset(str(p))
    assert str(p) in str(e.value)


# Captions each bundled dataset's rules must match to a class (its name), to a family (a list
# of names: kept with all of them as candidates), or not at all (None).
RULE_CASES = {
    "StanfordCars": [
        (
            "2013 Hyundai Elantra GLS",
            ["Hyundai Elantra Sedan 2007", "Hyundai Elantra Touring Hatchback 2012"],
        ),
        ("2013 Hyundai Elantra GLS sedan", "Hyundai Elantra Sedan 2007"),
        ("Audi S5 Cabriolet", "Audi S5 Convertible 2012"),
        ("Audi S5", ["Audi S5 Convertible 2012", "Audi S5 Coupe 2012"]),
        ("1992 Ford F150 Pickup", "Ford F-150 Regular Cab 2007"),
        ("2011 Ford F-150 XLT regular cab", "Ford F-150 Regular Cab 2012"),
        (
            "Bugatti Veyron",
            ["Bugatti Veyron 16.4 Convertible 2009", "Bugatti Veyron 16.4 Coupe 2009"],
        ),
        ("2012 Audi S4", "Audi S4 Sedan 2012"),
        ("2008 Audi S4 sedan", "Audi S4 Sedan 2007"),
        ("Chevy Camaro convertible", "Chevrolet Camaro Convertible 2012"),
        ("2014 VW Golf GTI", "Volkswagen Golf Hatchback 2012"),
        ("1989 Volkswagen Golf", "Volkswagen Golf Hatchback 1991"),
        ("Mercedes-Benz C300 4MATIC", "Mercedes-Benz C-Class Sedan 2012"),
        ("Merc E350 sedan", "Mercedes-Benz E-Class Sedan 2012"),
        ("Chevrolet Express cargo van", "Chevrolet Express Cargo Van 2007"),
        ("Chevy Express", ["Chevrolet Express Cargo Van 2007", "Chevrolet Express Van 2007"]),
        ("Dodge Ram 3500 crew cab", "Dodge Ram Pickup 3500 Crew Cab 2010"),
        (
            "Lamborghini Gallardo LP570-4 Superleggera",
            "Lamborghini Gallardo LP 570-4 Superleggera 2012",
        ),
        ("Range Rover in the snow", "Land Rover Range Rover SUV 2012"),
        ("Audi S4 Avant", None),  # a wagon: no S4 wagon class
        ("Ford Mustang GT coupe", None),  # the class is the convertible
        ("1965 Ford Mustang convertible", None),  # a classic: 42 years from the class
        ("Audi TT Roadster", None),
        ("Range Rover Evoque", None),  # another model
        ("Eagle Talon", "Eagle Talon Hatchback 1998"),
        ("bald eagle talon", None),
    ],
    "FGVCAircraft": [
        ("Boeing 737-800 on approach", "737-800"),
        ("B737-800", "737-800"),
        ("KLM 737 800", "737-800"),
        (
            "Boeing 737",
            [
                "737-200",
                "737-300",
                "737-400",
                "737-500",
                "737-600",
                "737-700",
                "737-800",
                "737-900",
            ],
        ),
        ("Boeing 737 MAX 8", None),
        ("A-320 taking off", "A320"),
        ("Airbus A330", ["A330-200", "A330-300"]),
        ("Cessna 172", "Cessna 172"),
        ("Cessna 1720", None),
        ("CRJ200 at the gate", "CRJ-200"),
        ("Dash 8", ["DHC-8-100", "DHC-8-300"]),
        ("Panavia Tornado GR4", "Tornado"),
        ("tornado warning issued", None),
        ("shot at f/16, ISO 100", None),
    ],
    "OxfordIIITPet": [
        ("Bengal kitten for sale", "Bengal"),
        ("Bengal tiger", None),
        ("Cincinnati Bengals jersey", None),
        ("Boxer puppy", "Boxer"),
        ("boxer shorts", None),
        ("Persian rug", None),
        ("Persian cat", "Persian"),
        ("Siamese fighting fish", None),
        ("Yorkie", "Yorkshire Terrier"),
        ("Newfoundland and Labrador", None),
        ("Boxer kitten costume", None),  # a species word beside the breed: another animal
        ("Bombay duck curry", None),
        ("a boy with a rabbit and a pit bull", "American Pit Bull Terrier"),  # beside, not anywhere
        ("Pug and a kitten", "Pug"),
    ],
    "Flowers102": [
        ("a red rose", "rose"),
        ("rose gold necklace", None),
        ("Desert Rose in bloom", "desert-rose"),
        ("desert rose selenite crystal", None),
        ("Qualcomm Snapdragon 888", None),
        ("snapdragon flowers", "snapdragon"),
        ("Lotus Elise", None),
    ],
    "Food101": [
        ("chocolate cupcake", "cup cakes"),
        ("cupcake liners", None),
        ("Tiramisu lip pencil", None),
        ("hamburger menu icon", None),
        ("pizza stone", None),
    ],
    "ImageNet": [
        ("tank top", None),
        ("army tank", "tank"),
        ("Fig. 3: results", None),
        ("fresh fig", "fig"),
        ("Jaguar F-Type", None),
        ("jaguar in the jungle", "jaguar"),
        ("dishwasher safe coffee mug", "coffee mug"),
        ("Tiger Woods", None),
    ],
    "SUN397": [
        ("baby shower cake", None),
        ("chocolate bar", None),
        ("a bar in Dublin", "bar"),
        ("trench coat", None),
        ("runway show", None),
    ],
    "FashionMNIST": [
        ("dress pants", "trouser"),
        ("red dress", "dress"),
        ("coat of arms", None),
        ("personal trainer", None),
    ],
}


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_bundled_rules_case_by_case(name):
    """Issue 20: the bundled names files and exclusions, on captions that must match a class,
    a family, or nothing."""
    import pyarrow as pa

    from pipeline.text_filter.matcher import Matcher
    from pipeline.text_filter.terms import MatchRules

    s = spec(name)
    m = Matcher.from_rules(MatchRules.from_spec(s))
    caps = [c for c, _ in RULE_CASES[name]]
    r = m.match(pa.array(caps))
    cands = r.candidates()
    wrong = {}
    for i, (cap, want) in enumerate(RULE_CASES[name]):
        lab = int(r.label[i])
        got = (
            [s.classes[c] for c in cands[i]]
            if i in cands
            else (s.classes[lab] if lab >= 0 else None)
        )
        if got != want:
            wrong[cap] = got
    assert not wrong, wrong


def test_every_bundled_exclusion_is_a_longer_phrase_of_its_name():
    """Beside load_dataset's check: an exclusion names the class inside it, so a caption that
    is just the exclusion is never matched to that class."""
    import pyarrow as pa

    from pipeline.text_filter.matcher import Matcher
    from pipeline.text_filter.terms import MatchRules

    for name in list_datasets():
        s = spec(name)
        if not s.exclude:
            continue
        m = Matcher.from_rules(MatchRules.from_spec(s))
        keys = {k: normalize_text(k) for k in s.exclude}
        phrases = [(k, p) for k, ps in s.exclude.items() for p in ps]
        r = m.match(pa.array([p for _, p in phrases]))
        owner = {t.tokens: t.owner for t in m.terms if t.label >= 0}
        for (k, p), lab in zip(phrases, r.label.tolist()):
            target = owner[tuple(keys[k].split())]
            members = m.owners.members[
                m.owners.members_off[target] : m.owners.members_off[target + 1]
            ]
            assert lab not in members.tolist(), (name, k, p)
