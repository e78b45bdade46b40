"""The demo's data: which images train the demo model, styles, and web-like captions.

Fashion-MNIST is split once, in :data:`DEMO_SPLIT`: one range of its training images trains
the shipped demo model (``scripts/train_demo_model.py``), a disjoint range is what the demo's
LAION-like pool shows, and the target task's images come from the test split. Images come in
styles (:func:`stylise`): ``photo`` is Fashion-MNIST as it is, ``faded`` the distribution
shift of the demo's task (washed-out, low-contrast prints the model never saw). Captions
(:func:`web_caption`) read like alt text: varied templates, synonyms, noise words, and a share
of wrong or uninformative captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.demo.imageserver import FASHION_CLASSES


@dataclass(frozen=True)
class DemoSplit:
    """Which Fashion-MNIST images each part of the demo uses; no two parts share an image.

    ``model_train`` and ``pool`` are index ranges of split ``source``: the images the demo
    model is trained on, and those the demo's LAION-like pool shows. ``task_split``: the split
    the target task's train (shots) and test images come from. ``model_photos`` and
    ``pool_photos``: the scikit-image photos each side uses.
    """

    source: str
    model_train: range
    pool: range
    task_split: str
    model_photos: tuple[str, ...]
    pool_photos: tuple[str, ...]

    def __post_init__(self) -> None:
        if set(self.model_train) & set(self.pool):
            raise ValueError("the demo model's training images overlap the demo's pool")
        if self.task_split == self.source:
            raise ValueError("the task's images must come from a split the model never saw")
        if set(self.model_photos) & set(self.pool_photos):
            raise ValueError("the demo model's training photos overlap the demo's pool")


DEMO_SPLIT = DemoSplit(
    source="train",
    model_train=range(0, 36000),
    pool=range(36000, 60000),
    task_split="test",
    model_photos=("camera", "cat", "hubble_deep_field", "immunohistochemistry", "retina"),
    pool_photos=("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left"),
)

# "photo" is the style of the model's training images; SHIFT_STYLE is the task's (its shots
# and test images), and most of the pool's.
STYLES = ("photo", "faded")
SHIFT_STYLE = "faded"
# faded = FADE_LIFT + FADE_CONTRAST * photo: lifted blacks, a third of the contrast gone.
FADE_CONTRAST = 0.55
FADE_LIFT = 35


def stylise(images: np.ndarray, style: str) -> np.ndarray:
    """``[N, 28, 28]`` uint8 Fashion-MNIST images in ``style``, as ``[N, 28, 28]`` uint8.

    ``photo``: unchanged (a light garment on black). ``faded``: a washed-out print (lower
    contrast, grey blacks). Deterministic, no randomness.
    """
    images = np.asarray(images, np.uint8)
    if style == "photo":
        return images
    if style == "faded":
        return np.round(FADE_LIFT + FADE_CONTRAST * images.astype(np.float32)).astype(np.uint8)
    raise ValueError(f"unknown style {style!r} (styles: {', '.join(STYLES)})")


# Words people use for each class in alt text, the dataset's class name first. The text
# filter matches the dataset's names and synonyms; the rest are misses, as on the web.
CLASS_WORDS = {
    "T-shirt": ("T-shirt", "t-shirt", "tee shirt", "tshirt", "tee", "top"),
    "trouser": ("trousers", "pants", "jeans", "trouser", "chinos"),
    "pullover": ("pullover", "sweater", "jumper", "knit sweater", "hoodie"),
    "dress": ("dress", "maxi dress", "midi dress", "sundress", "gown"),
    "coat": ("coat", "winter coat", "trench coat", "parka", "jacket"),
    "sandal": ("sandals", "sandal", "summer sandals", "flip flops", "slides"),
    "shirt": ("shirt", "button-down shirt", "flannel shirt", "blouse", "oxford shirt"),
    "sneaker": ("sneakers", "sneaker", "trainers", "running shoes", "kicks"),
    "bag": ("bag", "handbag", "tote bag", "shoulder bag", "purse"),
    "ankle boot": ("ankle boots", "ankle boot", "boots", "chelsea boots", "booties"),
}
_TEMPLATES = (
    "{w} for women - summer collection 2021",
    "Men's {w} | free shipping on orders over $50",
    "vintage {w} size {s}, cotton, {c}",
    "buy {w} online &amp; save",
    "{W} SALE 50% OFF",
    "kids {w} in {c}, pack of 2",
    "Photo of a {w} on a black background",
    "new {w} by {b} (brand new with tags)",
    "{b} {c} {w}",
    "{w}",
    "a {c} {w}",
    "my favourite {w}!!",
    "{w} - {b} - size {s}",
    "black and white photo of a {w}",
    "low res picture of {w}",
    "product photo: {w}, {c}",
    "a photo of the {w}",
    "{c} {w} for sale",
)
_STYLE_TEMPLATES = {
    "faded": (
        "vintage faded photo of a {w}",
        "old catalogue scan: {w}, {c}",
        "washed out picture of {w}",
        "{b} {w} - retro print",
        "{w} (faded, as is)",
        "grainy old photo {w} size {s}",
    ),
}
_COLOURS = ("black", "white", "grey", "navy", "red", "beige", "blue", "green", "pink")
_BRANDS = ("Kalomi", "Nordby", "Vexa", "Lumo", "Arden &amp; Co", "Trevi")
_SIZES = ("S", "M", "L", "XL")
_NOISE = ("IMG_{d}", "#ootd", "| eBay", "free shipping", "2019", "new arrivals", "on sale",
          "[{d}]", "- Pinterest", "hot!")  # fmt: skip
_UNINFORMATIVE = ("IMG_{d}.JPG", "product image", "Untitled", "click to enlarge", "image 3 of 5",
                  "Shop now", "DSC{d}", "thumbnail", "photo", "default")  # fmt: skip


@dataclass(frozen=True)
class CaptionNoise:
    """Shares of captions that mislead: ``wrong`` names a random class (perhaps the right
    one), ``uninformative`` names none; ``styled_words`` of captions of a shifted-style image
    use the style's own templates; ``noise_words`` get a tag or a number added."""

    wrong: float = 0.10
    uninformative: float = 0.10
    styled_words: float = 0.7
    noise_words: float = 0.3


