"""From a batch's term hits to each caption's outcome: the rules after the scan, in numpy over
all hits of a batch at once (whatever engine found them).

1. A hit inside a longer hit of another owner does not count (``rose`` in ``desert rose``),
   except that an exclusion cancels only its own name's hits (``dress pants`` cancels the
   dress, not the trousers), and a kind word or year is hidden only by a longer kind word
   (``van`` in ``cargo van``). A caption whose every class hit was cancelled by exclusions is
   *excluded*.
2. Each remaining class or family hit names a set of candidate classes. Kind words rule out
   candidates of other kinds (a caption naming several kinds rules out those that fit none);
   caption years rule out candidates further than ``max_year_gap`` from their year, and of
   classes whose names differ only in the year (a car's generations), all but the nearest.
   A caption whose every candidate is ruled out is *contradicted*.
3. The candidates the remaining hits agree on (their intersection) are the caption's: one
   class, or several (a *family* row: ``label`` is the smallest, the image stage picks). Hits
   that agree on nothing make the caption *ambiguous*.

Rows whose hits all belong to one class (nearly every matched caption) take a shortcut.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.text_filter.terms import CLASS, EXCLUDED, FAMILY, KIND, Owners

NONE, AMBIGUOUS, EXCLUDED_ROW, CONTRADICTED = -1, -2, -3, -4


def _empty() -> np.ndarray:
    return np.zeros(0, np.int64)


@dataclass
class BatchMatches:
    """Per-row outcome of matching one batch.

    ``label[i]`` is the class of row ``i``, or ``NONE`` (-1), ``AMBIGUOUS`` (-2),
    ``EXCLUDED_ROW`` (-3: every class it names lies inside an excluded phrase) or
    ``CONTRADICTED`` (-4: a kind word or year rules out every class it names); ``term[i]`` the
    index (into ``Matcher.terms``) of the term that decided it.

    ``cand_row``, ``cand_label`` (sorted by row, then label): the candidate classes of each
    matched row that may be several classes (a family); ``label`` is the smallest of them.
    ``amb_row``, ``amb_label``, ``amb_term`` (sorted by row, then label): one entry per thing an
    ambiguous row names (a class, or a family's smallest candidate), with the first term (by
    position) that names it (for ``keep_ambiguous``); ``amb_cand_entry``, ``amb_cand_label``
    list the candidates of entries with several. ``out_row``, ``out_label``: the classes an
    excluded or contradicted row named (for per-class counts).
    """

    label: np.ndarray
    term: np.ndarray
    cand_row: np.ndarray = field(default_factory=_empty)
    cand_label: np.ndarray = field(default_factory=_empty)
    amb_row: np.ndarray = field(default_factory=_empty)
    amb_label: np.ndarray = field(default_factory=_empty)
    amb_term: np.ndarray = field(default_factory=_empty)
    amb_cand_entry: np.ndarray = field(default_factory=_empty)
    amb_cand_label: np.ndarray = field(default_factory=_empty)
    out_row: np.ndarray = field(default_factory=_empty)
    out_label: np.ndarray = field(default_factory=_empty)

    @property
    def labels_all(self) -> dict[int, list[tuple[int, int]]]:
        """``{row: [(label, term), ...]}`` of the ambiguous rows, by label."""
        out: dict[int, list[tuple[int, int]]] = {}
        for r, la, te in zip(
            self.amb_row.tolist(), self.amb_label.tolist(), self.amb_term.tolist()
        ):
            out.setdefault(r, []).append((la, te))
        return out

    def candidates(self) -> dict[int, list[int]]:
        """``{row: [classes]}`` of the matched rows with several candidates."""
        out: dict[int, list[int]] = {}
        for r, la in zip(self.cand_row.tolist(), self.cand_label.tolist()):
            out.setdefault(r, []).append(la)
        return out


def _runs(*keys: np.ndarray) -> np.ndarray:
    """True at the first of each run of equal keys (rows sorted by them)."""
    first = np.zeros(len(keys[0]), dtype=bool)
    first[:1] = True
    for k in keys:
        first[1:] |= k[1:] != k[:-1]
    return first


def _mask(n: int, idx: np.ndarray) -> np.ndarray:
    """A bool array of ``n``, True at ``idx`` (a set test by indexing, not a sort)."""
    m = np.zeros(n, dtype=bool)
    m[idx] = True
    return m


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For items with ``counts`` entries each: (item of each entry, entry's index within it)."""
    item = np.repeat(np.arange(len(counts)), counts)
    within = np.arange(len(item)) - np.repeat(np.cumsum(counts) - counts, counts)
    return item, within


