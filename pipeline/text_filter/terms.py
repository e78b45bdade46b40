"""What the matcher searches for: a dataset's match rules (:class:`MatchRules`) turned into
terms, each owned by what a hit of it means, and the token patterns each term is searched as.

Owners: a class (its name and synonyms), a family (a name several classes share, such as
``Audi S5``), an exclusion (phrases that cancel one owner's hits inside them, such as
``rose gold`` for ``rose``), a kind word (a body type or species word that rules out the
classes of other kinds). Years are no terms: the captions that name a class are searched for
them apart (:func:`caption_years`), and a year rules out the classes of a distant year, or of a
nearer sibling. Patterns: the term's tokens, its letters and digits written together or apart
(:func:`token_variants`), and the simple plural of its last token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product

import numpy as np

CLASS, FAMILY, EXCLUDED, KIND = 0, 1, 2, 3  # owner kinds; those naming classes first
# Caption tokens read as years (a model year, the year a photo was taken): only datasets with
# class years look for them.
YEARS = range(1900, 2040)
MAX_KINDS = 64  # kinds are bits of a uint64 mask
_ATOM = re.compile(r"\d+|[^\d]+")


def _tuple_map(m: Mapping | None) -> dict[str, tuple[str, ...]]:
    out = {}
    for k, v in (m or {}).items():
        out[str(k)] = tuple(str(x) for x in ([v] if isinstance(v, str) else (v or ())))
    return out


@dataclass(frozen=True)
class MatchRules:
    """A dataset's match rules (the text filter's part of :class:`pipeline.core.config.DatasetSpec`).

    ``synonyms``: class -> more names of it. ``families``: a name -> the classes (two or more)
    it may mean. ``exclude``: a name (of a class or family) -> phrases containing it in which
    it does not name that class. ``kind_words``: a caption word -> the kinds it fits (none: it
    fits no class's kind); ``class_kinds``: class -> its kinds. ``class_years``: class -> its
    year; ``max_year_gap``: a caption year further than this from a class's year rules it out
    (None: no limit).
    """

    classes: tuple[str, ...]
    synonyms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    families: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    exclude: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    kind_words: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    class_kinds: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    class_years: Mapping[str, int] = field(default_factory=dict)
    max_year_gap: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        for name in ("synonyms", "families", "exclude", "kind_words", "class_kinds"):
            object.__setattr__(self, name, _tuple_map(getattr(self, name)))
        object.__setattr__(
            self, "class_years", {str(k): int(v) for k, v in self.class_years.items()}
        )

    @classmethod
    def from_spec(cls, spec) -> MatchRules:
        """The rules of a :class:`pipeline.core.config.DatasetSpec`."""
        return cls(
            classes=spec.classes,
            synonyms=spec.synonyms,
            families=spec.families,
            exclude=spec.exclude,
            kind_words=spec.kind_words,
            class_kinds=spec.class_kinds,
            class_years=spec.class_years,
            max_year_gap=spec.max_year_gap,
        )

    def to_dict(self) -> dict:
        """Plain data (JSON): for fingerprints, and to rebuild the rules in a Spark task."""
        return {
            "classes": list(self.classes),
            "synonyms": {k: list(v) for k, v in self.synonyms.items()},
            "families": {k: list(v) for k, v in self.families.items()},
            "exclude": {k: list(v) for k, v in self.exclude.items()},
            "kind_words": {k: list(v) for k, v in self.kind_words.items()},
            "class_kinds": {k: list(v) for k, v in self.class_kinds.items()},
            "class_years": dict(self.class_years),
            "max_year_gap": self.max_year_gap,
        }

    def key(self) -> str:
        """A canonical string of the rules (a cache key)."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class Term:
    """One searchable phrase: its normalised tokens, the class it names (a family's smallest
    member; -1 for exclusions and kind words), its source text, and its owner."""

    tokens: tuple[str, ...]
    label: int
    text: str
    owner: int = -1


@dataclass(frozen=True)
class Owners:
    """What each owner means, as arrays (indexed by owner id; classes are owners 0..C-1)."""

    kind: np.ndarray  # int8: CLASS, FAMILY, EXCLUDED or KIND
    label: np.ndarray  # int64: the class; a family's smallest member; -1
    members_off: np.ndarray  # int64 [owners + 1]: the classes an owner names (CSR)
    members: np.ndarray  # int64
    target: np.ndarray  # int64: the owner an exclusion cancels; -1
    kind_mask: np.ndarray  # uint64: the kinds a kind word fits
    class_kinds: np.ndarray  # uint64 [classes]: a class's kinds (0: none, never ruled out)
    class_year: np.ndarray  # int64 [classes]: a class's year (0: none)
    year_group: np.ndarray  # int64 [classes]: classes whose names differ only in the year
    max_year_gap: int  # -1: no limit
    kinds: tuple[str, ...]  # kind names, by bit

    @property
    def plain(self) -> bool:
        """No families, kind words or years: every class hit names one class."""
        return not (np.isin(self.kind, (FAMILY, KIND)).any() or self.class_year.any())


def normalized(texts: Sequence[str]) -> list[tuple[str, ...]]:
    """The tokens of each text, normalised as captions are."""
    from pipeline.text_filter.matcher import normalize_texts

    return [tuple(t.split()) for t in normalize_texts(list(texts))] if texts else []


def _letters(atom: str) -> bool:
    return not atom[0].isdigit()


def _flexible(a: str, b: str) -> bool:
    """Whether a letter run and a digit run next to each other may be written together or
    apart (``F150``, ``F-150``): a short letter run (a model code's prefix or suffix: ``A``,
    ``MD``, ``ERJ``, ``HD``) beside a number that is not a year (``Sedan 2012`` is never
    written ``Sedan2012``)."""
    if _letters(a) == _letters(b):
        return False
    letters, digits = (a, b) if _letters(a) else (b, a)
    return len(letters) <= 4 and not (len(digits) == 4 and digits[:2] in ("19", "20"))


def token_variants(tokens: tuple[str, ...], limit: int = 4) -> list[tuple[str, ...]]:
    """``tokens`` with each letter-digit boundary (:func:`_flexible`) written joined or apart:
    ``("f", "150")`` -> ``f 150``, ``f150``; ``("a320",)`` -> ``a320``, ``a 320``. Boundaries
    between two letter runs or two digit runs are kept as written (``737 800`` is never
    ``737800``, and ``172`` never matches inside ``1720``). The first variant is ``tokens``;
    beyond ``limit`` flexible boundaries only the all-joined and all-apart forms are added."""
    atoms: list[str] = []
    joined: list[bool] = []  # joined[k]: atoms k and k+1 are in one token as written
    for t in tokens:
        parts = _ATOM.findall(t) or [t]
        if atoms:
            joined.append(False)
        for k, p in enumerate(parts):
            if k:
                joined.append(True)
            atoms.append(p)
    flex = [k for k in range(len(joined)) if _flexible(atoms[k], atoms[k + 1])]
    if not flex:
        return [tokens]
    if len(flex) <= limit:
        choices = list(product((True, False), repeat=len(flex)))
    else:
        choices = [(True,) * len(flex), (False,) * len(flex)]
    out = [tokens]
    for choice in choices:
        j = list(joined)
        for k, c in zip(flex, choice):
            j[k] = c
        toks, cur = [], atoms[0]
        for k, a in enumerate(atoms[1:]):
            if j[k]:
                cur += a
            else:
                toks.append(cur)
                cur = a
        toks.append(cur)
        if tuple(toks) not in out:
            out.append(tuple(toks))
    return out


def plural_forms(last: str) -> list[str]:
    """The token and its simple English plural: ``y`` after a consonant -> ``ies``;
    ``s``/``x``/``z``/``ch``/``sh`` -> ``es``; ``o`` -> ``s`` or ``es``; else ``s``."""
    if not last or not last[-1].isalpha():
        return [last]  # "172s" is not a plural anyone writes for a number
    if len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        return [last, last[:-1] + "ies"]
    if last.endswith(("s", "x", "z", "ch", "sh")):
        return [last, last + "es"]
    if last.endswith("o"):
        return [last, last + "s", last + "es"]
    return [last, last + "s"]


def patterns_of(tokens: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every token pattern a term is searched as (variants, then plurals of the last token)."""
    out: list[tuple[str, ...]] = []
    for v in token_variants(tokens):
        for last in plural_forms(v[-1]):
            p = v[:-1] + (last,)
            if p not in out:
                out.append(p)
    return out


def _contains(hay: tuple[str, ...], needle: tuple[str, ...]) -> bool:
    n = len(needle)
    return any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


@dataclass
class Built:
    """The terms, owners and patterns of a set of rules (:func:`build`)."""

    terms: list[Term]
    owners: Owners
    patterns: list[tuple[str, ...]]
    pattern_term: np.ndarray  # int64 [patterns]
    problems: list[str]


def build(rules: MatchRules) -> Built:
    """Terms, owners and patterns of ``rules``. ``problems`` lists what a dataset config must
    not hold (see :func:`check`); the matcher is built regardless, dropping what it cannot use.
    """
    classes = list(rules.classes)
    index = {c: i for i, c in enumerate(classes)}
    C = len(classes)
    problems: list[str] = []
    raw: list[tuple[str, int, str]] = []  # (text, owner, what)
    for i, c in enumerate(classes):
        raw.append((c, i, f"class name {c!r} (label {i})"))
    for name, syns in rules.synonyms.items():
        if name not in index:
            problems.append(f"synonyms given for unknown class {name!r}")
            continue
        raw += [(s, index[name], f"synonym {s!r} of {name!r} (label {index[name]})") for s in syns]
    # Families: one owner per distinct set of classes (its names are one owner's terms).
    fam_members: list[list[int]] = []
    fam_owner: dict[tuple[int, ...], int] = {}
    for name, members in rules.families.items():
        unknown = [m for m in members if m not in index]
        if unknown:
            problems.append(f"family {name!r} names unknown classes {unknown}")
        labels = sorted({index[m] for m in members if m in index})
        if len(labels) < 2:
            problems.append(f"family {name!r} must name two or more classes")
            if not labels:
                continue
        if tuple(labels) not in fam_owner:
            fam_owner[tuple(labels)] = C + len(fam_members)
            fam_members.append(labels)
        raw.append((name, fam_owner[tuple(labels)], f"family name {name!r}"))
    n_fam = len(fam_members)

    # Class, synonym and family names: one term per distinct token tuple and owner.
    norms = normalized([t for t, _, _ in raw])
    terms: list[Term] = []
    seen_term: set[tuple[tuple[str, ...], int]] = set()
    pattern_owner: dict[tuple[str, ...], tuple[int, str]] = {}
    owner_label = [*range(C), *(m[0] for m in fam_members)]
    term_of_name: dict[tuple[str, ...], int] = {}  # a name's tokens -> its owner (for exclude)
    for (text, owner, what), toks in zip(raw, norms):
        if not toks:
            problems.append(f"{what} has no letter or digit to match")
            continue
        for p in patterns_of(toks)[:1] + [v for v in token_variants(toks)[1:]]:
            first = pattern_owner.setdefault(p, (owner, what))
            if first[0] != owner:
                problems.append(
                    f"{first[1]} and {what} are the same name to the caption matcher "
                    f"({' '.join(p)!r})"
                )
        term_of_name.setdefault(toks, owner)
        if (toks, owner) in seen_term:
            continue
        seen_term.add((toks, owner))
        terms.append(Term(toks, owner_label[owner], text, owner))

    # Exclusions: one owner per owner they cancel.
    excl_owner: dict[int, int] = {}
    excl_raw: list[tuple[str, int]] = []
    keys = list(rules.exclude)
    for key, key_toks in zip(keys, normalized(keys)):
        target = term_of_name.get(key_toks)
        if target is None:
            problems.append(f"exclude: {key!r} is no class name, synonym or family name")
            continue
        phrases = rules.exclude[key]
        forms = patterns_of(key_toks)
        for phrase, toks in zip(phrases, normalized(list(phrases))):
            if not any(_contains(toks, f) and len(toks) > len(f) for f in forms):
                problems.append(
                    f"exclude: {phrase!r} must contain {key!r} and more words "
                    "(a phrase in which that name does not name the class)"
                )
                continue
            if toks in term_of_name:
                problems.append(f"exclude: {phrase!r} is itself a name of a class or family")
                continue
            owner = excl_owner.setdefault(target, C + n_fam + len(excl_owner))
            excl_raw.append((phrase, owner))
    for (text, owner), toks in zip(excl_raw, normalized([t for t, _ in excl_raw])):
        if (toks, owner) not in seen_term:
            seen_term.add((toks, owner))
            terms.append(Term(toks, -1, text, owner))
    n_excl = len(excl_owner)

    # Kinds and years.
    kinds = sorted({k for ks in rules.class_kinds.values() for k in ks})
    if len(kinds) > MAX_KINDS:
        problems.append(f"at most {MAX_KINDS} kinds, not {len(kinds)}")
        kinds = kinds[:MAX_KINDS]
    bit = {k: np.uint64(1) << np.uint64(i) for i, k in enumerate(kinds)}
    class_kinds = np.zeros(C, dtype=np.uint64)
    for name, ks in rules.class_kinds.items():
        if name not in index:
            problems.append(f"class_kinds given for unknown class {name!r}")
            continue
        for k in ks:
            class_kinds[index[name]] |= bit.get(k, np.uint64(0))
    base = C + n_fam + n_excl
    kind_masks: list[np.uint64] = []
    words = list(rules.kind_words)
    for word, toks in zip(words, normalized(words)):
        unknown = [k for k in rules.kind_words[word] if k not in bit]
        if unknown:
            problems.append(f"kind word {word!r} names kinds no class has: {unknown}")
        if not toks:
            problems.append(f"kind word {word!r} has no letter or digit to match")
            continue
        if toks in term_of_name:
            problems.append(f"kind word {word!r} is also a name of a class or family")
        mask = np.uint64(0)
        for k in rules.kind_words[word]:
            mask |= bit.get(k, np.uint64(0))
        owner = base + len(kind_masks)
        kind_masks.append(mask)
        terms.append(Term(toks, -1, word, owner))
    n_kind = len(kind_masks)
    class_year = np.zeros(C, dtype=np.int64)
    for name, y in rules.class_years.items():
        if name not in index:
            problems.append(f"class_years given for unknown class {name!r}")
        elif not YEARS.start <= y < YEARS.stop:
            problems.append(
                f"class_years: {name!r} has year {y}, outside {YEARS.start}-{YEARS.stop - 1}"
            )
        else:
            class_year[index[name]] = y
    # Classes whose names differ only in their year (a car's generations): a caption year
    # picks the nearest of them.
    group_key: dict[tuple[str, ...], int] = {}
    year_group = np.zeros(C, dtype=np.int64)
    for i, toks in enumerate(normalized(classes)):
        key = tuple(t for t in toks if not (class_year[i] and t == str(class_year[i])))
        year_group[i] = group_key.setdefault(key, len(group_key))

    n_owners = base + n_kind
    kind = np.empty(n_owners, dtype=np.int8)
    kind[:C], kind[C : C + n_fam], kind[C + n_fam : base] = CLASS, FAMILY, EXCLUDED
    kind[base:] = KIND
    members = [[c] for c in range(C)] + fam_members + [[]] * (n_owners - C - n_fam)
    members_off = np.zeros(n_owners + 1, dtype=np.int64)
    members_off[1:] = np.cumsum([len(m) for m in members])
    target = np.full(n_owners, -1, dtype=np.int64)
    for t, o in excl_owner.items():
        target[o] = t
    kind_mask = np.zeros(n_owners, dtype=np.uint64)
    kind_mask[base : base + n_kind] = kind_masks
    label = np.full(n_owners, -1, dtype=np.int64)
    label[: C + n_fam] = owner_label
    owners = Owners(
        kind=kind,
        label=label,
        members_off=members_off,
        members=np.array([c for m in members for c in m], dtype=np.int64),
        target=target,
        kind_mask=kind_mask,
        class_kinds=class_kinds,
        class_year=class_year,
        year_group=year_group,
        max_year_gap=-1 if rules.max_year_gap is None else int(rules.max_year_gap),
        kinds=tuple(kinds),
    )
    # Patterns: each term's, once per owner (a pattern two owners share gives two hits).
    patterns: list[tuple[str, ...]] = []
    pattern_term: list[int] = []
    seen_pattern: set[tuple[tuple[str, ...], int]] = set()
    for ti, term in enumerate(terms):
        if owners.kind[term.owner] == KIND:  # plurals ("kittens"), never letter-digit variants
            forms = [term.tokens[:-1] + (last,) for last in plural_forms(term.tokens[-1])]
        else:
            forms = patterns_of(term.tokens)
        for p in forms:
            if (p, term.owner) not in seen_pattern:
                seen_pattern.add((p, term.owner))
                patterns.append(p)
                pattern_term.append(ti)
    return Built(terms, owners, patterns, np.array(pattern_term, dtype=np.int64), problems)


def check(rules: MatchRules) -> list[str]:
    """What is wrong with ``rules`` for a dataset config (one message each): names that
    normalise to nothing or to another class's name, families of unknown classes, exclusions
    that do not contain their name, kinds and years of unknown classes."""
    return build(rules).problems


def caption_years(captions) -> tuple[np.ndarray, np.ndarray]:
    """``(row, year)`` of every year token (:data:`YEARS`) of each caption (a string array;
    tokens as the matcher reads them), in Arrow over the normalised batch."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.text_filter.matcher import _normalize

    buf, off, row_of, valid = _normalize(captions)
    text = pa.Array.from_buffers(
        pa.string(), len(off) - 1, [None, pa.py_buffer(off.astype(np.int32)), pa.py_buffer(buf)]
    )
    toks = pc.split_pattern(pc.utf8_trim_whitespace(text.filter(pa.array(valid))), " ")
    flat = pc.list_flatten(toks)
    four = np.flatnonzero(pc.binary_length(flat).to_numpy() == 4)  # a cheap test first
    cand = flat.take(pa.array(four))
    year = pc.match_substring_regex(cand, r"^(?:19|20)[0-9][0-9]$").to_numpy(zero_copy_only=False)
    rows = row_of[valid][pc.list_parent_indices(toks).to_numpy()[four[year]]]
    values = pc.cast(cand.filter(pa.array(year)), pa.int64()).to_numpy()
    inside = (values >= YEARS.start) & (values < YEARS.stop)
    return rows[inside].astype(np.int64), values[inside]
