"""The ``tokens`` matching engine: Aho-Corasick over hashed tokens, compiled with numba.

The byte engines (hyperscan, ahocorasick) scan a normalised copy of every batch, so the batch
is read and written a few times before the scan starts, and every hit costs a Python
callback or tuple. This engine reads the Arrow string buffer once: a compiled loop splits each
caption into tokens with the same byte table as :mod:`pipeline.text_filter.matcher` (ASCII letters and
digits lower-cased, every other ASCII byte a separator, the common separator entities such as
``&amp;`` skipped), hashes each token as it goes, looks it up in a small open-addressing table
of the tokens that occur in some term, and steps an Aho-Corasick automaton whose alphabet is
those token ids. Unknown tokens reset the automaton, so a caption costs one table probe per
token and its hits come back in preallocated arrays. At the root (no partial match), a bitmap
of the home slots of the patterns' first tokens lets every other token pass without a probe:
exclusion phrases make common words known tokens, but few of them start a pattern.

Non-ASCII characters are looked up in a per-code-point table (:func:`codepoint_table`): a
character that is a separator, or a letter or digit that NFKC and lower-casing leave as it is
(``é``, ``ß``, ``日``), is handled in the loop; any other (upper case, compatibility forms,
combining marks, invisible characters, code points not seen yet) abandons the row, as does any
entity but the common separator ones. The caller normalises those rows with the Unicode path
of :mod:`pipeline.text_filter.matcher`, teaches the table the code points they hold (:func:`learn`), and
runs the same kernel over the result with :data:`LUT_NORMALISED`, where bytes >= 0x80 are
token bytes.

Hits are ``(row, start, end, pattern)`` with byte offsets into the scanned buffer: the first
byte of the pattern's first token and one past its last token. Offsets are only compared
within a row, where they order and nest hits exactly as offsets in the normalised text would.

The compiled loops are in :mod:`pipeline.text_filter.kernels`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_SPACE = 32
# Raw captions: ASCII letters/digits -> lower case, other ASCII -> space, and 0 for the bytes
# that need a decision: "&" (an entity?) and every byte >= 0x80 (the row needs Unicode work).
LUT_RAW = np.full(256, _SPACE, dtype=np.uint8)
for _c in range(128):
    if chr(_c).isalnum():
        LUT_RAW[_c] = ord(chr(_c).lower())
LUT_RAW[128:] = 0
LUT_RAW[ord("&")] = 0
# Already normalised text (the Unicode path's output): ASCII as above, bytes >= 0x80 are parts
# of letters or digits (that path turned every other character into spaces).
LUT_NORMALISED = LUT_RAW.copy()
LUT_NORMALISED[128:] = np.arange(128, 256, dtype=np.uint8)
LUT_NORMALISED[ord("&")] = _SPACE

# Code point classes (the kernel tests the values 1 and 2).
CP_UNKNOWN, CP_SEPARATOR, CP_KEEP, CP_COMPLEX = 0, 1, 2, 3
_CP_TABLE: np.ndarray | None = None
_COMPOSES_AFTER: frozenset[int] | None = None

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def token_hash(token: bytes) -> int:
    """The kernel's token hash (rotate-by-8 and xor per byte, then one multiply): a 64-bit
    value whose top bits pick the table slot. Collisions only cost a byte comparison."""
    h = 0
    for c in token:
        h = (((h << 8) | (h >> 56)) & _MASK64) ^ c
    return (h * _GOLDEN) & _MASK64


@dataclass(frozen=True)
class Automaton:
    """Arrays of the compiled matcher (see :func:`build_automaton`)."""

    tok_hash: np.ndarray  # uint64 [table]: token_hash of the token in each slot
    tok_id: np.ndarray  # int32 [table]: token id in each slot, -1 empty
    tok_bits: np.ndarray  # uint8 [table / 8]: bit s (little-endian) set where slot s is taken
    start_bits: np.ndarray  # uint8 [table / 8]: bit s set where s is the home slot of a token
    # that starts some pattern
    tok_bytes: np.ndarray  # uint8: the tokens' bytes, concatenated
    tok_off: np.ndarray  # int64 [tokens + 1]
    root_next: np.ndarray  # int32 [tokens]: state after the root reads a token (0: none)
    goto_key: np.ndarray  # int64 [goto table]: state << 32 | token, -1 empty
    goto_next: np.ndarray  # int32 [goto table]
    fail: np.ndarray  # int32 [states]
    out_off: np.ndarray  # int64 [states + 1]: patterns ending at each state (suffixes too)
    out_pattern: np.ndarray  # int32
    pattern_tokens: np.ndarray  # int64 [patterns]


def codepoint_table() -> np.ndarray:
    """The process's code point classes, ``uint8 [0x110000]``, all :data:`CP_UNKNOWN` until
    :func:`learn` classifies them (the kernel sends rows with unknown ones to Python)."""
    global _CP_TABLE
    if _CP_TABLE is None:
        _CP_TABLE = np.zeros(0x110000, dtype=np.uint8)
    return _CP_TABLE


def learn(text: str) -> None:
    """Classify the not yet known code points >= 0x80 of ``text`` (a batch's Unicode rows)."""
    table = codepoint_table()
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    cps = cps[cps >= 0x80]
    new = np.unique(cps[table[cps] == CP_UNKNOWN])
    for cp in new.tolist():
        table[cp] = classify(cp)


def classify(cp: int) -> int:
    """The class of one code point: a character that NFKC never changes in any context and
    that lower-casing keeps is :data:`CP_KEEP` when it is a letter or digit (its bytes are
    token bytes as they stand) and :data:`CP_SEPARATOR` otherwise; so is any character whose
    NFKC form has no letter or digit. Everything else is :data:`CP_COMPLEX`."""
    import unicodedata

    # Invisible characters are deleted, not separators: only the Unicode path handles them.
    from pipeline.text_filter.matcher import _INVISIBLE_CPS as invisible

    c = chr(cp)
    if (
        cp in invisible
        or 0xD800 <= cp <= 0xDFFF
        or unicodedata.combining(c)
        or cp in _composes_after()
    ):
        return CP_COMPLEX
    n = unicodedata.normalize("NFKC", c)
    if n == c:
        if unicodedata.category(c)[0] not in "LN":
            return CP_SEPARATOR
        return CP_KEEP if c.lower() == c else CP_COMPLEX
    if all(
        unicodedata.category(x)[0] not in "LN"
        and not unicodedata.combining(x)
        and ord(x) not in invisible
        for x in n
    ):
        return CP_SEPARATOR  # e.g. "…" -> "...": separators either way
    return CP_COMPLEX


def _composes_after() -> frozenset[int]:
    """Code points that canonical composition can merge into the character before them
    (NFC_QC=Maybe): second halves of canonical pairs, and Hangul medial and final jamo."""
    global _COMPOSES_AFTER
    if _COMPOSES_AFTER is None:
        import unicodedata

        seconds = set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))
        for cp in range(0x80, 0x30000):  # no canonical decomposition lies above U+2FA1D
            d = unicodedata.decomposition(chr(cp))
            if d and not d.startswith("<"):
                parts = d.split()
                if len(parts) == 2:
                    seconds.add(int(parts[1], 16))
        _COMPOSES_AFTER = frozenset(seconds)
    return _COMPOSES_AFTER