def resolve(
    n: int,
    rows: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    terms: np.ndarray,
    term_owner: np.ndarray,
    owners: Owners,
    years: tuple[np.ndarray, np.ndarray] | None = None,
    wide: np.ndarray | None = None,
) -> BatchMatches:
    """The outcome of ``n`` rows from their hits: row, start and end offset (comparable within
    a row) and term index of each, in any order; ``years``: ``(row, year)`` of the year tokens
    of (at least) the rows with a class or family hit, where the rules have class years;
    ``wide``: True for the hits of patterns of two or more tokens (the only ones that can hold
    another hit; None: any may)."""
    label = np.full(n, NONE, dtype=np.int64)
    term = np.full(n, -1, dtype=np.int64)
    if len(rows) == 0:
        return BatchMatches(label, term)
    own = term_owner[terms]
    wide = np.ones(len(rows), dtype=bool) if wide is None else wide
    y_rows, y_vals = years if years is not None else (_empty(), _empty())
    if not owners.plain:
        # Kind words are everywhere ("truck"); only rows naming a class or family need them.
        keep = _mask(n, rows[owners.kind[own] <= FAMILY])[rows]
        if not keep.all():
            rows, start, end, terms, own, wide = (
                x[keep] for x in (rows, start, end, terms, own, wide)
            )
            if not len(rows):
                return BatchMatches(label, term)
    order = _position_order(rows, start, end, terms)
    rows, start, end, terms, own, wide = (x[order] for x in (rows, start, end, terms, own, wide))
    kind = owners.kind[own]
    first = _runs(rows)
    gstart = np.flatnonzero(first)
    single = np.minimum.reduceat(own, gstart) == np.maximum.reduceat(own, gstart)
    gkind = kind[gstart]
    # Rows whose hits all belong to one class: the common case, resolved at once.
    one = single & (gkind == CLASS)
    if len(y_rows):
        has_year = np.zeros(n, dtype=bool)
        has_year[y_rows] = True
        one &= ~has_year[rows[gstart]]
    label[rows[gstart[one]]] = own[gstart[one]]
    term[rows[gstart[one]]] = terms[gstart[one]]
    positive = (kind == CLASS) | (kind == FAMILY)
    gpos = np.maximum.reduceat(positive.view(np.int8), gstart).astype(bool)
    slow_g = gpos & ~one
    if not slow_g.any():
        return BatchMatches(label, term)
    group = np.cumsum(first) - 1
    slow = np.flatnonzero(slow_g[group])
    # Containment, pairwise within the rows naming several owners.
    dropped = np.zeros(len(rows), dtype=bool)
    by_excl = np.zeros(len(rows), dtype=bool)
    multi = slow[~single[group[slow]]]
    if len(multi):
        # Each hit against the row's hits that could hold it (of two or more tokens): a row
        # repeating one word a thousand times costs a thousand pairs, not a million.
        cont = multi[wide[multi]]
        per_group = np.bincount(group[cont], minlength=len(gstart))
        cstart = np.cumsum(per_group) - per_group
        k = per_group[group[multi]]
        j = np.repeat(multi, k)
        i = cont[cstart[group[j]] + _expand(k)[1]]
        tgt = owners.target[own[i]]
        # A kind word inside a class's own name still describes the caption (the "coupe" of
        # "Audi S5 Coupe 2012"); only a longer kind word hides one ("van" in "cargo van").
        attr = kind[j] == KIND
        inside = (
            (start[i] <= start[j])
            & (end[j] <= end[i])
            & (end[j] - start[j] < end[i] - start[i])
            & (own[i] != own[j])
            & ((tgt < 0) | (tgt == own[j]))
            & (~attr | (kind[i] == KIND))
        )
        dropped[j[inside]] = True
        by_excl[j[inside & (kind[i] == EXCLUDED)]] = True
    alive = slow[~dropped[slow]]
    kp = alive[positive[alive]]
    if owners.plain:
        return _plain(label, term, rows, terms, own, kp, slow, positive, by_excl, owners)
    out_rows: list[np.ndarray] = []
    out_labels: list[np.ndarray] = []
    # Excluded: class hits, all cancelled by exclusions.
    swallowed = slow[positive[slow] & by_excl[slow]]
    if len(swallowed):
        has_kept = np.zeros(n, dtype=bool)
        has_kept[rows[kp]] = True
        sw = swallowed[~has_kept[rows[swallowed]]]
        if len(sw):
            label[rows[sw]] = EXCLUDED_ROW
            r, m = _members(rows[sw], own[sw], owners)
            out_rows.append(r)
            out_labels.append(m)
    if not len(kp):
        return _finish(label, term, out_rows, out_labels)

    # Distinct (row, owner) pairs of the class and family hits, each with its first hit.
    o2 = np.lexsort((kp, own[kp], rows[kp]))
    kp2 = kp[o2]
    f2 = _runs(rows[kp2], own[kp2])
    ph = kp2[f2]  # each pair's first hit
    pr, po, pt = rows[ph], own[ph], terms[ph]
    cnt = owners.members_off[po + 1] - owners.members_off[po]
    pair, within = _expand(cnt)
    mem = owners.members[owners.members_off[po][pair] + within]
    tr = pr[pair]
    ok = np.ones(len(mem), dtype=bool)
    ka = alive[kind[alive] == KIND]
    if len(ka):
        rk = np.zeros(n, dtype=np.uint64)
        np.bitwise_or.at(rk, rows[ka], owners.kind_mask[own[ka]])
        has = np.zeros(n, dtype=bool)
        has[rows[ka]] = True
        cm = owners.class_kinds[mem]
        ok &= ~has[tr] | (cm == 0) | ((cm & rk[tr]) != 0)
    if len(y_rows):
        ok &= _year_ok(n, y_rows, y_vals, pair, mem, tr, ok, owners)
    # Pairs with no candidate left are ruled out; rows with none left are contradicted.
    pair_ok = np.bincount(pair[ok], minlength=len(pr))
    live = pair_ok > 0
    row_live = np.bincount(pr[live], minlength=n)
    dead_rows = np.unique(pr[~live])
    dead_rows = dead_rows[row_live[dead_rows] == 0]
    if len(dead_rows):
        label[dead_rows] = CONTRADICTED
        d = _mask(n, dead_rows)[tr]
        out_rows.append(tr[d])
        out_labels.append(mem[d])
    keep = ok & live[pair]
    mem, tr, pair = mem[keep], tr[keep], pair[keep]
    # The candidates every live pair of a row agrees on.
    o3 = np.lexsort((mem, tr))
    tr3, mem3 = tr[o3], mem[o3]
    f3 = _runs(tr3, mem3)
    s3 = np.flatnonzero(f3)
    times = np.diff(np.r_[s3, len(tr3)])
    agreed = times == row_live[tr3[s3]]
    a_row, a_mem = tr3[s3[agreed]], mem3[s3[agreed]]
    has_agreed = np.zeros(n, dtype=bool)
    has_agreed[a_row] = True
    live_rows = np.flatnonzero(row_live)
    sure = live_rows[has_agreed[live_rows]]
    # Agreed rows: the smallest agreed class; the term of the most specific pair (fewest live
    # candidates), the first by position among equals.
    fa = _runs(a_row)
    label[a_row[fa]] = a_mem[fa]
    lp = np.flatnonzero(live & has_agreed[pr])
    best = lp[np.lexsort((ph[lp], pair_ok[lp], pr[lp]))]
    bf = _runs(pr[best])
    term[pr[best[bf]]] = pt[best[bf]]
    several = np.bincount(a_row, minlength=n)[sure] > 1
    cand = _mask(n, sure[several])[a_row]
    cand_row, cand_label = a_row[cand], a_mem[cand]
    # Rows whose live pairs agree on nothing: ambiguous, one entry per live pair.
    amb_rows = live_rows[~has_agreed[live_rows]]
    if not len(amb_rows):
        return _finish(label, term, out_rows, out_labels, cand_row, cand_label)
    label[amb_rows] = AMBIGUOUS
    ap = np.flatnonzero(live & ~has_agreed[pr])
    e_mem = _mask(len(pr), ap)[pair]
    e_pair, e_m = pair[e_mem], mem[e_mem]
    o4 = np.lexsort((e_m, e_pair))
    e_pair, e_m = e_pair[o4], e_m[o4]
    fe = _runs(e_pair)
    ent_pair, ent_label = e_pair[fe], e_m[fe]  # one entry per pair: its smallest candidate
    ent_rows, ent_term = pr[ent_pair], pt[ent_pair]
    # By row, then label; the first pair (by position) of a label kept when two share one.
    o5 = np.lexsort((ph[ent_pair], ent_label, ent_rows))
    ent = [x[o5] for x in (ent_pair, ent_label, ent_rows, ent_term)]
    f5 = _runs(ent[2], ent[1])
    ent_pair, ent_label, ent_rows, ent_term = (x[f5] for x in ent)
    # The term of an ambiguous row: its first class or family hit by position.
    fp = ap[np.lexsort((ph[ap], pr[ap]))]
    ff = _runs(pr[fp])
    term[pr[fp[ff]]] = pt[fp[ff]]
    size = np.bincount(e_pair, minlength=len(pr))[ent_pair]
    entry_of_pair = np.full(len(pr), -1, dtype=np.int64)
    entry_of_pair[ent_pair] = np.arange(len(ent_pair))
    multi_ent = size > 1
    c = np.flatnonzero(_mask(len(pr), ent_pair[multi_ent])[e_pair])
    c = c[np.lexsort((e_m[c], entry_of_pair[e_pair[c]]))]
    return _finish(
        label,
        term,
        out_rows,
        out_labels,
        cand_row,
        cand_label,
        ent_rows,
        ent_label,
        ent_term,
        entry_of_pair[e_pair[c]],
        e_m[c],
    )


