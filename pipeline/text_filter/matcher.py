"""Match captions to class names, a batch at a time (the pure core of the text filter).

Rules (a superset of the reference's SQLite FTS phrase query ``TEXT MATCH '"<name>"'``):

- case-insensitive, Unicode NFKC, HTML entities unescaped;
- any run of characters that is not a letter or digit separates tokens, in captions and in
  class names alike (``Rolls-Royce`` == ``rolls royce``, ``men's`` == ``men s``);
- whole tokens only (``cat`` never inside ``catalog``, ``172`` never inside ``1720``);
- the simple English plural of a term's last token also matches (``s``, ``es``,
  ``y`` -> ``ies``), and letters and digits written together or apart match each other
  (``F150`` = ``F-150``; :func:`pipeline.text_filter.terms.token_variants`);
- per-class synonyms match as their class;
- a match inside a longer match of another class does not count (``rose`` in ``desert rose``);
- a caption that still names two or more classes is *ambiguous*;
- the dataset's match rules beyond names (families, exclusions, kind words, years) are applied
  to every engine's hits by :mod:`pipeline.text_filter.resolve`.

Engines (``auto`` picks the first that imports; all give the same answers, and the tests hold
them to it):

- ``tokens`` (numba; :mod:`pipeline.text_filter.token_ac`; the fastest, so the default): one
  compiled pass over the Arrow string buffer splits captions into tokens with the byte table
  below, looks each token up in a hash table of the terms' tokens and steps an Aho-Corasick
  automaton over token ids. No normalised copy, no per-hit Python. Rows with characters the
  pass cannot normalise on its own, or unusual entities, are flagged by it and go through the
  Unicode path below, then through the same kernel.
- ``hyperscan`` (Intel's SIMD literal matcher) and ``ahocorasick`` (``ahocorasick_rs``,
  portable Rust): byte engines over a normalised copy of the batch, built as follows. Their
  speeds beside ``tokens``: docs/benchmarks.md.

Normalised copy for the byte engines: a batch is joined by Arrow into one buffer, rows
separated by space, 0xFF, space (0xFF never occurs in UTF-8), mapped by one byte table
(``bytes.translate``: ASCII letters and digits lower-cased, every other ASCII byte a space,
0xFF a newline), and runs of spaces are
collapsed (a numpy mask, compacted by Arrow's filter kernel); row boundaries are the newlines.
Plain ASCII rows need nothing else: the common separator entities (``&amp;``, ``&quot;``, ...)
are blanked in place. The rows with other entities or non-ASCII bytes (a minority of
LAION-like captions) are normalised again, all at once, and appended to the buffer: joined by
NUL into one string for ``html.unescape`` and NFKC, then lower-cased and split on Unicode
separators by a per-code-point table over their UTF-8 bytes. The few rows that need more
(invisible characters, lower case that changes length or depends on context) take the exact
per-row path of Arrow kernels and Python. A row's stale copies are ignored when hits are mapped
back to rows.

Every term is one literal pattern `` tok tok `` and the byte engine scans the whole buffer
once. Patterns hold no ``\n``, so no match spans two rows; match offsets are mapped back to rows
with ``searchsorted``. hyperscan scans a batch at memory speed, but calls Python once per hit;
ahocorasick is slower, because every space in a caption starts a pattern prefix.

Whatever the engine, the containment and ambiguity rules are resolved with numpy over all hits
of a batch at once. bench/text_filter.py measures every engine.
"""

from __future__ import annotations

import html
import logging
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.text_filter import terms as _terms
from pipeline.text_filter.resolve import AMBIGUOUS, NONE, BatchMatches, resolve
from pipeline.text_filter.terms import MatchRules, Term

__all__ = [
    "AMBIGUOUS", "ENGINES", "NONE", "BatchMatches", "Matcher", "MatchRules", "Term",
    "normalize_text", "normalize_texts",
]  # fmt: skip

log = logging.getLogger(__name__)

