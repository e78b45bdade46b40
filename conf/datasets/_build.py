"""How conf/datasets/*.yaml were made (kept for provenance; not run by CI).

Sources, read from local copies (no network at run time):
- openai/CLIP ``data/prompts.md``: class names and templates of StanfordCars, FGVCAircraft,
  Flowers102, Food101, OxfordPets and SUN397 (the CLIP paper's zero-shot prompts);
- open_clip ``zero_shot_metadata``: ImageNet's cleaned class names and OpenAI's 80 templates;
- clip_benchmark ``datasets/cupl_prompts.json``: CuPL's descriptions of the 1000 ImageNet classes;
- hendrycks/imagenet-r ``eval.py`` (``all_wnids``, ``imagenet_r_wnids``) and
  hendrycks/natural-adv-examples ``eval.py`` (``thousand_k_to_200``): the 200-class subsets.

Usage: python conf/datasets/_build.py PROMPTS_MD CUPL_JSON IMAGENET_R_EVAL IMAGENET_A_EVAL
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def parse_prompts_md(text: str) -> dict[str, dict[str, list[str]]]:
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


def assignment(path: str, name: str):
    tree = ast.parse(Path(path).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(name)


def write(name: str, source: str, layout: str, classes, templates, descriptions=None, indices=None, synonyms=None):
    doc = {"name": name, "source": source, "layout": layout, "classes": list(classes), "templates": list(templates), "synonyms": synonyms or {}, "descriptions": descriptions}
    if indices is not None:
        doc["imagenet_indices"] = list(indices)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000)
    (HERE / f"{name}.yaml").write_text(text, encoding="utf-8")
    assert yaml.safe_load(text)["classes"] == list(classes)


def main(prompts_md: str, cupl_json: str, r_eval: str, a_eval: str) -> None:
    sys.path.insert(0, str(HERE.parent.parent))
    from pipeline.torchcompat import import_open_clip

    import_open_clip()
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    templates_in = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    # OpenAI's cleaned names repeat two: 744 (n04008634 "projectile, missile") and 836
    # (n04355933 "sunglass") duplicate 657 "missile" and 837 "sunglasses". Duplicates would make
    # every caption naming them ambiguous, so those two take their other WordNet lemma.
    original = list(IMAGENET_CLASSNAMES)
    IMAGENET_CLASSNAMES = list(original)
    IMAGENET_CLASSNAMES[744] = "projectile"
    IMAGENET_CLASSNAMES[836] = "sunglass"
    assert len(set(IMAGENET_CLASSNAMES)) == 1000
    p = parse_prompts_md(Path(prompts_md).read_text(encoding="utf-8"))
    clip_src = "openai/CLIP data/prompts.md (the CLIP paper's zero-shot class names and templates)"
    write("StanfordCars", clip_src, "StanfordCars", p["StanfordCars"]["classes"], p["StanfordCars"]["templates"])
    write("FGVCAircraft", clip_src, "FGVCAircraft", p["FGVCAircraft"]["classes"], p["FGVCAircraft"]["templates"])
    write("Flowers102", clip_src, "Flowers102", p["Flowers102"]["classes"], p["Flowers102"]["templates"])
    write("Food101", clip_src, "Food101", p["Food101"]["classes"], p["Food101"]["templates"])
    # Pets: the label order is the dataset's CLASS-ID order (case-insensitive alphabetical, as
    # torchvision reads it), which clip_benchmark's list keeps and prompts.md (cats first) does not.
    cb = json.loads((Path(cupl_json).parent / "en_classnames.json").read_text(encoding="utf-8"))
    assert sorted(cb["pets"], key=str.lower) == cb["pets"] and len(cb["pets"]) == 37
    write("OxfordIIITPet", "clip_benchmark en_classnames.json (torchvision label order); templates from openai/CLIP data/prompts.md", "OxfordIIITPet", cb["pets"], p["OxfordPets"]["templates"],
          synonyms={"Yorkshire Terrier": ["Yorkie"], "Staffordshire Bull Terrier": ["Staffy", "Staffie"], "German Shorthaired": ["German Shorthaired Pointer"]})
    write("SUN397", clip_src, "SUN397", p["SUN397"]["classes"], p["SUN397"]["templates"])
    # CuPL descriptions keyed by our class names (the JSON uses the same cleaned names).
    cupl = json.loads(Path(cupl_json).read_text(encoding="utf-8"))["imagenet1k"]
    cupl = {new: cupl[old] for new, old in zip(IMAGENET_CLASSNAMES, original)}
    missing = [c for c in IMAGENET_CLASSNAMES if c not in cupl]
    if missing:
        raise SystemExit(f"CuPL file lacks {len(missing)} classes, e.g. {missing[:5]}")
    (HERE / "descriptions").mkdir(exist_ok=True)
    (HERE / "descriptions" / "ImageNet.json").write_text(json.dumps({c: cupl[c] for c in IMAGENET_CLASSNAMES}, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    in_src = "open_clip zero_shot_metadata (cleaned ImageNet class names, OpenAI's 80 templates; labels 744 and 836 renamed projectile and sunglass to remove duplicates); CuPL descriptions from clip_benchmark"
    for name in ("ImageNet", "ImageNet-V2", "ImageNet-Sketch"):
        write(name, in_src, "imagefolder", IMAGENET_CLASSNAMES, templates_in, "descriptions/ImageNet.json")
    all_wnids = assignment(r_eval, "all_wnids")
    r_wnids = assignment(r_eval, "imagenet_r_wnids")
    r_idx = [i for i, w in enumerate(all_wnids) if w in r_wnids]
    a_map = assignment(a_eval, "thousand_k_to_200")
    a_idx = sorted(k for k, v in a_map.items() if v != -1)
    for name, idx, src in (("ImageNet-R", r_idx, "hendrycks/imagenet-r eval.py"), ("ImageNet-A", a_idx, "hendrycks/natural-adv-examples eval.py")):
        assert len(idx) == 200, (name, len(idx))
        write(name, f"{src} (200 wnids) with open_clip's ImageNet class names", "imagefolder", [IMAGENET_CLASSNAMES[i] for i in idx], templates_in, "descriptions/ImageNet.json", idx)


if __name__ == "__main__":
    main(*sys.argv[1:5])