def _table_size(n: int, load: int) -> int:
    size = 1
    while size < load * max(1, n):
        size *= 2
    return size


def _slot_shift(size: int) -> int:
    """Right shift that takes a 64-bit hash to a slot of a power-of-two table."""
    return 65 - size.bit_length()


def build_automaton(patterns: Sequence[Sequence[str]]) -> Automaton:
    """The automaton of ``patterns``, each a sequence of normalised tokens (non-empty)."""
    ids: dict[bytes, int] = {}
    for p in patterns:
        if not p:
            raise ValueError("empty pattern")
        for t in p:
            ids.setdefault(t.encode(), len(ids))
    tokens = list(ids)
    # Token table at load 1/16: a probe of an unknown token (most caption tokens) nearly always
    # finds its slot empty, so that branch predicts well.
    size = _table_size(len(tokens), 16)
    tok_hash = np.zeros(size, dtype=np.uint64)
    tok_id = np.full(size, -1, dtype=np.int32)
    shift = _slot_shift(size)
    starts = {ids[p[0].encode()] for p in patterns}
    start_home = np.zeros(size, dtype=bool)
    for i, t in enumerate(tokens):
        h = token_hash(t)
        s = h >> shift
        if i in starts:
            start_home[s] = True
        while tok_id[s] >= 0:
            s = (s + 1) & (size - 1)
        tok_hash[s], tok_id[s] = h, i
    tok_off = np.zeros(len(tokens) + 1, dtype=np.int64)
    tok_off[1:] = np.cumsum([len(t) for t in tokens])
    tok_bytes = np.frombuffer(b"".join(tokens), dtype=np.uint8).copy()

    # The trie, then failure links breadth first (the textbook construction); each state's
    # outputs include those of its failure chain, so the kernel reads one list per token.
    children: list[dict[int, int]] = [{}]
    own: list[list[int]] = [[]]
    for pi, p in enumerate(patterns):
        s = 0
        for t in p:
            tid = ids[t.encode()]
            if tid not in children[s]:
                children[s][tid] = len(children)
                children.append({})
                own.append([])
            s = children[s][tid]
        own[s].append(pi)
    fail = np.zeros(len(children), dtype=np.int32)
    outputs: list[list[int]] = [[] for _ in children]
    queue = deque(children[0].values())
    while queue:
        s = queue.popleft()
        outputs[s] = own[s] + outputs[fail[s]]
        for tid, child in children[s].items():
            f = int(fail[s])
            while f and tid not in children[f]:
                f = int(fail[f])
            fail[child] = children[f].get(tid, 0) if s else 0
            queue.append(child)
    out_off = np.zeros(len(children) + 1, dtype=np.int64)
    out_off[1:] = np.cumsum([len(o) for o in outputs])
    out_pattern = np.array([p for o in outputs for p in o], dtype=np.int32)
    root_next = np.zeros(len(tokens), dtype=np.int32)
    for tid, child in children[0].items():
        root_next[tid] = child
    edges = [(s, tid, c) for s in range(1, len(children)) for tid, c in children[s].items()]
    gsize = _table_size(len(edges), 4)
    gshift = _slot_shift(gsize)
    goto_key = np.full(gsize, -1, dtype=np.int64)
    goto_next = np.zeros(gsize, dtype=np.int32)
    for s, tid, c in edges:
        key = (s << 32) | tid
        g = ((key * _GOLDEN) & _MASK64) >> gshift
        while goto_key[g] != -1:
            g = (g + 1) & (gsize - 1)
        goto_key[g], goto_next[g] = key, c
    return Automaton(
        tok_hash=tok_hash,
        tok_id=tok_id,
        # The first probe of a caption token (nearly always an empty slot) reads this bitmap,
        # an eighth of a byte a slot (4 KB for ImageNet's names, in L1), instead of tok_id (four
        # bytes a slot), which made matching faster.
        tok_bits=np.packbits(tok_id >= 0, bitorder="little"),
        # A caption token at the root (no partial match) whose home slot holds no pattern's
        # first token cannot start one: skipped without the lookup. Exclusions make common
        # words ("of", "1", "for") known tokens, but they seldom start a pattern.
        start_bits=np.packbits(start_home, bitorder="little"),
        tok_bytes=tok_bytes,
        tok_off=tok_off,
        root_next=root_next,
        goto_key=goto_key,
        goto_next=goto_next,
        fail=fail,
        out_off=out_off,
        out_pattern=out_pattern,
        pattern_tokens=np.array([len(p) for p in patterns], dtype=np.int64),
    )


