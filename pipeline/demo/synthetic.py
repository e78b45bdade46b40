"""LAION-like metadata for tests, benchmarks and the offline demo.

Captions read like LAION's (product titles, stock-photo descriptions, alt text: about 67
characters on average, mixed case, punctuation, HTML entities, the odd non-English word) and
some name a class. Generation is vectorised over numpy so two million rows take seconds.

Two schemas, both real: the original LAION-2B-en parquet (``URL``, ``TEXT``, ``WIDTH``,
``HEIGHT``, ``similarity``, ``punsafe``, ``pwatermark``, ``hash``) and Re-LAION's lower-case
names (``url``, ``caption``, ``width``, ``height``, ``similarity``, ``punsafe``,
``pwatermark``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

SCHEMAS = ("laion2b", "relaion")

# Words common in LAION alt text: shops, stock photos, blogs.
_COMMON = """a the of and with for in on to by from at new free best photo image stock picture
vector illustration set collection sale buy online shop store price cheap quality high
premium vintage modern classic retro style design beautiful cute small large big white
black red blue green yellow pink brown grey gold silver wooden metal plastic leather
cotton wall art poster print canvas frame home decor kitchen garden outdoor indoor
wedding party birthday gift card cover book page template background texture pattern
isolated hand drawn watercolor cartoon icon logo sign symbol model view close up detail
summer winter spring autumn christmas holiday travel city street house room table chair
women men kids baby girl boy family people person portrait face hair dress shoes bag
shirt jacket coat hat watch ring necklace jewelry phone case cover laptop computer game
toy car road trip beach sea sky sun night light lamp flower tree forest mountain lake
river park animal dog cat bird horse fish food cake pizza coffee tea wine beer drink
recipe healthy fresh fruit vegetable salad soup bread cheese chicken meat breakfast
dinner lunch restaurant menu hotel resort spa room bathroom bedroom living interior
exterior building architecture church tower bridge castle museum map world country
flag team sport football soccer basketball tennis golf running fitness yoga bike
motorcycle truck bus train plane airport boat ship vintage antique old used 2019 2020
2021 2022 size cm mm inch pack pcs lot 1 2 3 4 5 10 100 x by amp"""
_COMMON_WORDS = np.array(sorted(set(_COMMON.split())))
_SYLLABLES = np.array(
    "ka lo mi ne ru sa ti vo ze bar den fil gor han jus kel mon pra sto tri ven wal xy".split()
)
_SEPARATORS = np.array(
    [" "] * 160 + [" - "] * 12 + [" | "] * 8 + [", "] * 14 + [" / "] * 2 + [": "] * 3 + [" &amp; "]
)
# Non-ASCII words, as in real LAION-en alt text (accents, typographic punctuation, CJK).
_NON_ASCII = np.array(
    ["café", "crème", "naïve", "–", "“new”", "size’s", "日本", "Größe", "niño", "€19,99"]
)


def _long_tail(rng: np.random.Generator, n: int) -> np.ndarray:
    """Pseudo-words (brand names, typos, other languages) for a realistic vocabulary tail."""
    a = rng.choice(_SYLLABLES, n)
    b = rng.choice(_SYLLABLES, n)
    c = rng.choice(np.array(["", "", "n", "s", "x", "er", "ia"]), n)
    return np.char.add(np.char.add(a, b), c)


def _plural(name: str) -> str:
    if len(name) > 1 and name.endswith("y") and name[-2] not in "aeiou":
        return name[:-1] + "ies"
    if name.endswith(("x", "z", "ch", "sh")):
        return name + "es"
    return name + "s"


def make_captions(
    n: int,
    classnames: Sequence[str] = (),
    match_rate: float = 0.05,
    seed: int = 0,
    mean_words: float = 10.0,
) -> tuple[list[str], np.ndarray]:
    """``n`` LAION-like captions; ``match_rate`` of them name one of ``classnames``.

    Returns ``(captions, planted)`` where ``planted[i]`` is the index of the class name
    planted in caption ``i`` or -1. A planted name may be upper-cased or pluralised, as in
    real alt text; other words can still name a class by chance (as in real data).
    """
    rng = np.random.default_rng(seed)
    tail = _long_tail(rng, 4000)
    vocab = np.concatenate([_COMMON_WORDS, tail])
    # Zipf-like weights: a few words dominate, as in real captions.
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 0.9
    weights /= weights.sum()
    lengths = np.clip(rng.poisson(mean_words, n), 2, 40)
    total = int(lengths.sum())
    words = rng.choice(vocab, total, p=weights)
    caps = rng.random(total) < 0.25
    words = np.where(caps, np.char.capitalize(words), words)
    # About 6% of captions carry a non-ASCII word.
    exotic = rng.random(total) < 0.006
    words = np.where(exotic, rng.choice(_NON_ASCII, total), words)
    seps = rng.choice(_SEPARATORS, total)
    planted = np.full(n, -1, dtype=np.int64)
    if classnames:
        hits = rng.random(n) < match_rate
        planted[hits] = rng.integers(0, len(classnames), int(hits.sum()))
    names = np.array(list(classnames) or [""], dtype=object)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    insert_at = (rng.random(n) * lengths).astype(np.int64)
    style = rng.integers(0, 6, n)
    words_l = words.tolist()
    seps_l = seps.tolist()
    out = []
    for i in range(n):
        s, ln = int(starts[i]), int(lengths[i])
        w = words_l[s : s + ln]
        if planted[i] >= 0:
            name = names[planted[i]]
            st = style[i]
            if st == 0:
                name = name.upper()
            elif st == 1:
                name = name.title()
            elif st == 2 and not name.endswith("s"):
                name = _plural(name)
            w[int(insert_at[i])] = name
        sp = seps_l[s : s + ln]
        parts = [w[0]]
        for j in range(1, ln):
            parts.append(sp[j])
            parts.append(w[j])
        out.append("".join(parts))
    return out, planted


def laion_table(
    n: int,
    classnames: Sequence[str] = (),
    schema: str = "laion2b",
    seed: int = 0,
    match_rate: float = 0.05,
    urls: Sequence[str] | None = None,
    captions: Sequence[str | None] | None = None,
) -> pa.Table:
    """A LAION-metadata table of ``n`` rows in ``schema`` (``laion2b`` or ``relaion``).

    ``urls`` and ``captions`` replace the generated ones when given (for tests that need
    known captions or URLs that point at a loopback image server).
    """
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS}")
    rng = np.random.default_rng(seed + 1)
    if captions is None:
        captions, _ = make_captions(n, classnames, match_rate, seed)
    if urls is None:
        urls = [f"https://img{i % 97}.example-cdn.com/p/{seed}/{i:09d}.jpg" for i in range(n)]
    if len(urls) != n or len(captions) != n:
        raise ValueError("urls and captions must have n entries")
    width = rng.integers(64, 2048, n).astype(np.int32)
    height = rng.integers(64, 2048, n).astype(np.int32)
    similarity = rng.uniform(0.28, 0.45, n)
    punsafe = rng.beta(0.3, 8.0, n)
    pwatermark = rng.beta(0.5, 3.0, n)
    if schema == "laion2b":
        return pa.table(
            {
                "SAMPLE_ID": pa.array(np.arange(n, dtype=np.int64) + seed * 10_000_000),
                "URL": pa.array(list(urls), pa.string()),
                "TEXT": pa.array(list(captions), pa.string()),
                "HEIGHT": pa.array(height),
                "WIDTH": pa.array(width),
                "LICENSE": pa.array(["?"] * n),
                "NSFW": pa.array(np.where(punsafe > 0.5, "NSFW", "UNLIKELY")),
                "similarity": pa.array(similarity),
                "punsafe": pa.array(punsafe.astype(np.float32)),
                "pwatermark": pa.array(pwatermark.astype(np.float32)),
            }
        )
    return pa.table(
        {
            "url": pa.array(list(urls), pa.string()),
            "caption": pa.array(list(captions), pa.string()),
            "width": pa.array(width.astype(np.int64)),
            "height": pa.array(height.astype(np.int64)),
            "similarity": pa.array(similarity),
            "punsafe": pa.array(punsafe),
            "pwatermark": pa.array(pwatermark),
            "key": pa.array([f"{i:09d}" for i in range(n)]),
        }
    )


def scan_keys(n: int, parts: int, seed: int = 0, url_share: float = 2.0) -> list[np.ndarray]:
    """Match keys (:data:`pipeline.text_filter.stage.KEY_DTYPE`) of ``n`` matches in ``parts`` scan
    parts, for the global filters: random uids; URLs drawn from ``n / url_share`` (so shared
    by several uids); a tenth of the rows of the first part found again in later ones (the
    same row in two files), a third of those under another class (ambiguous rows kept). 50
    classes."""
    from pipeline.text_filter.batch import KEY_DTYPE

    rng = np.random.default_rng(seed)
    keys = np.zeros(n, dtype=KEY_DTYPE)
    urls = rng.integers(0, 2**63, size=(max(1, int(n / url_share)), 2), dtype=np.uint64) * 2
    keys["uid_hi"], keys["uid_lo"] = (rng.integers(0, 2**63, n, dtype=np.uint64) * 2 for _ in "hl")
    u = rng.integers(0, len(urls), n)
    keys["url_hi"], keys["url_lo"] = urls[u, 0], urls[u, 1]
    keys["label"] = rng.integers(0, 50, n)
    keys["has_url"] = 1
    bounds = np.linspace(0, n, parts + 1).astype(int)
    if parts > 1:
        src = rng.integers(0, bounds[1], n // 10)
        dst = rng.integers(bounds[1], n, n // 10)
        relabel = rng.random(n // 10) < 0.3
        keys[dst] = keys[src]
        keys["label"][dst[relabel]] = (keys["label"][src[relabel]] + 1) % 50
    return [keys[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def write_scan_keys(out: str, parts: list[np.ndarray]) -> tuple[list[int], list[int]]:
    """Write ``parts`` (from :func:`scan_keys`) as the keys files of scan parts 0, 1, ... of a
    text-filter output ``out`` (local); returns their indices and record counts, as the
    driver's global pass takes them."""
    import os

    from pipeline.text_filter.config import SCAN_DIR
    from pipeline.text_filter.parts import _keys_path

    os.makedirs(os.path.join(out, SCAN_DIR), exist_ok=True)
    for i, keys in enumerate(parts):
        with open(_keys_path(out, i), "wb") as f:
            f.write(keys.tobytes())
    return list(range(len(parts))), [len(k) for k in parts]