def web_caption(
    rng: np.random.Generator, label: int, style: str = "photo", noise: CaptionNoise = CaptionNoise()
) -> tuple[str, int]:
    """An alt-text-like caption of an image of class ``label`` in ``style``.

    Returns ``(caption, named)``: ``named`` is the class the caption names (``label``, or
    another class for a wrong caption), -1 for an uninformative one.
    """
    r = rng.random()
    if r < noise.uninformative:
        return str(rng.choice(_UNINFORMATIVE)).format(d=int(rng.integers(1000, 9999))), -1
    if r < noise.uninformative + noise.wrong:
        label = int(rng.integers(len(FASHION_CLASSES)))
    words = CLASS_WORDS[FASHION_CLASSES[label]]
    w = str(words[int(rng.integers(len(words)))])
    templates = _TEMPLATES
    if style in _STYLE_TEMPLATES and rng.random() < noise.styled_words:
        templates = _STYLE_TEMPLATES[style]
    text = str(templates[int(rng.integers(len(templates)))]).format(
        w=w,
        W=w.upper(),
        c=_COLOURS[int(rng.integers(len(_COLOURS)))],
        b=_BRANDS[int(rng.integers(len(_BRANDS)))],
        s=_SIZES[int(rng.integers(len(_SIZES)))],
    )
    if rng.random() < noise.noise_words:
        extra = str(rng.choice(_NOISE)).format(d=int(rng.integers(1000, 9999)))
        text = f"{text} {extra}" if rng.random() < 0.7 else f"{extra} {text}"
    return text, label


# Alt text of the scikit-image photos in the model's training data (crops of each).
PHOTO_CAPTIONS = {
    "camera": ("cameraman with a film camera", "old photo of a photographer", "man, camera, tripod"),
    "cat": ("cute cat", "a tabby cat looking at the camera", "my cat IMG_2231"),
    "hubble_deep_field": ("hubble deep field galaxies", "space wallpaper", "galaxies in the night sky"),
    "immunohistochemistry": ("microscope slide, stained tissue", "histology sample", "cells under a microscope"),
    "retina": ("retina scan", "fundus photograph of an eye", "eye exam image"),
}  # fmt: skip


@dataclass(frozen=True)
class CorpusRow:
    """One training image: Fashion-MNIST image ``index`` of ``DEMO_SPLIT.source``, or
    (``index`` -1) a crop of scikit-image photo ``photo``; with its caption."""

    index: int
    photo: str
    caption: str


def training_corpus(
    seed: int = 0, photo_share: float = 0.03, noise: CaptionNoise = CaptionNoise()
) -> list[CorpusRow]:
    """The demo model's training data: every image of ``DEMO_SPLIT.model_train`` (in the
    ``photo`` style only: the shifted style is what the model never saw) with a
    :func:`web_caption`, plus ``photo_share`` as many crops of ``DEMO_SPLIT.model_photos``
    with their alt text. Seeded."""
    from pipeline.demo.imageserver import load_fashion_mnist

    rng = np.random.default_rng(seed)
    _, labels = load_fashion_mnist(DEMO_SPLIT.source)
    rows = []
    for i in DEMO_SPLIT.model_train:
        rows.append(CorpusRow(i, "", web_caption(rng, int(labels[i]), "photo", noise)[0]))
    photos = DEMO_SPLIT.model_photos
    for j in range(int(round(photo_share * len(rows)))):
        name = photos[j % len(photos)]
        caps = PHOTO_CAPTIONS[name]
        rows.append(CorpusRow(-1, name, caps[int(rng.integers(len(caps)))]))
    return rows