def scan(
    automaton: Automaton,
    values: np.ndarray,
    offsets: np.ndarray,
    lut: np.ndarray,
    entities: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Match rows ``values[offsets[i]:offsets[i+1]]`` (uint8 buffer, int64 offsets).

    ``lut`` is :data:`LUT_RAW` for captions as they are, :data:`LUT_NORMALISED` for text
    from the Unicode path. Returns ``(row, start, end, pattern, special)``: one entry per hit
    (int64 arrays, in row order, then by the end of the hit), and a bool per row that was
    abandoned for the Unicode path (never set with :data:`LUT_NORMALISED`).
    """
    from pipeline.text_filter.kernels import scan as kernel

    n = len(offsets) - 1
    special = np.zeros(n, dtype=np.bool_)
    a = automaton
    cap = max(1024, n)
    while True:
        hits = [np.empty(cap, dtype=np.int64) for _ in range(4)]
        nh = kernel(
            values,
            offsets,
            lut,
            *entities,
            codepoint_table(),
            a.tok_hash,
            a.tok_id,
            a.tok_bits,
            a.start_bits,
            a.tok_bytes,
            a.tok_off,
            a.root_next,
            a.goto_key,
            a.goto_next,
            a.fail,
            a.out_off,
            a.out_pattern,
            a.pattern_tokens,
            np.uint64(_slot_shift(len(a.tok_id))),
            np.uint64(_slot_shift(len(a.goto_key))),
            special,
            *hits,
        )
        if nh <= cap:
            return (*(h[:nh] for h in hits), special)
        # More hits than room: run again with room for all (the kernel counted them).
        cap = int(nh)
        special[:] = False
