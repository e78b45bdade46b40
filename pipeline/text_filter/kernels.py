"""Compiled (numba) kernels of the text filter's hot loops: the ``tokens`` matching engine
(see :mod:`pipeline.text_filter.token_ac`), BLAKE2b-128 (uids) and MurmurHash3_x64_128 (URL keys) over
the rows of an Arrow binary array, and the global filters' pass over the sorted match keys.

Imported only where they run, since importing numba is slow. Compiled code is cached on disk
by numba (``__pycache__`` here, or numba's user cache dir where that is read-only), so a process
after the first loads it instead of compiling it again.

Every index in the hot loops is unsigned: numba wraps signed indices for negative values,
which made the byte loops much slower.
"""

from __future__ import annotations

import numba as nb
import numpy as np

U = np.uint64
_jit = nb.njit(cache=True, nogil=True, boundscheck=False)


@_jit
def entity_length(values, i, end, ent_buf, ent_off):
    # Length of the separator entity starting at values[i] ("&"), or 0 for none.
    for e in range(len(ent_off) - 1):
        a = U(ent_off[e])
        n = U(ent_off[e + 1]) - a
        if i + n <= end:
            same = True
            for k in range(U(1), n):
                if values[i + k] != ent_buf[a + k]:
                    same = False
                    break
            if same:
                return n
    return U(0)


@_jit
def utf8_char(values, i, end):
    # (code point, byte length) of the UTF-8 character at values[i] (a byte >= 0x80), or
    # length 0 for an ill-formed sequence (the Unicode Standard's table 3-7: no overlongs, no
    # surrogates, nothing above U+10FFFF).
    b0 = U(values[i])
    if b0 < U(0xC2) or b0 > U(0xF4):
        return U(0), U(0)
    n = U(2) if b0 < U(0xE0) else (U(3) if b0 < U(0xF0) else U(4))
    if i + n > end:
        return U(0), U(0)
    b1 = U(values[i + U(1)])
    lo = U(0x80)
    hi = U(0xBF)
    if b0 == U(0xE0):
        lo = U(0xA0)
    elif b0 == U(0xED):
        hi = U(0x9F)
    elif b0 == U(0xF0):
        lo = U(0x90)
    elif b0 == U(0xF4):
        hi = U(0x8F)
    if b1 < lo or b1 > hi:
        return U(0), U(0)
    cp = b0 & (U(0x1F) if n == U(2) else (U(0x0F) if n == U(3) else U(0x07)))
    cp = (cp << U(6)) | (b1 & U(0x3F))
    for k in range(U(2), n):
        b = U(values[i + k])
        if b < U(0x80) or b > U(0xBF):
            return U(0), U(0)
        cp = (cp << U(6)) | (b & U(0x3F))
    return cp, n


@_jit
def tokenize(values, s, end, lut, ent_buf, ent_off, ent_start, cp_class, unicode, ts, te, th):
    # Token boundaries and hashes of values[s:end] into ts/te/th; the token count, or -1
    # when the row needs the Unicode path. Boundaries are written without branches (a branch
    # per token boundary mispredicts); an entity or a separator character is jumped over (a
    # skip counter tested on every byte cost a third more). Non-ASCII characters follow
    # cp_class (pipeline.text_filter.token_ac.CP_*): separators, letters kept as they are, or the row
    # goes to the Unicode path. Compiled twice (``unicode`` a literal): without the non-ASCII
    # branch, which slows the byte loop by a fifth, the loop returns -2 at the first byte
    # >= 0x80 and the caller runs the row again with it.
    nb.literally(unicode)
    ns = U(0)
    ne = U(0)
    prev = U(0)
    h = U(0)
    i = s
    while i < end:
        at = i  # this byte; i moves past an entity or a multi-byte character
        m = lut[values[i]]
        if m == 0:
            if values[i] >= 128:
                if not unicode:
                    return -2
                cp, n = utf8_char(values, i, end)
                if n == U(0):
                    return -1
                c = cp_class[cp]
                if c == 1:  # CP_SEPARATOR
                    m = np.uint8(32)
                elif c == 2:  # CP_KEEP: its bytes are token bytes; all but the last hashed here
                    for k in range(n - U(1)):
                        h = ((h << U(8)) | (h >> U(56))) ^ U(values[i + k])
                    m = values[i + n - U(1)]
                else:
                    return -1
                i += n - U(1)
            else:  # "&": a separator, a separator entity (jumped), or the Unicode path
                m = np.uint8(32)
                if i + U(1) < end and ent_start[values[i + U(1)]]:
                    n = entity_length(values, i, end, ent_buf, ent_off)
                    if n == 0:
                        return -1
                    i += n - U(1)
        tok = U(m != 32)
        ts[ns] = at
        ns += tok & (U(1) - prev)
        te[ne] = at
        th[ne] = h
        ne += prev & (U(1) - tok)
        h = (((h << U(8)) | (h >> U(56))) ^ U(m)) & (U(0) - tok)
        prev = tok
        i += U(1)
    te[ne] = end
    th[ne] = h
    ne += prev
    return np.int64(ne)


