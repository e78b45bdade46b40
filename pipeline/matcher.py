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

How it is fast: a batch of captions is normalised with Arrow kernels and one numpy byte
lookup table over the whole batch's string buffer (Python touches only the rare captions with
``&`` or non-ASCII characters), then a multi-pattern engine scans the whole buffer once and
match offsets are mapped back to rows with ``searchsorted``. Two engines:

- ``hyperscan`` (x86 SIMD regex, the default where it imports): each term is one regex
  allowing any number of separators between tokens, so the buffer needs no collapsing;
- ``ahocorasick`` (``ahocorasick_rs``, portable Rust): runs of spaces are collapsed first
  (numpy), then plain literal patterns are searched with overlapping matches.
"""

from __future__ import annotations

import html
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

_SPACE = 32
# ASCII letters/digits -> lower case; every other ASCII byte -> space. Bytes >= 0x80 belong to
# multi-byte UTF-8 characters, which the slow path has already normalised for those rows.
_LUT = np.full(256, _SPACE, dtype=np.uint8)
for _c in range(256):
    if _c >= 128:
        _LUT[_c] = _c
    elif chr(_c).isalnum():
        _LUT[_c] = ord(chr(_c).lower())
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
# Invisible format characters (zero-width spaces and joiners, bidi controls, soft hyphen, BOM)
# are deleted, not treated as separators: "c\u200bat" reads "cat" on screen, so it matches.
_INVISIBLE = dict.fromkeys([0x00AD, 0x180E, *range(0x200B, 0x2010), *range(0x202A, 0x202F), *range(0x2060, 0x2065), 0xFEFF])


def normalize_text(text: str) -> str:
    """Normalise one string exactly as :func:`normalize_batch` does, without padding.

    Used for class names and synonyms (and as the reference in tests).
    """
    text = unicodedata.normalize("NFKC", html.unescape(text).translate(_INVISIBLE)).lower()
    return " ".join(t for t in _NON_WORD.split(text) if t)


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


@dataclass(frozen=True)
class Term:
    """One searchable phrase: its normalised tokens, the class it names, and its source text."""

    tokens: tuple[str, ...]
    label: int
    text: str


def build_terms(
    classes: Sequence[str], synonyms: Mapping[str, Iterable[str]] | None = None
) -> list[Term]:
    """Terms for every class name and synonym (normalised; empty ones skipped)."""
    index = {c: i for i, c in enumerate(classes)}
    raw: list[tuple[str, int]] = [(c, i) for i, c in enumerate(classes)]
    for name, syns in (synonyms or {}).items():
        if name not in index:
            raise ValueError(f"synonyms given for unknown class {name!r}")
        raw.extend((s, index[name]) for s in syns)
    terms, seen = [], set()
    for text, label in raw:
        tokens = tuple(normalize_text(text).split())
        if not tokens or (tokens, label) in seen:
            continue
        seen.add((tokens, label))
        terms.append(Term(tokens, label, text))
    return terms


@dataclass
class BatchMatches:
    """Per-row outcome of matching one batch.

    ``label[i]`` is the class of row ``i`` (-1: no match, -2: ambiguous); ``term[i]`` the
    index of the term that decided it; ``labels_all`` lists every class an ambiguous row
    names (for ``keep_ambiguous``).
    """

    label: np.ndarray
    term: np.ndarray
    labels_all: dict[int, list[tuple[int, int]]]


class Matcher:
    """Multi-pattern caption matcher for one dataset's class names and synonyms.

    ``engine`` is ``auto`` (hyperscan if it imports, else ahocorasick), ``hyperscan`` or
    ``ahocorasick``.
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
        # Each variant (term x plural form) is one pattern; pattern -> term index.
        variants: list[tuple[tuple[str, ...], int]] = []
        for ti, term in enumerate(self.terms):
            for last in _plural_forms(term.tokens[-1]):
                variants.append((term.tokens[:-1] + (last,), ti))
        self._pattern_term = np.array([ti for _, ti in variants], dtype=np.int64)
        self._term_label = np.array([t.label for t in self.terms], dtype=np.int64)
        self._term_len = np.array([len(" ".join(t.tokens)) for t in self.terms], dtype=np.int64)
        if self.engine == "hyperscan":
            self._db = self._compile_hyperscan([v for v, _ in variants])
        else:
            import ahocorasick_rs

            pats = [(" " + " ".join(v) + " ").encode("utf-8") for v, _ in variants]
            self._ac = ahocorasick_rs.BytesAhoCorasick(pats)

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
    def _compile_hyperscan(variants: list[tuple[str, ...]]):
        import hyperscan

        def esc(token: str) -> bytes:
            return b"".join(b"\\x%02x" % b for b in token.encode("utf-8"))

        exprs = [b" " + b" +".join(esc(t) for t in v) + b" " for v in variants]
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(
            expressions=exprs,
            ids=list(range(len(exprs))),
            elements=len(exprs),
            flags=[hyperscan.HS_FLAG_SOM_LEFTMOST] * len(exprs),
        )
        return db

    # ------------------------------------------------------------------ normalisation

    @staticmethod
    def normalize_batch(captions: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Normalise a string array into one padded byte buffer.

        Returns ``(buffer uint8, offsets int64 [n+1])``: row ``i`` is
        ``buffer[offsets[i]:offsets[i+1]]``, starts and ends with a space, and holds its
        tokens separated by one or more spaces. Nulls become empty rows.
        """
        if isinstance(captions, pa.ChunkedArray):
            captions = captions.combine_chunks()
        if pa.types.is_large_string(captions.type):
            captions = captions.cast(pa.string())
        arr = captions.fill_null("")
        # Slow path only for rows that need it: HTML entities, and non-ASCII (NFKC, Unicode
        # lower-casing, Unicode punctuation). LAION-en captions are mostly plain ASCII.
        needs = pc.or_(pc.match_substring(arr, "&"), pc.invert(pc.string_is_ascii(arr)))
        needs_np = needs.to_numpy(zero_copy_only=False)
        if needs_np.any():
            idx = pa.array(np.flatnonzero(needs_np))
            fixed = [_normalize_slow(s) for s in arr.take(idx).to_pylist()]
            arr = pc.replace_with_mask(arr, needs, pa.array(fixed, pa.string()))
        arr = pc.binary_join_element_wise("", arr, "", " ")
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
        values = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        return _LUT[values], (offsets - offsets[0]).astype(np.int64)

    @staticmethod
    def _collapse(buf: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Collapse runs of spaces to one (for literal engines)."""
        sp = buf == _SPACE
        drop = np.zeros_like(sp)
        np.logical_and(sp[1:], sp[:-1], out=drop[1:])
        dropped = np.flatnonzero(drop)
        return buf[~drop], offsets - np.searchsorted(dropped, offsets)

    # ------------------------------------------------------------------ matching

    def _raw_matches(self, buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """All pattern hits as an int64 array [M, 3]: (pattern, start, end) in buffer bytes."""
        if self.engine == "hyperscan":
            hits: list[tuple[int, int, int]] = []

            def on_match(pid, start, end, flags, ctx):
                hits.append((pid, start, end))
                return 0

            self._db.scan(buf.tobytes(), match_event_handler=on_match)
        else:
            buf, offsets = self._collapse(buf, offsets)
            hits = self._ac.find_matches_as_indexes(buf, overlapping=True)
            self._last_offsets = offsets
        if not hits:
            return np.zeros((0, 3), dtype=np.int64)
        return np.asarray(hits, dtype=np.int64)

    def match(self, captions: pa.Array) -> BatchMatches:
        """Match a batch of captions; see :class:`BatchMatches`."""
        n = len(captions)
        label = np.full(n, -1, dtype=np.int64)
        term = np.full(n, -1, dtype=np.int64)
        labels_all: dict[int, list[tuple[int, int]]] = {}
        if n == 0:
            return BatchMatches(label, term, labels_all)
        buf, offsets = self.normalize_batch(captions)
        hits = self._raw_matches(buf, offsets)
        if self.engine != "hyperscan":
            offsets = self._last_offsets
        if len(hits) == 0:
            return BatchMatches(label, term, labels_all)
        # A match's first token starts one byte after its leading space.
        rows = np.searchsorted(offsets, hits[:, 1] + 1, side="right") - 1
        # Drop hits that run past their row's end (separators between tokens can span rows).
        ok = hits[:, 2] <= offsets[rows + 1]
        hits, rows = hits[ok], rows[ok]
        terms = self._pattern_term[hits[:, 0]]
        labels = self._term_label[terms]
        order = np.lexsort((hits[:, 1], rows))
        hits, rows, terms, labels = hits[order], rows[order], terms[order], labels[order]
        # Rows naming exactly one class (the common case) resolve without Python.
        first = np.r_[True, rows[1:] != rows[:-1]]
        starts = np.flatnonzero(first)
        ends = np.r_[starts[1:], len(rows)]
        lab_min = np.minimum.reduceat(labels, starts)
        lab_max = np.maximum.reduceat(labels, starts)
        single = lab_min == lab_max
        srows = rows[starts[single]]
        label[srows] = lab_min[single]
        term[srows] = terms[starts[single]]
        for s, e in zip(starts[~single], ends[~single]):
            self._resolve_row(int(rows[s]), hits[s:e], terms[s:e], labels[s:e], label, term, labels_all)
        return BatchMatches(label, term, labels_all)

    def _resolve_row(self, row, hits, terms, labels, label, term, labels_all) -> None:
        """Longest match wins over matches it contains; what remains decides the row."""
        span_start, span_end = hits[:, 1] + 1, hits[:, 2] - 1
        length = span_end - span_start
        keep = np.ones(len(hits), dtype=bool)
        for i in range(len(hits)):
            inside = (
                (span_start >= span_start[i])
                & (span_end <= span_end[i])
                & (length < length[i])
                & (labels != labels[i])
            )
            keep &= ~inside
        kept_labels = labels[keep]
        kept_terms = terms[keep]
        classes = sorted(set(kept_labels.tolist()))
        if len(classes) == 1:
            label[row] = classes[0]
            term[row] = int(kept_terms[0])
        else:
            label[row] = -2
            firsts = {}
            for lab, t in zip(kept_labels.tolist(), kept_terms.tolist()):
                firsts.setdefault(lab, t)
            labels_all[row] = sorted(firsts.items())
            term[row] = int(kept_terms[0])


def _normalize_slow(text: str) -> str:
    """Python normalisation of one caption (HTML, NFKC, Unicode lower case and punctuation)."""
    if "&" in text:
        text = html.unescape(text)
        if text.isascii():
            return text  # the byte table does the rest, as for any ASCII row
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text.translate(_INVISIBLE)).lower())