_SPACE = 32
_NEWLINE = 10
# Rows are joined with " \xff " while normalising: 0xFF never occurs in UTF-8, so the separator
# cannot be confused with caption bytes, and the byte table turns it into "\n" at the end.
_SEP_BYTE = 0xFF
_ROW_SEP = b" \xff "
# ASCII letters/digits -> lower case; every other ASCII byte -> space; 0xFF (row separator) ->
# newline. Other bytes >= 0x80 belong to multi-byte UTF-8 characters: in the rows that hold
# them only the copy normalised on the Unicode path counts (see _normalize).
_LUT = np.full(256, _SPACE, dtype=np.uint8)
for _c in range(256):
    if _c >= 128:
        _LUT[_c] = _c
    elif chr(_c).isalnum():
        _LUT[_c] = ord(chr(_c).lower())
_LUT[_SEP_BYTE] = _NEWLINE
_LUT_BYTES = _LUT.tobytes()
# Entities that decode to a separator, blanked in place in plain ASCII rows (the byte table
# then makes them spaces): "&amp;" is in some 5% of LAION captions, and this costs a few numpy
# gathers per batch instead of a regex and a copy. A row with any other "&#..." or "&name"
# goes down the Unicode path, which runs html.unescape.
_BLANK_ENTITIES = (
    b"&amp;", b"&quot;", b"&lt;", b"&gt;", b"&nbsp;", b"&apos;", b"&#39;", b"&#039;",
    b"&#34;", b"&ndash;", b"&mdash;",
)  # fmt: skip
_ENTITY_START = np.zeros(256, dtype=bool)  # bytes after "&" that can start an entity
_ENTITY_START[[ord(c) for c in "#ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"]] = True
# The same rule for the tokens engine's kernel: (entity bytes, offsets, _ENTITY_START).
_ENTITIES = (
    np.frombuffer(b"".join(_BLANK_ENTITIES), dtype=np.uint8).copy(),
    np.cumsum([0] + [len(e) for e in _BLANK_ENTITIES]).astype(np.int64),
    _ENTITY_START,
)
# Entities that decode to punctuation or spaces are separators either way: replace them in
# Arrow. Only rows still holding an entity (``&eacute;``, ``&#65;``, ``&amp`` without ``;``)
# go through Python's html.unescape. (The exact per-row path, for the rare rows that need it.)
_SEPARATOR_ENTITIES = (
    r"&(?:amp|quot|lt|gt|nbsp|apos|ndash|mdash|#0*(?:3[2-9]|4[0-7]|39|34)|#x0*(?:2[0-9a-fA-F]));"
)
_ANY_ENTITY = r"&(?:#[0-9xX]|[A-Za-z])"
# Invisible format characters (zero-width spaces and joiners, bidi controls, soft hyphen, BOM)
# are deleted, not treated as separators: "c\u200bat" reads "cat" on screen, so it matches.
_INVISIBLE = "[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]"
_INVISIBLE_CPS = frozenset(
    [0xAD, 0x180E, 0xFEFF, *range(0x200B, 0x2010), *range(0x202A, 0x202F), *range(0x2060, 0x2065)]
)
# Anything that is not a letter or a number (Unicode categories L*, N*) separates tokens.
# ASCII punctuation is left to the byte table (cheaper than a Unicode class in RE2).
_NON_WORD = r"[^\x00-\x7f\p{L}\p{N}]+"
# Per code point (after NFKC): its lower-case form's UTF-8 bytes when that is a letter or digit
# of the same byte length, as many spaces when it is not a letter or digit, packed little-endian
# in a uint32 (0: not looked up yet), or _COMPLEX when lower-casing changes the length or depends
# on context (final sigma), or the character is invisible: such rows take the exact path.
_COMPLEX = np.uint32(0xFFFFFFFF)
_CP_REPL: np.ndarray | None = None


def normalize_text(text: str) -> str:
    """Normalise one string exactly as :meth:`Matcher.normalize_batch` does (same kernels),
    tokens joined by single spaces."""
    return normalize_texts([text])[0]