@_jit
def scan(
    values,
    offsets,
    lut,
    ent_buf,
    ent_off,
    ent_start,
    cp_class,
    tok_hash,
    tok_id,
    tok_bits,
    start_bits,
    tok_bytes,
    tok_off,
    root_next,
    goto_key,
    goto_next,
    fail,
    out_off,
    out_pattern,
    pattern_tokens,
    tshift,
    gshift,
    special,
    hit_row,
    hit_start,
    hit_end,
    hit_pattern,
):
    n = len(offsets) - 1
    longest = 0
    for r in range(n):
        longest = max(longest, offsets[r + 1] - offsets[r])
    # A row of L bytes holds at most L // 2 + 1 tokens; one more slot for the last write.
    ts = np.empty(longest // 2 + 2, np.uint64)
    te = np.empty(longest // 2 + 2, np.uint64)
    th = np.empty(longest // 2 + 2, np.uint64)
    tmask = U(len(tok_id) - 1)
    gmask = U(len(goto_key) - 1)
    cap = len(hit_row)
    nh = 0
    for r in range(n):
        # Plain ASCII first; at a byte >= 0x80 the row again, with the non-ASCII branch. (The
        # shared arguments as one tuple slowed the loop.)
        s, e = U(offsets[r]), U(offsets[r + 1])
        nt = tokenize(values, s, e, lut, ent_buf, ent_off, ent_start, cp_class, False, ts, te, th)
        if nt == -2:
            nt = tokenize(
                values, s, e, lut, ent_buf, ent_off, ent_start, cp_class, True, ts, te, th
            )
        if nt < 0:
            special[r] = True
            continue
        state = 0
        for k in range(U(nt)):
            h = th[k] * U(0x9E3779B97F4A7C15)
            slot = h >> tshift
            # At the root (most tokens), only a pattern's first token can move: one bitmap of
            # their home slots rules out the rest, unknown or not. Past the root, an empty slot
            # means an unknown token, which goes back to it.
            if state == 0:
                if not (start_bits[slot >> U(3)] >> (slot & U(7))) & U(1):
                    continue
            elif not (tok_bits[slot >> U(3)] >> (slot & U(7))) & U(1):
                state = 0
                continue
            tid = -1
            while tok_id[slot] >= 0:
                if tok_hash[slot] == h:
                    t = tok_id[slot]
                    a = U(tok_off[t])
                    b = U(tok_off[t + 1])
                    s0 = ts[k]
                    if b - a == te[k] - s0:
                        same = True
                        for j in range(b - a):
                            c = lut[values[s0 + j]]
                            if (c if c != 0 else values[s0 + j]) != tok_bytes[a + j]:
                                same = False
                                break
                        if same:
                            tid = t
                            break
                slot = (slot + U(1)) & tmask
            if tid < 0:
                state = 0
                continue
            while True:
                if state == 0:
                    state = root_next[tid]
                    break
                key = (np.int64(state) << 32) | tid
                g = (U(key) * U(0x9E3779B97F4A7C15)) >> gshift
                nxt = -1
                while goto_key[g] != -1:
                    if goto_key[g] == key:
                        nxt = goto_next[g]
                        break
                    g = (g + U(1)) & gmask
                if nxt >= 0:
                    state = nxt
                    break
                state = fail[state]
            for o in range(out_off[state], out_off[state + 1]):
                p = out_pattern[o]
                if nh < cap:
                    hit_row[nh] = r
                    hit_start[nh] = ts[k + U(1) - U(pattern_tokens[p])]
                    hit_end[nh] = te[k]
                    hit_pattern[nh] = p
                nh += 1
    return nh


# ---------------------------------------------------------------------- BLAKE2b-128
# RFC 7693, unkeyed, 16-byte digest: the same bytes as hashlib.blake2b(data, digest_size=16),
# faster than calling hashlib once per row (bench/hashing.py; tests compare the two on every
# block boundary). Used for row uids, which every stage must agree on.

BLAKE2B_IV = np.array(
    [
        0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
        0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
    ],
    dtype=np.uint64,
)  # fmt: skip
_inline = nb.njit(cache=True, inline="always")


@_inline
def _mix(a, b, c, d, x, y):
    # The G function: rotations by 32, 24, 16 and 63.
    a = a + b + x
    d = d ^ a
    d = (d >> U(32)) | (d << U(32))
    c = c + d
    b = b ^ c
    b = (b >> U(24)) | (b << U(40))
    a = a + b + y
    d = d ^ a
    d = (d >> U(16)) | (d << U(48))
    c = c + d
    b = b ^ c
    b = (b >> U(63)) | (b << U(1))
    return a, b, c, d


@_inline
def _round(v, m, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15):
    # One round; s0..s15 is the round's message permutation (literal, so the state stays in
    # registers after inlining: a loop over a permutation table ran slower).
    v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15 = v
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m[s0], m[s1])
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m[s2], m[s3])
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m[s4], m[s5])
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m[s6], m[s7])
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m[s8], m[s9])
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m[s10], m[s11])
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m[s12], m[s13])
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m[s14], m[s15])
    return (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15)


