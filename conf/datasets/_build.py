"""How conf/datasets/*.yaml (all but FashionMNIST.yaml) and descriptions/ImageNet.json were made.

Kept for provenance; not run by CI. Every input is a local copy (no network at run time):

  SRC/prompts.md               openai/CLIP ``data/prompts.md`` (commit d05afc43): the CLIP paper's
                               zero-shot class names and templates of StanfordCars, FGVCAircraft,
                               Flowers102, Food101, OxfordPets and SUN397
  SRC/imagenet_r_eval.py       hendrycks/imagenet-r ``eval.py`` (commit 3131cace): ``all_wnids``
                               (the 1000 ImageNet wnids in label order) and ``imagenet_r_wnids``
  SRC/imagenet_a_eval.py       hendrycks/natural-adv-examples ``eval.py`` (commit 07770705):
                               ``thousand_k_to_200`` (ImageNet-A's 200 classes as 1k indices)
  SRC/en_classnames.json       clip_benchmark 1.6.2 ``datasets/en_classnames.json``: Pets in
                               label order; ImageNet names (cross-check)
  SRC/en_zeroshot_classification_templates.json   the same release (cross-check of templates)
  SRC/cupl_prompts.json        clip_benchmark 1.6.2 ``datasets/cupl_prompts.json``: CuPL's
                               descriptions of the ImageNet classes
  SRC/cupl/<name>_prompts_full.json   sarahpratt/CuPL ``all_prompts/full_prompts/`` (commit
                               719619c8, the CuPL paper's GPT-3 descriptions, 20-90 per class)
                               for airplane, cars, flower, food, pets and sun: written to
                               descriptions/<Dataset>.json keyed by this project's class names
  SRC/clip_benchmark_builder.py   optional, clip_benchmark 1.6.2 ``datasets/builder.py``: its
                               ImageNet-A/-R wnid lists, a second source for the 200-class subsets
  open_clip (installed)        ``open_clip/zero_shot_metadata.py``: IMAGENET_CLASSNAMES (OpenAI's
                               cleaned ImageNet names) and OPENAI_IMAGENET_TEMPLATES (80 templates);
                               read as a file, so torch is not imported

Usage: python conf/datasets/_build.py SRC   (writes next to this file)

Decisions recorded here:
- ImageNet: OpenAI's cleaned names repeat two: 744 (n04008634 "projectile, missile") equals 657
  "missile" and 836 (n04355933 "sunglass") equals 837 "sunglasses". A caption naming either would
  be ambiguous and labels would not be recoverable from names, so 744 and 836 take their other
  WordNet lemma: "projectile" and "sunglass". CuPL has one entry per distinct name (998), so those
  two reuse the descriptions of "missile" and "sunglasses".
- OxfordIIITPet: label order is the dataset's CLASS-ID order (case-insensitive alphabetical, as
  the pets reader and torchvision read it), which clip_benchmark's list keeps and prompts.md's
  (cats first) does not; the templates are prompts.md's.
- SUN397: prompts.md's order (alphabetical by CLIP's names). It differs from ClassName.txt's
  order in one place ("jail cell" before "jail indoor"); the SUN397 reader matches folders by
  name, so labels follow this file.
- ImageNet-R/-A: classes are the ImageNet names at their 1k indices, in increasing-wnid (= index)
  order, which is also the sorted order of their wnid folders.
- Synonyms: a few common alternative names, each checked not to name another class.
- ``names`` and ``exclude`` sections of an existing YAML are kept as they are: exclusions are
  written by hand, names files by ``_variants.py`` (run it after this script).
- CuPL descriptions: the CuPL files name classes as the CLIP prompts do, except Pets (other
  letter case), SUN397 (qualifiers in parentheses: "apse (indoor)" for "apse indoor") and one
  car ("Ram CV Cargo Van Minivan 2012" for "Ram C/V ..."); each is matched to exactly one
  class or the build stops. FashionMNIST has no public LLM descriptions.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DESCRIPTIONS = "descriptions/ImageNet.json"

SYNONYMS = {
    "OxfordIIITPet": {
        "American Pit Bull Terrier": ["pit bull", "pitbull", "pit bull terrier"],
        "Basset Hound": ["basset"],
        "German Shorthaired": ["German Shorthaired Pointer"],
        "Great Pyrenees": ["Pyrenean Mountain Dog"],
        "Japanese Chin": ["Japanese Spaniel"],
        "Miniature Pinscher": ["min pin", "Zwergpinscher"],
        "Saint Bernard": ["St. Bernard"],
        "Scottish Terrier": ["Scottie dog", "Scotty dog", "Scottie terrier"],
        "Sphynx": ["Sphinx cat"],
        "Staffordshire Bull Terrier": ["Staffy", "Staffie"],
        "Yorkshire Terrier": ["Yorkie"],
    },
    "Flowers102": {
        # prompts.md renamed three of the dataset's own names; those stay searchable.
        "globe flower": ["globeflower", "trollius"],
        "pink and yellow dahlia": ["pink-yellow dahlia"],
        "air plant": ["ball moss", "tillandsia"],
        "colt's foot": ["coltsfoot"],
        "giant white arum lily": ["calla lily", "arum lily"],
        "peruvian lily": ["alstroemeria"],
        "pincushion flower": ["scabiosa"],
        "grape hyacinth": ["muscari"],
        "snapdragon": ["antirrhinum"],
        "sword lily": ["gladiolus", "gladioli"],
        "barbeton daisy": ["barberton daisy", "gerbera"],
        "oxeye daisy": ["ox-eye daisy"],
        "common dandelion": ["dandelion"],
        "californian poppy": ["california poppy", "eschscholzia"],
        "osteospermum": ["african daisy"],
        "lenten rose": ["hellebore", "helleborus"],
        "thorn apple": ["datura"],
        "frangipani": ["plumeria"],
        "hippeastrum": ["amaryllis"],
        "anthurium": ["flamingo flower"],
        "passion flower": ["passionflower", "passiflora"],
        "water lily": ["waterlily"],
        "black-eyed susan": ["rudbeckia"],
        "blanket flower": ["gaillardia"],
        "trumpet creeper": ["trumpet vine"],
        "english marigold": ["pot marigold", "calendula"],
        "columbine": ["aquilegia"],
        "alpine sea holly": ["eryngium"],
        "great masterwort": ["astrantia"],
    },
    "Food101": {
        "cup cakes": ["cupcake"],
        "donuts": ["doughnut", "donut"],
        "creme brulee": ["crème brûlée"],
        "macaroni and cheese": ["mac and cheese", "mac n cheese"],
        "hamburger": ["burger"],
        "omelette": ["omelet"],
        "lasagna": ["lasagne"],
        "frozen yogurt": ["frozen yoghurt", "froyo"],
        "pho": ["phở"],
    },
    "FGVCAircraft": {
        # Only one variant of each of these families is in the dataset.
        "707-320": ["Boeing 707"],
        "727-200": ["Boeing 727"],
        "A300B4": ["Airbus A300"],
        "Model B200": ["King Air"],
        "DH-82": ["Tiger Moth"],
        "DHC-6": ["Twin Otter"],
        "F-16A/B": ["F-16"],
        "F/A-18": ["F-18", "FA-18"],
        "L-1011": ["Lockheed TriStar"],
        "E-170": ["Embraer 170"],
        "E-190": ["Embraer 190"],
        "E-195": ["Embraer 195"],
        # Written without the hyphen these are one token, which the names alone would miss.
        "CRJ-200": ["CRJ200"],
        "CRJ-700": ["CRJ700"],
        "CRJ-900": ["CRJ900"],
        "SR-20": ["SR20"],
    },
}


CUPL_SRC = "CuPL descriptions from sarahpratt/CuPL all_prompts/full_prompts"
# CuPL file stem -> dataset; a class is matched by name after _cupl_key.
CUPL_FILES = {
    "airplane": "FGVCAircraft",
    "cars": "StanfordCars",
    "flower": "Flowers102",
    "food": "Food101",
    "pets": "OxfordIIITPet",
    "sun": "SUN397",
}


def _cupl_key(name: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[()]", " ", name.replace("/", ""))).strip().lower()


def cupl_descriptions(src: Path, name: str, classes: list[str]) -> str | None:
    """Write descriptions/<name>.json from CuPL's file for ``name`` (its path relative to this
    folder), or None when CuPL has none. Every class must match exactly one CuPL entry."""
    stem = {v: k for k, v in CUPL_FILES.items()}.get(name)
    path = src / "cupl" / f"{stem}_prompts_full.json"
    if stem is None or not path.exists():
        return None
    cupl = json.loads(path.read_text(encoding="utf-8"))
    by_key: dict[str, list[str]] = {}
    for k, v in cupl.items():
        assert _cupl_key(k) not in by_key, (name, k)
        by_key[_cupl_key(k)] = v
    missing = [c for c in classes if not by_key.get(_cupl_key(c))]
    if missing or len(by_key) != len(classes):
        raise SystemExit(f"{path}: {len(missing)} classes unmatched, e.g. {missing[:3]}")
    rel = f"descriptions/{name}.json"
    out = {c: by_key[_cupl_key(c)] for c in classes}
    (HERE / rel).write_text(json.dumps(out, ensure_ascii=False, separators=(",", ":")), "utf-8")
    return rel


def parse_prompts_md(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {"classes": [...], "templates": [...]}}`` from prompts.md's code blocks."""
    out = {}
    for m in re.finditer(r"^## (\S+)\s*\n+```bash\n(.*?)```", text, re.S | re.M):
        name, body = m.group(1), m.group(2)
        entry = {}
        for key in ("classes", "templates"):
            km = re.search(rf"^{key} = (\[.*?^\])", body, re.S | re.M)
            if km:
                entry[key] = ast.literal_eval(km.group(1))
        out[name] = entry
    return out


