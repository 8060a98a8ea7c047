"""Exact MinED token alignment: the original's DTW, computed fast and proved exact.

The original (the seed's `dtw`, `fusellm_kernels.reference.alignment.dtw`) fills an N×M
matrix with one Python-level edit-distance call per cell and back-traces from the last cell,
stepping to the smallest of diagonal, up and left (the first on ties). Here:

1. Costs: Levenshtein distances are computed once per pair of *distinct* strings, in C
   (`rapidfuzz.process.cdist`); real tokenizations repeat tokens, so 2048×2048 needs a few
   hundred thousand distances instead of four million.
2. A band: row i keeps only columns [lo_i, hi_i] around a guessed path (source and target
   characters matched by a character-level edit script). Each band row is four vectorised
   operations: with t[j] = min(D[i-1, j], D[i-1, j-1]), D[i, j] = c[i, j] + min(t[j],
   D[i, j-1]) unrolls to D[i, j] = S[j] + min_{k<=j} (t[k] - S[k-1]), S the prefix sum of
   c[i, :], a running minimum.
3. A proof, or a wider band. Cells outside the band enter the band's recurrence with a
   *lower bound* of their true value instead of infinity, so every band value V' is a lower
   bound of the true D. A value is also tagged (stored as 2·V' + tag) with whether some path
   inside the band attains it: tag 0 means V' is attained, hence exact. The back-trace then
   follows the original's rule on these values and checks at each step that the chosen
   neighbour is in the band with tag 0: its value is then exact, and every neighbour before
   it in the rule's order has a lower bound above it, every one after it a lower bound at
   least as large, so the original takes the same step. Any failed check widens the band
   (×4) and starts again; the full matrix (no outside, nothing to prove) ends the sequence.
   The lower bounds: a path that leaves the band first leaves it at an exit cell e, having
   paid at least X(e) = c(e) + min(band values of e's band neighbours) (a lower bound of
   any in-band prefix); it can only come back on the side it left, and each row it spends
   outside costs at least that row's cheapest cell outside the band (a suffix / prefix
   minimum of the row's costs). So G(r) = min(X_up(r), G(r-1) + U(r)) bounds every cell of
   row r above the band, H(r) likewise below it.

Costs are integers and all arithmetic is int64, so values equal the original's float64
values exactly and the back-trace sees the same ties. Memory: at most about 56 bytes per band cell
(2048 × 385 cells: 44 MB; a full 2048 × 2048 fallback: 235 MB) plus the U × V cost table.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

# Half-width of the first band, in target positions; the band grows ×4 per failed proof.
INITIAL_HALF_WIDTH = 192
_INF = (1 << 60) + 1  # encoded infinity: odd (a bound, never "attained"), far from int64 overflow


def min_ed_alignment(
    source_tokens: Sequence[str], target_tokens: Sequence[str], *, source_marker: str, target_marker: str
) -> list[list[int]]:
    """For each target position i, the ascending list of source positions mapped to it.

    Equals the original's `dtw(source_tokens, target_tokens, norm_func)[3]` with norm_func =
    Levenshtein distance of `s.replace(source_marker, "")` and `t.replace(target_marker, "")`,
    ties included. Only the markers are removed (that is what exactness to the original
    needs); for a richer normalisation pass normalised strings to `dtw_mappings` (see
    `fusellm_kernels.align.conventions.token_text`).

    Empty inputs (the original crashes on them): no target tokens gives []; no source tokens
    gives one empty list per target position (no target row has a source).
    """
    source = [t.replace(source_marker, "") for t in source_tokens] if source_marker else list(source_tokens)
    target = [t.replace(target_marker, "") for t in target_tokens] if target_marker else list(target_tokens)
    return dtw_mappings(source, target)


def dtw_mappings(
    source: Sequence[str], target: Sequence[str], *, initial_half_width: int = INITIAL_HALF_WIDTH
) -> list[list[int]]:
    """`min_ed_alignment` on strings already normalised: the cost is plain Levenshtein.

    `initial_half_width` only changes the speed (tests set it small to exercise widening).
    """
    n, m = len(source), len(target)
    if m == 0:
        return []
    if n == 0:
        return [[] for _ in range(m)]
    problem = _Problem(source, target)
    half_width = max(1, initial_half_width)
    path: np.ndarray | None = None
    while True:
        full = 2 * half_width + 1 >= m
        if not full and path is None:
            path = problem.guess_path()
        band = _Band.full(n, m) if full else _Band.around(path, m, half_width)
        mappings = _solve(problem, band)
        if mappings is not None:
            return mappings
        if full:  # nothing lies outside a full band, so its check cannot fail
            raise RuntimeError("internal error: the full-matrix DTW failed its own exactness check")
        half_width *= 4


class _Problem:
    """Distinct strings, their pairwise distances, and per-row outside-band minima."""

    def __init__(self, source: Sequence[str], target: Sequence[str]) -> None:
        self.source, self.target = source, target
        source_unique, self.source_index = np.unique(np.asarray(source, dtype=object), return_inverse=True)
        target_unique, self.target_index = np.unique(np.asarray(target, dtype=object), return_inverse=True)
        self.unique_costs = cdist(
            source_unique.tolist(), target_unique.tolist(), scorer=Levenshtein.distance, dtype=np.int64, workers=1
        )

    def costs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """cost(rows[k], cols[k]) for every k, as one flat gather."""
        width = self.unique_costs.shape[1]
        return self.unique_costs.ravel().take(self.source_index[rows] * width + self.target_index[cols])

    def row_minima(self, band: "_Band") -> tuple[np.ndarray, np.ndarray]:
        """Per row r: the cheapest cost right of the band (q > hi_r) and left of it (q < lo_r),
        _INF where there is no such column.

        The distinct target strings occurring right of hi_r are those whose last occurrence
        is beyond it: with the distinct strings sorted by last occurrence (descending), they
        are a prefix, and the minimum over it a running minimum of the cost table's columns.
        Likewise left of lo_r with first occurrences. [U, V] work, not [U, M].
        """
        m = len(self.target)
        positions = np.arange(m)
        n_targets = self.unique_costs.shape[1]
        last = np.full(n_targets, -1, dtype=np.int64)
        np.maximum.at(last, self.target_index, positions)
        first = np.full(n_targets, m, dtype=np.int64)
        np.minimum.at(first, self.target_index, positions)
        big = np.full((self.unique_costs.shape[0], 1), _INF, dtype=np.int64)

        by_last = np.argsort(-last, kind="stable")
        right_table = np.concatenate([big, np.minimum.accumulate(self.unique_costs[:, by_last], axis=1)], axis=1)
        right_count = np.searchsorted(-last[by_last], -band.hi, side="left")  # strings with last > hi_r
        by_first = np.argsort(first, kind="stable")
        left_table = np.concatenate([big, np.minimum.accumulate(self.unique_costs[:, by_first], axis=1)], axis=1)
        left_count = np.searchsorted(first[by_first], band.lo, side="left")  # strings with first < lo_r
        rows = self.source_index
        return right_table[rows, right_count], left_table[rows, left_count]

    def guess_path(self) -> np.ndarray:
        """For each source position, a target position its characters are matched to."""
        n, m = len(self.source), len(self.target)
        source_text, target_text = "".join(self.source), "".join(self.target)
        source_len = np.fromiter((len(s) for s in self.source), dtype=np.int64, count=n)
        target_len = np.fromiter((len(t) for t in self.target), dtype=np.int64, count=m)
        if not source_text or not target_text:
            return (np.arange(n, dtype=np.int64) * m) // n
        # Target character offset of every source character (and of the end), from a
        # character-level edit script.
        to_target = np.empty(len(source_text) + 1, dtype=np.int64)
        for tag, i1, i2, j1, j2 in Levenshtein.opcodes(source_text, target_text):
            if tag in ("equal", "replace"):
                to_target[i1:i2] = j1 + (np.arange(i2 - i1) * (j2 - j1)) // (i2 - i1)
            elif tag == "delete":
                to_target[i1:i2] = j1
        to_target[-1] = len(target_text)
        source_start = np.cumsum(source_len) - source_len
        target_start = np.cumsum(target_len) - target_len
        middle = to_target[source_start + source_len // 2]
        column = np.searchsorted(target_start, middle, side="right") - 1
        return np.maximum.accumulate(np.clip(column, 0, m - 1))


class _Band:
    """Columns [lo[i], hi[i]] of row i, stored row after row in one flat array.

    Invariants the proof relies on: lo and hi non-decreasing, lo[0] = 0, hi[-1] = M-1 and
    lo[i] <= hi[i-1] + 1 (the band holds a path from the first cell to the last).
    """

    def __init__(self, lo: np.ndarray, hi: np.ndarray) -> None:
        self.lo, self.hi = lo, hi
        self.width = hi - lo + 1
        self.offset = np.cumsum(self.width) - self.width

    @classmethod
    def full(cls, n: int, m: int) -> "_Band":
        return cls(np.zeros(n, dtype=np.int64), np.full(n, m - 1, dtype=np.int64))

    @classmethod
    def around(cls, path: np.ndarray, m: int, half_width: int) -> "_Band":
        hi = np.minimum(path + half_width, m - 1)
        lo = np.maximum(path - half_width, 0)
        # Where one side has text the other lacks (a document truncated at a token count,
        # a BOS token) the path runs along the first or last rows; let those rows span to
        # the matrix's edge.
        ends = max(1, half_width // 8)
        hi[-ends:] = m - 1
        lo[:ends] = 0
        lo[1:] = np.minimum(lo[1:], hi[:-1] + 1)
        return cls(lo, hi)


def _solve(problem: _Problem, band: _Band) -> list[list[int]] | None:
    """Band DP with outside lower bounds, then the checked back-trace; None if unproved."""
    n, m = len(problem.source), len(problem.target)
    lo, hi, width, offset = band.lo, band.hi, band.width, band.offset
    total = int(width.sum())
    rows = np.repeat(np.arange(n), width)
    cols = np.arange(total) - np.repeat(offset - lo, width)
    cost2 = 2 * problem.costs(rows, cols)  # encoded: value 2·c, tag unchanged
    del rows, cols  # peak memory: cell-sized arrays only while they are needed
    inclusive = np.cumsum(cost2)
    inclusive -= np.repeat(inclusive[offset] - cost2[offset], width)  # per-row prefix sums
    exclusive = inclusive - cost2
    right_min, left_min = problem.row_minima(band)
    # Costs of the exit cells: (i, hi_i + 1) right of the band, (i, q) for q in
    # [lo_{i-1}, lo_i) left of it, in one gather each.
    up_exit_cost = (2 * problem.costs(np.arange(n), np.minimum(hi + 1, m - 1))).tolist()
    low_count = np.diff(lo, prepend=0)
    low_start = np.cumsum(low_count) - low_count
    low_cols = np.arange(int(low_count.sum())) - np.repeat(low_start - np.concatenate([[0], lo[:-1]]), low_count)
    low_exit_cost = (2 * problem.costs(np.repeat(np.arange(n), low_count), low_cols)).tolist()

    enc = np.empty(total, dtype=np.int64)
    read = memoryview(enc)  # scalar reads as Python ints, without numpy scalar boxing
    above = [_INF] * n  # G: encoded lower bound of row r right of the band
    below = [_INF] * n  # H: the same left of the band
    lo_l, hi_l, width_l, offset_l = lo.tolist(), hi.tolist(), width.tolist(), offset.tolist()
    right2 = [2 * x for x in right_min.tolist()]
    left2 = [2 * x for x in left_min.tolist()]
    low_start_l = low_start.tolist()

    enc[: width_l[0]] = inclusive[: width_l[0]]  # row 0: left steps from the (0, 0) corner
    if hi_l[0] < m - 1:
        above[0] = (up_exit_cost[0] + read[width_l[0] - 1]) | 1
    ext = np.empty(m + 1, dtype=np.int64)
    minimum, add, running_min = np.minimum, np.add, np.minimum.accumulate
    for i in range(1, n):
        plo, phi, poff = lo_l[i - 1], hi_l[i - 1], offset_l[i - 1]
        clo, chi, coff, cw = lo_l[i], hi_l[i], offset_l[i], width_l[i]
        # Bound left of the band in row i: exits (i, q), q in [plo, clo), or staying below.
        h = _INF
        if clo > 0:
            h = min(_INF, below[i - 1] + left2[i])
            k = low_start_l[i]
            for q in range(plo, clo):
                best_pred = read[poff + q - plo]
                if q > plo:
                    best_pred = min(best_pred, read[poff + q - 1 - plo])
                h = min(h, (low_exit_cost[k] + best_pred) | 1)
                k += 1
            below[i] = h
        # ext[k] = row i-1 at column clo - 1 + k, out-of-band columns at their bounds. ext[0]
        # only meets the first cell, whose left neighbour (bound h) is folded in there.
        if clo > plo:
            head = read[poff + clo - 1 - plo]
        else:
            head = below[i - 1] if clo > 0 else _INF
        ext[0] = min(head, h)
        ext[1 : phi - clo + 2] = enc[poff + clo - plo : poff + phi - plo + 1]
        if chi == phi + 1:
            ext[cw] = above[i - 1]
        elif chi > phi:
            ext[max(phi - clo + 2, 1) : cw + 1] = above[i - 1]
        best = minimum(ext[1 : cw + 1], ext[:cw])
        best -= exclusive[coff : coff + cw]
        # Not in place: an accumulate whose output aliases its input takes numpy's slow path.
        add(running_min(best), inclusive[coff : coff + cw], out=enc[coff : coff + cw])
        if chi < m - 1:
            best_pred = read[coff + cw - 1]
            if phi == chi:
                best_pred = min(best_pred, read[poff + phi - plo])
            above[i] = min((up_exit_cost[i] + best_pred) | 1, above[i - 1] + right2[i], _INF)
    return _checked_backtrace(enc, band, above, below, m)


def _checked_backtrace(
    enc: np.ndarray, band: _Band, above: list[int], below: list[int], m: int
) -> list[list[int]] | None:
    """The original's back-trace on band values; None when a step is not proved."""
    lo, hi, offset = band.lo.tolist(), band.hi.tolist(), band.offset.tolist()
    read = memoryview(enc)
    n = len(lo)
    mappings: list[list[int]] = [[] for _ in range(m)]
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        mappings[j].append(i)
        # The three neighbours' encoded values or bounds; _INF outside the matrix.
        if i > 0:
            plo, phi = lo[i - 1], hi[i - 1]
            base = offset[i - 1] - plo
            if j > phi:
                up = above[i - 1]
            elif j < plo:
                up = below[i - 1]
            else:
                up = read[base + j]
            if j == 0:
                diag = _INF
            elif j - 1 > phi:
                diag = above[i - 1]
            elif j - 1 < plo:
                diag = below[i - 1]
            else:
                diag = read[base + j - 1]
        else:
            up = diag = _INF
        if j == 0:
            left = _INF
        elif j - 1 < lo[i]:
            left = below[i]
        else:
            left = read[offset[i] + j - 1 - lo[i]]
        dv, uv, lv = diag >> 1, up >> 1, left >> 1
        if dv <= uv and dv <= lv:
            chosen, i, j = diag, i - 1, j - 1
        elif uv <= lv:
            chosen, i = up, i - 1
        else:
            chosen, j = left, j - 1
        if chosen & 1 or not lo[i] <= j <= hi[i]:
            return None  # the step depends on a value known only as a bound
    mappings[0].append(0)
    for positions in mappings:
        positions.reverse()
    return mappings