@_jit
def _compress(h, m, t, last, iv):
    # t: bytes hashed so far (messages here are far below 2**64 bytes: the high word is 0).
    v = (
        h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7],
        iv[0], iv[1], iv[2], iv[3], iv[4] ^ t, iv[5], ~iv[6] if last else iv[6], iv[7],
    )  # fmt: skip
    v = _round(v, m, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    v = _round(v, m, 14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3)
    v = _round(v, m, 11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4)
    v = _round(v, m, 7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8)
    v = _round(v, m, 9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13)
    v = _round(v, m, 2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9)
    v = _round(v, m, 12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11)
    v = _round(v, m, 13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10)
    v = _round(v, m, 6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5)
    v = _round(v, m, 10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0)
    v = _round(v, m, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    v = _round(v, m, 14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3)
    for i in range(8):
        h[i] ^= v[i] ^ v[i + 8]


@_jit
def blake2b_128(values, offsets, iv, out):
    # out[r] = BLAKE2b-128 of values[offsets[r]:offsets[r + 1]] (out: uint8 [rows, 16]).
    h = np.empty(8, np.uint64)
    m = np.empty(16, np.uint64)
    for r in range(len(offsets) - 1):
        s = U(offsets[r])
        n = U(offsets[r + 1]) - s
        for i in range(8):
            h[i] = iv[i]
        h[0] ^= U(0x01010010)  # parameter block: digest length 16, no key, fanout 1, depth 1
        done = U(0)
        while True:  # 128-byte blocks, the last zero-padded (one empty block for no bytes)
            take = min(U(128), n - done)
            base = s + done
            full = take >> U(3)  # whole little-endian words, then the tail, then zeros
            for w in range(full):
                b = base + U(8) * w
                m[w] = (
                    U(values[b])
                    | (U(values[b + U(1)]) << U(8))
                    | (U(values[b + U(2)]) << U(16))
                    | (U(values[b + U(3)]) << U(24))
                    | (U(values[b + U(4)]) << U(32))
                    | (U(values[b + U(5)]) << U(40))
                    | (U(values[b + U(6)]) << U(48))
                    | (U(values[b + U(7)]) << U(56))
                )
            if full < U(16):
                word = U(0)
                for k in range(take & U(7)):
                    word |= U(values[base + U(8) * full + k]) << (U(8) * k)
                m[full] = word
                for w in range(full + U(1), U(16)):
                    m[w] = U(0)
            done += take
            last = done >= n
            _compress(h, m, done, last, iv)
            if last:
                break
        for k in range(8):
            out[r, k] = (h[0] >> U(8 * k)) & U(0xFF)
            out[r, 8 + k] = (h[1] >> U(8 * k)) & U(0xFF)


# ---------------------------------------------------------------------- MurmurHash3 x64-128
# Austin Appleby's MurmurHash3_x64_128 (seed 0): the URL keys of the text filter's global
# de-duplication, which need a well-mixed 128-bit digest, not a cryptographic one. A URL (47
# bytes on average) is one BLAKE2b block of twelve rounds, but three cheap Murmur blocks: a
# seventh of the time. The numpy fallback in pipeline.text_filter.stage gives the same words (tests
# compare both with the mmh3 package).

_M1 = U(0x87C37B91114253D5)
_M2 = U(0x4CF5AD432745937F)


@_inline
def _rotl(x, r):
    return (x << U(r)) | (x >> U(64 - r))


@_inline
def _fmix(k):
    k ^= k >> U(33)
    k *= U(0xFF51AFD7ED558CCD)
    k ^= k >> U(33)
    k *= U(0xC4CEB9FE1A85EC53)
    return k ^ (k >> U(33))


@_inline
def _load64(values, b, n):
    # The n (<= 8) little-endian bytes at values[b], zero-extended.
    w = U(0)
    for k in range(n):
        w |= U(values[b + U(k)]) << U(8 * k)
    return w


@_jit
def murmur3_128(values, offsets, out):
    # out[r] = (h1, h2) of MurmurHash3_x64_128(values[offsets[r]:offsets[r + 1]], seed 0).
    for r in range(len(offsets) - 1):
        s = U(offsets[r])
        n = U(offsets[r + 1]) - s
        h1 = U(0)
        h2 = U(0)
        for blk in range(n >> U(4)):
            b = s + U(16) * blk
            k1 = _load64(values, b, 8)
            k2 = _load64(values, b + U(8), 8)
            h1 ^= _rotl(k1 * _M1, 31) * _M2
            h1 = (_rotl(h1, 27) + h2) * U(5) + U(0x52DCE729)
            h2 ^= _rotl(k2 * _M2, 33) * _M1
            h2 = (_rotl(h2, 31) + h1) * U(5) + U(0x38495AB5)
        rem = n & U(15)
        b = s + (n - rem)
        if rem > U(8):
            h2 ^= _rotl(_load64(values, b + U(8), rem - U(8)) * _M2, 33) * _M1
        if rem > U(0):
            h1 ^= _rotl(_load64(values, b, min(rem, U(8))) * _M1, 31) * _M2
        h1 ^= n
        h2 ^= n
        h1 += h2
        h2 += h1
        h1 = _fmix(h1)
        h2 = _fmix(h2)
        h1 += h2
        h2 += h1
        out[r, 0] = h1
        out[r, 1] = h2


# ---------------------------------------------------------------------- global filters


@_jit
def sorted_keep(order, keys, dedup_urls, kept):
    # One pass over the matches (pipeline.text_filter.stage.KEY_DTYPE records: a row's fields share
    # a cache line, where separate columns cost a miss each) in the order of
    # pipeline.text_filter.stage.global_keep_keys' sort: kept[i] for the first of each (uid, label)
    # and, with dedup_urls, only for the rows of the URL run's first uid that have a URL.
    # Returns (repeated rows, rows dropped by URL).
    dup_rows = 0
    dup_urls = 0
    run_hi = U(0)
    run_lo = U(0)
    for j in range(len(order)):
        k = keys[order[j]]
        # A URL run starts at its first row, a repeated one included (a uid under two URLs,
        # possible with hostile fields: the uid joins URL and caption with 0x1F).
        if j == 0:
            run_hi = k.uid_hi
            run_lo = k.uid_lo
        else:
            p = keys[order[j - 1]]
            if k.url_hi != p.url_hi or k.url_lo != p.url_lo:
                run_hi = k.uid_hi
                run_lo = k.uid_lo
            if k.uid_hi == p.uid_hi and k.uid_lo == p.uid_lo and k.label == p.label:
                dup_rows += 1
                continue
        if not dedup_urls:
            kept[order[j]] = True
            continue
        if k.uid_hi == run_hi and k.uid_lo == run_lo and k.has_url:
            kept[order[j]] = True
        else:
            dup_urls += 1
    return dup_rows, dup_urls