def _position_order(
    rows: np.ndarray, start: np.ndarray, end: np.ndarray, terms: np.ndarray
) -> np.ndarray:
    """The order of hits by row, then start; ties (hits starting together) by end, then term,
    so that every engine's hits come out alike. One stable sort of a packed key: the hits come
    nearly in order already (a row at a time), which a stable sort finishes in linear time."""
    if len(start) and int(start.max()) >= 1 << 32:  # a batch of over 4 GB: never, but exact
        return np.lexsort((terms, end, start, rows))
    key = (rows.astype(np.int64) << 32) | start.astype(np.int64)
    order = np.argsort(key, kind="stable")
    k = key[order]
    tie = k[1:] == k[:-1]
    if tie.any():
        tied = np.zeros(len(k), dtype=bool)
        tied[1:] = tie
        tied[:-1] |= tie
        pos = np.flatnonzero(tied)
        run = np.cumsum(np.r_[True, ~tie])[pos]
        sub = order[pos]
        order[pos] = sub[np.lexsort((terms[sub], end[sub], run))]
    return order


def _plain(label, term, rows, terms, own, kp, slow, positive, by_excl, owners) -> BatchMatches:
    """The rest of :func:`resolve` for rules without families, kind words or years (most
    datasets): each row's remaining class hits name one class, or it is ambiguous."""
    out_rows, out_labels = [], []
    swallowed = slow[positive[slow] & by_excl[slow]]
    if len(swallowed):
        has_kept = np.zeros(len(label), dtype=bool)
        has_kept[rows[kp]] = True
        sw = swallowed[~has_kept[rows[swallowed]]]
        if len(sw):
            label[rows[sw]] = EXCLUDED_ROW
            out_rows.append(rows[sw])
            out_labels.append(own[sw])
    if not len(kp):
        return _finish(label, term, out_rows, out_labels)
    r, o, t = rows[kp], own[kp], terms[kp]
    first = _runs(r)
    ks = np.flatnonzero(first)
    one = np.minimum.reduceat(o, ks) == np.maximum.reduceat(o, ks)
    label[r[ks]] = np.where(one, o[ks], AMBIGUOUS)
    term[r[ks]] = t[ks]  # the first by position (an ambiguous row's too)
    amb = ~one[np.cumsum(first) - 1]
    if not amb.any():
        return _finish(label, term, out_rows, out_labels)
    r, o, t = r[amb], o[amb], t[amb]
    k = np.lexsort((o, r))  # stable: position order within (row, class)
    r, o, t = r[k], o[k], t[k]
    f = _runs(r, o)
    return _finish(label, term, out_rows, out_labels, amb_row=r[f], amb_label=o[f], amb_term=t[f])


