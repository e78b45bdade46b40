"""Match captions to class names, a batch at a time (the pure core of the text filter).

Rules (a superset of the reference's SQLite FTS phrase query ``TEXT MATCH '"<name>"'``):

- case-insensitive, Unicode NFKC, HTML entities unescaped;
- any run of characters that is not a letter or digit separates tokens, in captions and in
  class names alike (``Rolls-Royce`` == ``rolls royce``, ``men's`` == ``men s``);
- whole tokens only (``cat`` never inside ``catalog``, ``172`` never inside ``1720``);
- the simple English plural of a term's last token also matches (``s``, ``es``,
  ``y`` -> ``ies``);
- per-class synonyms match as their class;
- a match inside a longer match of another class does not count (``rose`` in ``desert rose``);
- a caption that still names two or more classes is *ambiguous*.

How it is fast: a batch of captions is normalised with one numpy byte lookup table over the
whole batch's string buffer (ASCII letters and digits lower-cased, everything else a space);
only rows with non-ASCII bytes or ``&`` first go through Arrow kernels (HTML entities, NFKC,
Unicode lower case and punctuation) and, for the few with an entity that decodes to a letter,
Python's ``html.unescape``. Runs of spaces are collapsed (numpy), so every term is one literal
pattern `` tok tok `` and a multi-pattern engine scans the whole buffer once. Rows end in
``\n``, which no pattern contains, so no match spans two rows; match offsets are mapped back to
rows with ``searchsorted``, and the containment and ambiguity rules are resolved with numpy
over all hits at once. Engines (both build in milliseconds for 1000 class names):

- ``hyperscan`` (Intel's SIMD literal matcher; ``auto`` picks it where it imports): scans a
  batch in about a millisecond, so most of its cost is the per-hit Python callback;
- ``ahocorasick`` (``ahocorasick_rs``, portable Rust, DFA, overlapping matches): about
  150 MB/s here, because every space in a caption starts a pattern prefix.

bench/text_filter.py measures both.
"""

from __future__ import annotations

import html
import logging
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

_SPACE = 32
_NEWLINE = 10
# ASCII letters/digits -> lower case; every other ASCII byte -> space. Bytes >= 0x80 belong to
# multi-byte UTF-8 characters, which the Unicode path has already normalised for those rows.
_LUT = np.full(256, _SPACE, dtype=np.uint8)
for _c in range(256):
    if _c >= 128:
        _LUT[_c] = _c
    elif chr(_c).isalnum():
        _LUT[_c] = ord(chr(_c).lower())
_LUT_BYTES = _LUT.tobytes()
# Entities that decode to punctuation or spaces are separators either way: replace them in
# Arrow. Only rows still holding an entity (``&eacute;``, ``&#65;``, ``&amp`` without ``;``)
# go through Python's html.unescape.
_SEPARATOR_ENTITIES = (
    r"&(?:amp|quot|lt|gt|nbsp|apos|ndash|mdash|#0*(?:3[2-9]|4[0-7]|39|34)|#x0*(?:2[0-9a-fA-F]));"
)
_ANY_ENTITY = r"&(?:#[0-9xX]|[A-Za-z])"
# Invisible format characters (zero-width spaces and joiners, bidi controls, soft hyphen, BOM)
# are deleted, not treated as separators: "c\u200bat" reads "cat" on screen, so it matches.
_INVISIBLE = "[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]"
# Anything that is not a letter or a number (Unicode categories L*, N*) separates tokens.
# ASCII punctuation is left to the byte table (cheaper than a Unicode class in RE2).
_NON_WORD = r"[^\x00-\x7f\p{L}\p{N}]+"


def normalize_text(text: str) -> str:
    """Normalise one string exactly as :meth:`Matcher.normalize_batch` does (same kernels),
    tokens joined by single spaces."""
    return normalize_texts([text])[0]


def normalize_texts(texts: Sequence[str]) -> list[str]:
    """:func:`normalize_text` over many strings at once (class names and synonyms)."""
    buf, off = Matcher.normalize_batch(pa.array(list(texts), pa.string()))
    data = buf.tobytes()
    return [" ".join(data[off[i] : off[i + 1]].decode("utf-8").split()) for i in range(len(texts))]