def assignment(path: Path, name: str):
    """The literal value of a top-level ``name = ...`` in a Python file (never executed)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise KeyError(f"{name} not in {path}")


def open_clip_metadata():
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / "zero_shot_metadata.py"
    mod_spec = importlib.util.spec_from_file_location("_zero_shot_metadata", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return list(module.IMAGENET_CLASSNAMES), [t("{}") for t in module.OPENAI_IMAGENET_TEMPLATES]


def write(name, source, layout, classes, templates, synonyms=None, descriptions=None, indices=None):
    classes, templates = list(classes), list(templates)
    assert all(isinstance(c, str) and c and c == c.strip() for c in classes), name
    assert len(set(classes)) == len(classes), name
    assert all(t.count("{}") == 1 for t in templates), name
    assert set(synonyms or {}) <= set(classes), name
    doc = {
        "name": name,
        "source": source,
        "layout": layout,
        "classes": classes,
        "templates": templates,
        "synonyms": synonyms or {},
        "descriptions": descriptions,
    }
    if indices is not None:
        doc["imagenet_indices"] = list(indices)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000)
    assert yaml.safe_load(text) == doc, name  # every name round-trips
    path = HERE / f"{name}.yaml"
    # Sections kept by hand (exclusions, senses) or by _variants.py (names) are carried over.
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    kept = re.findall(r"^(?:names|exclude|sense):.*\n(?:[ -].*\n|\n)*", old, re.M)
    path.write_text(text + "".join(kept), encoding="utf-8")


def main(src: str) -> None:
    src = Path(src)
    p = parse_prompts_md((src / "prompts.md").read_text(encoding="utf-8"))
    cb_names = json.loads((src / "en_classnames.json").read_text(encoding="utf-8"))
    cb_templates = json.loads(
        (src / "en_zeroshot_classification_templates.json").read_text(encoding="utf-8")
    )

    clip_src = "openai/CLIP data/prompts.md (the CLIP paper's zero-shot class names and templates)"
    for name, section, cb_key in (
        ("StanfordCars", "StanfordCars", "cars"),
        ("FGVCAircraft", "FGVCAircraft", "fgvc_aircraft"),
        ("Flowers102", "Flowers102", "flowers"),
        ("Food101", "Food101", "food101"),
        ("SUN397", "SUN397", "sun397"),
    ):
        classes, templates = p[section]["classes"], p[section]["templates"]
        assert templates == [t.replace("{c}", "{}") for t in cb_templates[cb_key]], name
        desc = cupl_descriptions(src, name, classes)
        source = clip_src + (f"; {CUPL_SRC}" if desc else "")
        write(name, source, name, classes, templates, SYNONYMS.get(name), desc)
    assert p["Flowers102"]["classes"] == cb_names["flowers"]

    pets = cb_names["pets"]
    assert len(pets) == 37 and pets == sorted(pets, key=str.lower)
    assert sorted(c.lower() for c in p["OxfordPets"]["classes"]) == [c.lower() for c in pets]
    write(
        "OxfordIIITPet",
        "clip_benchmark en_classnames.json (the dataset's class-id order); templates from openai/CLIP data/prompts.md; "
        + CUPL_SRC,
        "OxfordIIITPet",
        pets,
        p["OxfordPets"]["templates"],
        SYNONYMS["OxfordIIITPet"],
        cupl_descriptions(src, "OxfordIIITPet", pets),
    )

    original, templates_in = open_clip_metadata()
    assert original == cb_names["imagenet1k"]
    assert templates_in == [t.replace("{c}", "{}") for t in cb_templates["imagenet1k"]]
    assert (original[657], original[744], original[836], original[837]) == (
        "missile",
        "missile",
        "sunglasses",
        "sunglasses",
    )
    imagenet = list(original)
    imagenet[744] = "projectile"
    imagenet[836] = "sunglass"
    assert len(set(imagenet)) == 1000

    cupl = json.loads((src / "cupl_prompts.json").read_text(encoding="utf-8"))["imagenet1k"]
    missing = [c for c in original if not cupl.get(c)]
    if missing:
        raise SystemExit(f"CuPL file lacks {len(missing)} classes, e.g. {missing[:5]}")
    descriptions = {new: cupl[old] for new, old in zip(imagenet, original)}
    (HERE / "descriptions").mkdir(exist_ok=True)
    (HERE / DESCRIPTIONS).write_text(
        json.dumps(descriptions, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )

    in_src = (
        "open_clip zero_shot_metadata (cleaned ImageNet class names, OpenAI's 80 templates; "
        "labels 744 and 836 renamed projectile and sunglass to remove duplicates); "
        "CuPL descriptions from clip_benchmark"
    )
    for name in ("ImageNet", "ImageNet-V2", "ImageNet-Sketch"):
        write(name, in_src, "imagefolder", imagenet, templates_in, descriptions=DESCRIPTIONS)

    all_wnids = assignment(src / "imagenet_r_eval.py", "all_wnids")
    assert len(all_wnids) == 1000 and all_wnids == sorted(all_wnids)
    r_wnids = assignment(src / "imagenet_r_eval.py", "imagenet_r_wnids")
    r_idx = [i for i, w in enumerate(all_wnids) if w in r_wnids]
    a_map = assignment(src / "imagenet_a_eval.py", "thousand_k_to_200")
    a_idx = sorted(k for k, v in a_map.items() if v != -1)
    assert [a_map[k] for k in a_idx] == list(range(200))
    builder = src / "clip_benchmark_builder.py"
    if builder.exists():  # a second, independent copy of the same lists
        text = builder.read_text(encoding="utf-8")

        def grab(var):
            return ast.literal_eval(re.search(rf"^\s*{var} = (.*)$", text, re.M).group(1))

        assert grab("all_imagenet_wordnet_ids") == all_wnids
        assert set(grab("imagenet_r_wnids")) == set(r_wnids)
        assert grab("imagenet_a_wnids") == [all_wnids[i] for i in a_idx]
    for name, idx, repo in (
        ("ImageNet-R", r_idx, "hendrycks/imagenet-r eval.py"),
        ("ImageNet-A", a_idx, "hendrycks/natural-adv-examples eval.py"),
    ):
        assert len(idx) == 200, (name, len(idx))
        write(
            name,
            f"{repo} (200 wnids) with open_clip's ImageNet class names",
            "imagefolder",
            [imagenet[i] for i in idx],
            templates_in,
            descriptions=DESCRIPTIONS,
            indices=idx,
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