def _members(rows: np.ndarray, own: np.ndarray, owners: Owners) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (row, class) pairs of the classes the owners ``own`` name."""
    cnt = owners.members_off[own + 1] - owners.members_off[own]
    item, within = _expand(cnt)
    m = owners.members[owners.members_off[own][item] + within]
    r = rows[item]
    return r, m


def _year_ok(
    n: int,
    y_rows: np.ndarray,
    y_vals: np.ndarray,
    pair: np.ndarray,
    mem: np.ndarray,
    tr: np.ndarray,
    ok: np.ndarray,
    owners: Owners,
) -> np.ndarray:
    """Per candidate (``pair``, ``mem``, in row ``tr``): False where the row's years rule it
    out. A candidate with a year survives when, for some caption year, it is within the
    maximum gap and no candidate of the same pair and year group (not ruled out by kind,
    ``ok``) is nearer. Candidates without a year, and rows without years, are never ruled out.
    """
    o = np.lexsort((y_vals, y_rows))
    y_rows, y_vals = y_rows[o], y_vals[o]
    f = _runs(y_rows, y_vals)
    y_rows, y_vals = y_rows[f], y_vals[f]
    ny = np.bincount(y_rows, minlength=n)
    yoff = np.r_[0, np.cumsum(ny)]
    cy = owners.class_year[mem]
    test = np.flatnonzero(ok & (cy > 0) & (ny[tr] > 0))
    result = np.ones(len(mem), dtype=bool)
    if not len(test):
        return result
    result[test] = False
    q, w = _expand(ny[tr[test]])
    qt = test[q]
    qy = y_vals[yoff[tr[qt]] + w]
    d = np.abs(qy - cy[qt])
    gap = owners.max_year_gap
    far = np.iinfo(np.int64).max
    if gap >= 0:
        d = np.where(d <= gap, d, far)
    yg = owners.year_group[mem[qt]]
    o = np.lexsort((d, qy, yg, pair[qt]))
    fs = _runs(pair[qt][o], yg[o], qy[o])
    best = np.minimum.reduceat(d[o], np.flatnonzero(fs))
    dmin = best[np.cumsum(fs) - 1]
    win = (d[o] == dmin) & (d[o] < far)
    result[qt[o][win]] = True
    return result


def _finish(
    label,
    term,
    out_rows,
    out_labels,
    cand_row=None,
    cand_label=None,
    amb_row=None,
    amb_label=None,
    amb_term=None,
    amb_cand_entry=None,
    amb_cand_label=None,
) -> BatchMatches:
    e = _empty()
    out_r = np.concatenate(out_rows) if out_rows else e
    out_l = np.concatenate(out_labels) if out_labels else e
    if len(out_r):
        o = np.lexsort((out_l, out_r))
        out_r, out_l = out_r[o], out_l[o]
        f = _runs(out_r, out_l)
        out_r, out_l = out_r[f], out_l[f]
    return BatchMatches(
        label,
        term,
        e if cand_row is None else cand_row,
        e if cand_label is None else cand_label,
        e if amb_row is None else amb_row,
        e if amb_label is None else amb_label,
        e if amb_term is None else amb_term,
        e if amb_cand_entry is None else amb_cand_entry,
        e if amb_cand_label is None else amb_cand_label,
        out_r,
        out_l,
    )