def _plural_forms(last: str) -> list[str]:
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


# Compiled hyperscan databases by pattern list: every Spark task of a job builds the same one.
_HS_CACHE: dict = {}


@dataclass(frozen=True)
class Term:
    """One searchable phrase: its normalised tokens, the class it names, and its source text."""

    tokens: tuple[str, ...]
    label: int
    text: str


def build_terms(
    classes: Sequence[str], synonyms: Mapping[str, Iterable[str]] | None = None
) -> list[Term]:
    """Terms for every class name and synonym (normalised; empty ones skipped).

    Raises ``ValueError`` for synonyms of a class that is not in ``classes``.
    """
    index = {c: i for i, c in enumerate(classes)}
    raw: list[tuple[str, int]] = [(c, i) for i, c in enumerate(classes)]
    for name, syns in (synonyms or {}).items():
        if name not in index:
            raise ValueError(f"synonyms given for unknown class {name!r}")
        raw.extend((s, index[name]) for s in syns)
    terms, seen = [], set()
    for (text, label), norm in zip(raw, normalize_texts([t for t, _ in raw])):
        tokens = tuple(norm.split())
        if not tokens or (tokens, label) in seen:
            continue
        seen.add((tokens, label))
        terms.append(Term(tokens, label, text))
    return terms


@dataclass
class BatchMatches:
    """Per-row outcome of matching one batch.

    ``label[i]`` is the class of row ``i`` (-1: no match, -2: ambiguous); ``term[i]`` the
    index (into ``Matcher.terms``) of the term that decided it; ``labels_all[i]`` lists
    ``(label, term)`` for every class an ambiguous row names, by label (for ``keep_ambiguous``).
    """

    label: np.ndarray
    term: np.ndarray
    labels_all: dict[int, list[tuple[int, int]]]