def normalize_texts(texts: Sequence[str]) -> list[str]:
    """:func:`normalize_text` over many strings at once (class names and synonyms)."""
    buf, off = Matcher.normalize_batch(pa.array(list(texts), pa.string()))
    data = buf.tobytes()
    return [" ".join(data[off[i] : off[i + 1]].decode("utf-8").split()) for i in range(len(texts))]


# Engines, fastest first (bench/text_filter.py); ``auto`` takes the first whose module imports.
ENGINES = ("tokens", "hyperscan", "ahocorasick")
_ENGINE_MODULE = {"tokens": "numba", "hyperscan": "hyperscan", "ahocorasick": "ahocorasick_rs"}
# Compiled hyperscan databases / token automata by pattern list: every Spark task of a job
# builds the same one.
_HS_CACHE: dict = {}
_AC_CACHE: dict = {}


class Matcher:
    """Multi-pattern caption matcher for one dataset's match rules.

    ``Matcher(classes, synonyms, engine, **rules)`` or :meth:`from_rules`; ``rules`` are the
    other fields of :class:`pipeline.text_filter.terms.MatchRules` (families, exclusions, kind
    words, years). ``engine`` is ``auto`` (the first of :data:`ENGINES` that imports), or one
    of :data:`ENGINES`. Raises ``ValueError`` when no class name has a token, ``ImportError``
    when the engine asked for is not installed.
    """

    def __init__(
        self,
        classes: Sequence[str],
        synonyms: Mapping[str, Iterable[str]] | None = None,
        engine: str = "auto",
        **rules,
    ):
        self.rules = MatchRules(tuple(classes), synonyms or {}, **rules)
        self.classes = list(self.rules.classes)
        built = _terms.build(self.rules)
        for problem in built.problems:  # load_dataset refuses these; a direct caller is warned
            log.warning("matcher: %s", problem)
        self.terms = built.terms
        self.owners = built.owners
        if not any(t.label >= 0 for t in self.terms):
            raise ValueError("no class names to match")
        self.engine = self._pick_engine(engine)
        # Each pattern (a term's variant or plural form) is one literal " tok tok ".
        variants = built.patterns
        self._pattern_term = built.pattern_term
        self._term_owner = np.array([t.owner for t in self.terms], dtype=np.int64)
        self._pattern_wide = np.array([len(v) > 1 for v in variants], dtype=bool)
        patterns = [(" " + " ".join(v) + " ").encode() for v in variants]
        self._pattern_len = np.array([len(p) for p in patterns], dtype=np.int64)
        if self.engine == "tokens":
            from pipeline.text_filter import token_ac as _token_ac

            key = tuple(variants)
            if key not in _AC_CACHE:
                _AC_CACHE.clear()
                _AC_CACHE[key] = _token_ac.build_automaton(variants)
            self._automaton = _AC_CACHE[key]
        elif self.engine == "hyperscan":
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

    @classmethod
    def from_rules(cls, rules: MatchRules, engine: str = "auto") -> Matcher:
        """The matcher of a dataset's :class:`MatchRules`."""
        d = rules.to_dict()
        return cls(d.pop("classes"), d.pop("synonyms"), engine, **d)

    @staticmethod
    def _pick_engine(engine: str) -> str:
        import importlib

        if engine != "auto" and engine not in ENGINES:
            raise ValueError(f"engine must be auto or one of {', '.join(ENGINES)}, not {engine!r}")
        for name in ENGINES if engine == "auto" else (engine,):
            try:
                importlib.import_module(_ENGINE_MODULE[name])
                return name
            except ImportError:
                if engine != "auto":
                    raise
        raise ImportError(
            f"no matching engine installed (one of {', '.join(_ENGINE_MODULE.values())})"
        )

    @staticmethod
    def _compile_hyperscan(patterns: list[bytes]):
        import hyperscan

        # Every byte escaped: the patterns are literals, and \xNN keeps UTF-8 bytes intact.
        # Literals without start-of-match tracking compile in milliseconds and scan at memory
        # speed (a regex " tok +tok " on an uncollapsed buffer compiled and scanned far
        # slower); the start is the end minus the pattern's length.
        exprs = [b"".join(b"\\x%02x" % b for b in p) for p in patterns]
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=exprs, ids=list(range(len(exprs))), elements=len(exprs), flags=0)
        return db

    # ------------------------------------------------------------------ normalisation

    @staticmethod
    def normalize_batch(captions: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Normalise a string array into one byte buffer, rows in order.

        Returns ``(buffer uint8, offsets int64 [n+1])``: row ``i`` is
        ``buffer[offsets[i]:offsets[i+1]]``: a space, its tokens separated by single spaces, a
        space (only one for an empty row) and ``\n``. Nulls become empty rows. (Matching uses
        the unordered layout of :func:`_normalize` directly; this is for class names and tests.)
        """
        buf, offsets, row_of, valid = _normalize(captions)
        rows: list[bytes] = [b""] * len(row_of)
        for j in np.flatnonzero(valid).tolist():
            rows[int(row_of[j])] = buf[offsets[j] : offsets[j + 1]].tobytes()
        rows = rows[: int(valid.sum())]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        data = np.frombuffer(b"".join(rows), dtype=np.uint8)
        return data, np.r_[0, np.cumsum(lengths)].astype(np.int64)

    # ------------------------------------------------------------------ matching

    def _raw_matches(self, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All pattern hits in a normalised buffer: ``(pattern ids, start offsets)``."""
        if self.engine == "hyperscan":
            # The callback runs once per hit (hyperscan has no bulk API): one list append of
            # end * npat + id is about half the cost of two appends.
            found: list[int] = []
            npat = len(self._pattern_len)
            self._db.scan(
                buf,
                match_event_handler=lambda i, s, e, f, c, add=found.append, k=npat: add(e * k + i),
            )
            code = np.array(found, dtype=np.int64)
            pid = code % npat
            return pid, code // npat - self._pattern_len[pid]
        hits = self._ac.find_matches_as_indexes(buf, overlapping=True)
        if not hits:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        h = np.asarray(hits, dtype=np.int64)
        return h[:, 0], h[:, 1]

    def _token_hits(
        self, captions: pa.Array
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, start, end, pattern ids)`` of every hit, by the ``tokens`` engine.

        Offsets are only comparable within a row (each row is scanned in one buffer)."""
        from pipeline.text_filter import token_ac as tac

        arr = _as_strings(captions)
        offsets, values = _buffers(arr)
        a = self._automaton
        rows, start, end, pid, special = tac.scan(a, values, offsets, tac.LUT_RAW, _ENTITIES)
        parts = [(rows, start, end, pid)]
        sp = np.flatnonzero(special)
        if len(sp):
            # Rows the kernel left (non-ASCII bytes, other entities): the batch Unicode path,
            # then the kernel over its output; the few that need the exact path, likewise.
            sub = arr.take(pa.array(sp))
            text, exact = _normalize_special(sub, learn=tac.learn)
            v = np.frombuffer(text, dtype=np.uint8)
            # Rows are NUL-separated; a row's span starts at the NUL before it (a separator).
            off = np.r_[0, np.flatnonzero(v == 0), len(v)].astype(np.int64)
            r, s0, e0, p, _ = tac.scan(a, v, off, tac.LUT_NORMALISED, _ENTITIES)
            keep = ~exact[r]
            parts.append((sp[r[keep]], s0[keep], e0[keep], p[keep]))
            if exact.any():
                ex = np.flatnonzero(exact)
                off, v = _buffers(_normalize_unicode(sub.take(pa.array(ex))))
                r, s0, e0, p, _ = tac.scan(a, v, off, tac.LUT_NORMALISED, _ENTITIES)
                parts.append((sp[ex[r]], s0, e0, p))
        if len(parts) == 1:
            return rows, start, end, pid
        return tuple(np.concatenate(c) for c in zip(*parts))  # type: ignore[return-value]

    def match(self, captions: pa.Array) -> BatchMatches:
        """Match a batch of captions (a string array; nulls never match).

        Returns :class:`pipeline.text_filter.resolve.BatchMatches`.
        """
        n = len(captions)
        if n == 0:
            return BatchMatches(np.zeros(0, np.int64), np.zeros(0, np.int64))
        if self.engine == "tokens":
            rows, start, end, pid = self._token_hits(captions)
        else:
            buf, offsets, row_of, valid = _normalize(captions)
            pid, start = self._raw_matches(buf)
            # Patterns hold no "\n", so every hit lies inside one row of the buffer; hits in
            # a row's stale copy (one normalised again further on) are dropped.
            brow = np.searchsorted(offsets, start, side="right") - 1
            ok = valid[brow]
            pid, start, rows = pid[ok], start[ok], row_of[brow[ok]]
            end = start + self._pattern_len[pid]
        terms = self._pattern_term[pid]
        years = None
        if self.owners.class_year.any():
            # Years only matter in captions that name a class: found there, not by the scan.
            named = np.unique(rows[self.owners.kind[self._term_owner[terms]] <= _terms.FAMILY])
            y_rows, y_vals = _terms.caption_years(_as_strings(captions).take(pa.array(named)))
            years = (named[y_rows], y_vals)
        wide = self._pattern_wide[pid]
        return resolve(n, rows, start, end, terms, self._term_owner, self.owners, years, wide)


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy ``(offsets int64 from 0, values uint8)`` of a string or binary array."""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)
    offsets = offsets[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return (offsets - offsets[0]).astype(np.int64), values[offsets[0] : offsets[-1]]


def _as_strings(captions: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One string array, nulls as empty strings."""
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks()
    if not pa.types.is_string(captions.type):
        captions = captions.cast(pa.string())
    return captions.fill_null("")


def _normalize(captions: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Normalise a batch into one buffer of rows for the scanner (the hot path).

    Returns ``(buffer uint8, offsets int64 [m+1], row_of int64 [m], valid bool [m])``: buffer
    row ``j`` (formatted as in :meth:`Matcher.normalize_batch`) is a copy of caption
    ``row_of[j]``, and counts only where ``valid[j]``. Every caption has exactly one valid row.

    The buffer holds every caption once in order, normalised by the byte table alone (exact for
    plain ASCII without entities), then a second copy of the captions with non-ASCII bytes or
    entities, normalised by :func:`_normalize_special`, then a third of the few rows that need
    the exact per-row path. Appending instead of splicing avoids copying the batch again.
    """
    arr = _as_strings(captions)
    n = len(arr)
    offsets, values = _buffers(arr)
    special = np.zeros(n, dtype=bool)
    hi = np.flatnonzero(values >= 0x80)
    if len(hi):
        special[np.searchsorted(offsets, hi, side="right") - 1] = True
    blank = _entity_blanks(offsets, values, special)
    segments = [arr]
    row_of = [np.arange(n, dtype=np.int64)]
    valid = [~special]
    rows = np.flatnonzero(special)
    if len(rows):
        sub = arr.take(pa.array(rows))
        seg, exact = _normalize_special(sub)
        segments.append(bytes(seg).replace(b"\x00", _ROW_SEP))
        row_of.append(rows)
        valid.append(~exact)
        if exact.any():
            segments.append(_normalize_unicode(sub.filter(pa.array(exact))))
            row_of.append(rows[exact])
            valid.append(np.ones(int(exact.sum()), dtype=bool))
    joined = bytearray(_ROW_SEP)
    for seg in segments:
        if isinstance(seg, bytes):
            joined += seg
        elif len(seg):
            joined += _join(seg)
        else:
            continue
        joined += _ROW_SEP
    table = joined.translate(_LUT_BYTES)
    del joined
    t = np.frombuffer(table, dtype=np.uint8)
    if len(blank):
        # Main-copy positions: 3 bytes of separator before the first row and after each row.
        t[blank + 3 + 3 * (np.searchsorted(offsets, blank, side="right") - 1)] = _SPACE
    buf = _collapse(t)
    ends = np.flatnonzero(buf == _NEWLINE)
    row_of_all = np.concatenate(row_of)
    if len(ends) != len(row_of_all) + 1:  # a bug, never input: every separator is accounted for
        raise AssertionError(f"normalised {len(ends) - 1} rows for {len(row_of_all)}")
    offsets_out = ends + 1
    return buf[: offsets_out[-1]], offsets_out, row_of_all, np.concatenate(valid)


def _entity_blanks(offsets: np.ndarray, values: np.ndarray, special: np.ndarray) -> np.ndarray:
    """Byte positions (in ``values``) to blank: the entities of :data:`_BLANK_ENTITIES`, and
    any 0xFF byte (invalid UTF-8, which would read as a row separator). Marks in ``special``
    the rows holding any other entity."""
    blank = [np.flatnonzero(values == _SEP_BYTE)] if special.any() else []
    amp = np.flatnonzero(values == ord("&"))
    if len(amp):
        amp_row = np.searchsorted(offsets, amp, side="right") - 1
        row_end = offsets[amp_row + 1]
        nxt = values[np.minimum(amp + 1, len(values) - 1)]
        cand = (amp + 1 < row_end) & _ENTITY_START[nxt]
        amp, amp_row, row_end = amp[cand], amp_row[cand], row_end[cand]
        left = np.arange(len(amp))  # candidates not yet identified, shrinking
        for ent in _BLANK_ENTITIES:
            idx = left[amp[left] + len(ent) <= row_end[left]]
            for k in range(1, len(ent)):
                idx = idx[values[amp[idx] + k] == ent[k]]
            if len(idx):
                left = np.setdiff1d(left, idx, assume_unique=True)
                blank.append((amp[idx, None] + np.arange(len(ent))).ravel())
        special[amp_row[left]] = True
    return np.concatenate(blank) if blank else np.zeros(0, dtype=np.int64)


def _join(arr: pa.Array) -> pa.Buffer:
    """The rows of a string array joined by :data:`_ROW_SEP` (no copy to Python objects)."""
    data = arr.view(pa.binary())
    offsets, values = _buffers(arr)
    if len(values) + 3 * len(arr) >= 2**31 - 1:
        data = data.cast(pa.large_binary())
    lists = pa.ListArray.from_arrays(pa.array([0, len(data)], pa.int32()), data)
    return pc.binary_join(lists, pa.scalar(_ROW_SEP, data.type))[0].as_buffer()


def _collapse(buf: np.ndarray) -> np.ndarray:
    """Collapse runs of spaces to one space.

    The mask is built in numpy and packed to an Arrow bitmap: Arrow's filter kernel compacts
    the bytes faster than numpy's boolean indexing.
    """
    keep = np.empty(len(buf), dtype=bool)
    word = buf != _SPACE
    keep[:1] = True
    np.logical_or(word[1:], word[:-1], out=keep[1:])
    mask = pa.Array.from_buffers(
        pa.bool_(), len(keep), [None, pa.py_buffer(np.packbits(keep, bitorder="little"))]
    )
    data = pa.Array.from_buffers(pa.uint8(), len(buf), [None, pa.py_buffer(buf)])
    out = pc.filter(data, mask)
    return np.frombuffer(out.buffers()[1], dtype=np.uint8, count=len(out), offset=out.offset)


def _normalize_special(arr: pa.Array, learn=None) -> tuple[bytearray, np.ndarray]:
    """Rows with non-ASCII bytes or entities: HTML entities, NFKC, lower case and Unicode
    separators, done over the whole set at once instead of per row.

    Returns ``(rows joined by NUL, exact)``; rows marked ``exact`` (invisible characters,
    which must go before NFKC; lower-casing that changes length or depends on context) are left
    as they are here and must be normalised by :func:`_normalize_unicode`.

    Rows are joined by NUL (a NUL inside a caption is a separator anyway, so it is made a space
    first): NFKC never composes across NUL, html.unescape never decodes an entity across it
    (no entity name holds one), and neither ever produces one.
    """
    data = pc.replace_substring(arr.view(pa.binary()), b"\x00", b" ")
    lists = pa.ListArray.from_arrays(pa.array([0, len(data)], pa.int32()), data)
    raw = pc.binary_join(lists, pa.scalar(b"\x00", pa.binary()))[0].as_py()
    text = raw.decode("utf-8", "replace")
    if learn is not None:  # the tokens engine's code point table learns these rows' characters
        learn(text)
    if "&" in text:
        # "&amp;" -> " " instead of "&": both separate tokens, and html.unescape's callback
        # per entity costs a microsecond.
        text = html.unescape(text.replace("&amp;", " "))
    out = bytearray(unicodedata.normalize("NFKC", text).encode())
    exact = np.zeros(len(arr), dtype=bool)
    v = np.frombuffer(out, dtype=np.uint8)
    lead = np.flatnonzero(v >= 0xC0)
    if len(lead):
        cp, length = _decode_utf8(v, lead)
        repl = _cp_replacements(cp)
        bad = repl == _COMPLEX
        if bad.any():
            nul = np.flatnonzero(v == 0)
            exact[np.searchsorted(nul, lead[bad])] = True
            lead, length, repl = lead[~bad], length[~bad], repl[~bad]
        for k in range(4):
            m = length > k
            v[lead[m] + k] = (repl[m] >> np.uint32(8 * k)) & np.uint32(0xFF)
    del v
    return out, exact


def _decode_utf8(v: np.ndarray, lead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Code points and byte lengths of the characters starting at ``lead`` (valid UTF-8)."""
    b0 = v[lead].astype(np.uint32)
    b1, b2, b3 = (np.take(v, lead + k, mode="clip").astype(np.uint32) & 0x3F for k in (1, 2, 3))
    length = 2 + (b0 >= 0xE0).astype(np.int64) + (b0 >= 0xF0)
    cp = np.where(
        length == 2,
        (b0 & 0x1F) << 6 | b1,
        np.where(
            length == 3,
            (b0 & 0x0F) << 12 | b1 << 6 | b2,
            (b0 & 0x07) << 18 | b1 << 12 | b2 << 6 | b3,
        ),
    )
    return cp, length


def _cp_replacements(cp: np.ndarray) -> np.ndarray:
    """:data:`_CP_REPL` for each code point, looking up (once per process) the new ones."""
    global _CP_REPL
    if _CP_REPL is None:
        _CP_REPL = np.zeros(0x110000, dtype=np.uint32)
    repl = _CP_REPL[cp]
    new = np.unique(cp[repl == 0])
    for c in new.tolist():
        ch = chr(c)
        low = ch.lower()
        size = len(ch.encode())
        if c in _INVISIBLE_CPS or c == 0x3A3 or len(low) != 1 or len(low.encode()) != size:
            _CP_REPL[c] = _COMPLEX  # 0x3A3: capital sigma lower-cases by context
        elif unicodedata.category(low)[0] in "LN":
            _CP_REPL[c] = int.from_bytes(low.encode(), "little")
        else:
            _CP_REPL[c] = int.from_bytes(b" " * size, "little")
    return _CP_REPL[cp] if len(new) else repl


def _normalize_unicode(arr: pa.Array) -> pa.Array:
    """HTML entities (rows with an ``&``), then invisible characters, NFKC, lower case and
    Unicode punctuation (rows still non-ASCII). Returns the rows normalised, same length."""
    mask = pc.match_substring(arr, "&")
    if pc.any(mask).as_py():
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
    # Python's unicodedata rather than Arrow's utf8_normalize/utf8_lower: the tokens kernel's
    # table is built from the same Unicode tables, so every engine agrees on every code point
    # (Arrow's utf8proc can follow another Unicode version).
    sub = pa.array([unicodedata.normalize("NFKC", s).lower() for s in sub.to_pylist()], pa.string())
    return pc.replace_with_mask(arr, uni, pc.replace_substring_regex(sub, _NON_WORD, " "))