class Matcher:
    """Multi-pattern caption matcher for one dataset's class names and synonyms.

    ``engine`` is ``auto`` (hyperscan where it imports, else ahocorasick), ``hyperscan`` or
    ``ahocorasick``. Raises ``ValueError`` when no class name has a token, ``ImportError``
    when ``hyperscan`` is asked for and missing.
    """

    def __init__(
        self,
        classes: Sequence[str],
        synonyms: Mapping[str, Iterable[str]] | None = None,
        engine: str = "auto",
    ):
        self.classes = list(classes)
        self.terms = build_terms(classes, synonyms)
        if not self.terms:
            raise ValueError("no class names to match")
        self.engine = self._pick_engine(engine)
        # Each variant (term x plural form) is one literal pattern " tok tok "; pattern -> term.
        variants: list[tuple[str, ...]] = []
        pattern_term: list[int] = []
        for ti, term in enumerate(self.terms):
            for last in _plural_forms(term.tokens[-1]):
                variants.append(term.tokens[:-1] + (last,))
                pattern_term.append(ti)
        self._pattern_term = np.array(pattern_term, dtype=np.int64)
        patterns = [(" " + " ".join(v) + " ").encode() for v in variants]
        self._pattern_len = np.array([len(p) for p in patterns], dtype=np.int64)
        self._term_label = np.array([t.label for t in self.terms], dtype=np.int64)
        if self.engine == "hyperscan":
            key = tuple(patterns)
            if key not in _HS_CACHE:
                _HS_CACHE.clear()  # one dataset per process at a time; keep memory bounded
                _HS_CACHE[key] = self._compile_hyperscan(patterns)
            self._db = _HS_CACHE[key]
        else:
            import ahocorasick_rs

            self._ac = ahocorasick_rs.BytesAhoCorasick(
                patterns, implementation=ahocorasick_rs.Implementation.DFA
            )

    @staticmethod
    def _pick_engine(engine: str) -> str:
        if engine not in ("auto", "hyperscan", "ahocorasick"):
            raise ValueError(f"engine must be auto, hyperscan or ahocorasick, not {engine!r}")
        if engine in ("auto", "hyperscan"):
            try:
                import hyperscan  # noqa: F401

                return "hyperscan"
            except ImportError:
                if engine == "hyperscan":
                    raise
        return "ahocorasick"

    @staticmethod
    def _compile_hyperscan(patterns: list[bytes]):
        import hyperscan

        # Every byte escaped: the patterns are literals, and \xNN keeps UTF-8 bytes intact.
        # Literals without start-of-match tracking compile in milliseconds and scan at memory
        # speed (a regex " tok +tok " on an uncollapsed buffer compiled in 3 s, scanned 3x
        # slower); the start is the end minus the pattern's length.
        exprs = [b"".join(b"\\x%02x" % b for b in p) for p in patterns]
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=exprs, ids=list(range(len(exprs))), elements=len(exprs), flags=0)
        return db

    # ------------------------------------------------------------------ normalisation

    @staticmethod
    def normalize_batch(captions: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Normalise a string array into one byte buffer.

        Returns ``(buffer uint8, offsets int64 [n+1])``: row ``i`` is
        ``buffer[offsets[i]:offsets[i+1]]``: a space, its tokens separated by single spaces, a
        space (only one for an empty row) and ``\n``. Nulls become empty rows.
        """
        if isinstance(captions, pa.ChunkedArray):
            captions = captions.combine_chunks()
        if not pa.types.is_string(captions.type):
            captions = captions.cast(pa.string())
        arr = captions.fill_null("")
        # Unicode path only for rows that need it: HTML entities, and non-ASCII (NFKC, Unicode
        # lower-casing and punctuation). LAION-en captions are mostly plain ASCII, for which
        # the byte table below does all the work.
        offsets, values = _buffers(arr)
        amp = values == ord("&")
        pos = np.flatnonzero(amp | (values >= 128))
        if len(pos):
            pos_row = np.searchsorted(offsets, pos, side="right") - 1
            rows = np.unique(pos_row)
            needs = np.zeros(len(arr), dtype=bool)
            needs[rows] = True
            has_amp = np.zeros(len(arr), dtype=bool)
            has_amp[pos_row[amp[pos]]] = True
            fixed = _normalize_unicode(arr.take(pa.array(rows)), has_amp[rows])
            arr = pc.replace_with_mask(arr, pa.array(needs), fixed)
        arr = pc.binary_join_element_wise(" ", arr, " \n", "")
        offsets, values = _buffers(arr)
        # bytes.translate runs the byte table about 3x faster than numpy fancy indexing.
        buf = np.frombuffer(bytearray(values.tobytes().translate(_LUT_BYTES)), dtype=np.uint8)
        buf[offsets[1:] - 1] = _NEWLINE
        return _collapse(buf, offsets)

    # ------------------------------------------------------------------ matching

    def _raw_matches(self, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All pattern hits in a normalised buffer: ``(pattern ids, start offsets)``."""
        if self.engine == "hyperscan":
            ids: list[int] = []
            ends: list[int] = []
            add_id, add_end = ids.append, ends.append

            def on_match(pid, start, end, flags, ctx):
                add_id(pid)
                add_end(end)

            self._db.scan(buf.tobytes(), match_event_handler=on_match)
            pid = np.array(ids, dtype=np.int64)
            return pid, np.array(ends, dtype=np.int64) - self._pattern_len[pid]
        hits = self._ac.find_matches_as_indexes(buf, overlapping=True)
        if not hits:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        h = np.asarray(hits, dtype=np.int64)
        return h[:, 0], h[:, 1]

    def match(self, captions: pa.Array) -> BatchMatches:
        """Match a batch of captions (a string array; nulls never match).

        Returns :class:`BatchMatches`.
        """
        n = len(captions)
        label = np.full(n, -1, dtype=np.int64)
        term = np.full(n, -1, dtype=np.int64)
        labels_all: dict[int, list[tuple[int, int]]] = {}
        if n == 0:
            return BatchMatches(label, term, labels_all)
        buf, offsets = self.normalize_batch(captions)
        pid, start = self._raw_matches(buf)
        if len(pid) == 0:
            return BatchMatches(label, term, labels_all)
        end = start + self._pattern_len[pid]
        # Patterns hold no "\n", so every hit lies inside one row.
        rows = np.searchsorted(offsets, start, side="right") - 1
        terms = self._pattern_term[pid]
        labels = self._term_label[terms]
        order = np.lexsort((start, rows))
        start, end, rows, terms, labels = (x[order] for x in (start, end, rows, terms, labels))
        # Rows naming exactly one class (the common case) resolve at once.
        first = np.r_[True, rows[1:] != rows[:-1]]
        gstart = np.flatnonzero(first)
        single = np.minimum.reduceat(labels, gstart) == np.maximum.reduceat(labels, gstart)
        label[rows[gstart[single]]] = labels[gstart[single]]
        term[rows[gstart[single]]] = terms[gstart[single]]
        if single.all():
            return BatchMatches(label, term, labels_all)
        # Rows naming several classes: drop every hit that lies inside a longer hit of another
        # class (pairwise within the row; rows hold a handful of hits).
        group = np.cumsum(first) - 1
        gsize = np.diff(np.r_[gstart, len(rows)])
        multi = np.flatnonzero(~single[group])
        k = gsize[group[multi]]
        j = np.repeat(multi, k)
        i = gstart[group[j]] + (np.arange(len(j)) - np.repeat(np.cumsum(k) - k, k))
        inside = (
            (start[i] <= start[j])
            & (end[j] <= end[i])
            & (end[j] - start[j] < end[i] - start[i])
            & (labels[i] != labels[j])
        )
        dropped = np.zeros(len(rows), dtype=bool)
        dropped[j[inside]] = True
        keep = multi[~dropped[multi]]
        r, lab, t = rows[keep], labels[keep], terms[keep]
        kfirst = np.r_[True, r[1:] != r[:-1]]
        ks = np.flatnonzero(kfirst)
        one = np.minimum.reduceat(lab, ks) == np.maximum.reduceat(lab, ks)
        label[r[ks]] = np.where(one, lab[ks], -2)
        term[r[ks]] = t[ks]
        # Ambiguous rows: the first term (by position) of each class they name.
        amb = ~one[np.cumsum(kfirst) - 1]
        if not amb.any():
            return BatchMatches(label, term, labels_all)
        r, lab, t = r[amb], lab[amb], t[amb]
        o = np.lexsort((lab, r))  # stable: position order within (row, label)
        r, lab, t = r[o], lab[o], t[o]
        firsts = np.r_[True, (r[1:] != r[:-1]) | (lab[1:] != lab[:-1])]
        for row, la, te in zip(r[firsts].tolist(), lab[firsts].tolist(), t[firsts].tolist()):
            labels_all.setdefault(row, []).append((la, te))
        return BatchMatches(label, term, labels_all)


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy ``(offsets int64 from 0, values uint8)`` of a string array."""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)
    offsets = offsets[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return (offsets - offsets[0]).astype(np.int64), values[offsets[0] : offsets[-1]]


def _collapse(buf: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collapse runs of spaces to one space; returns the new buffer and row offsets."""
    sp = buf == _SPACE
    drop = np.zeros_like(sp)
    np.logical_and(sp[1:], sp[:-1], out=drop[1:])
    dropped = np.flatnonzero(drop)
    return buf[~drop], offsets - np.searchsorted(dropped, offsets)


def _normalize_unicode(arr: pa.Array, has_amp: np.ndarray) -> pa.Array:
    """HTML entities (rows where ``has_amp``), then invisible characters, NFKC, lower case and
    Unicode punctuation (rows still non-ASCII). Returns the rows normalised, same length."""
    if has_amp.any():
        mask = pa.array(has_amp)
        sub = pc.replace_substring_regex(arr.filter(mask), _SEPARATOR_ENTITIES, " ")
        ent = pc.match_substring_regex(sub, _ANY_ENTITY)
        if pc.any(ent).as_py():
            fixed = [html.unescape(s) for s in sub.filter(ent).to_pylist()]
            sub = pc.replace_with_mask(sub, ent, pa.array(fixed, pa.string()))
        arr = pc.replace_with_mask(arr, mask, sub)
    uni = pc.invert(pc.string_is_ascii(arr))
    if not pc.any(uni).as_py():
        return arr
    sub = pc.replace_substring_regex(arr.filter(uni), _INVISIBLE, "")
    # unicodedata returns already-normal strings after a quick check: faster than Arrow's
    # utf8_normalize, which rebuilds every string.
    sub = pa.array([unicodedata.normalize("NFKC", s).lower() for s in sub.to_pylist()], pa.string())
    return pc.replace_with_mask(arr, uni, pc.replace_substring_regex(sub, _NON_WORD, " "))
