"""Compiled loops of the rank-value tokenizer (numba), around numpy's SIMD row-wise argsort.

`fill_rows` computes each entry's scaled value and lays a block's rows into a padded matrix;
`emit_rows` reads the argsort back, puts runs of tied values into column order and writes the
flat token stream. Together they replace a dozen whole-block numpy temporaries with two passes.
`counts_ok` is the raw-count check of every chunk read from a user's file, in one pass.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def counts_ok(data):
    """True when every value is finite, >= 0 and a whole number, as raw counts are: one pass and
    no temporaries, where numpy's checks take four passes and a rounded copy."""
    for x in data:
        if not (x >= 0 and x < np.inf and x == np.floor(x)):
            return False
    return True


@numba.njit(cache=True, nogil=True, error_model="numpy")
def fill_rows(indptr, indices, data, totals, target, position, medians, tokens, r0, r1, neg, entry_tokens):
    """Rows r0..r1 into `neg` (minus each kept entry's value, then +inf) and `entry_tokens`, in
    column order; returns the kept entries per row.

    The value is Geneformer's `counts / n_counts * 10_000 / median` in numpy's operand order and
    dtypes: `data`, `totals` and `target` share one float dtype (the promoted dtype of the
    division), the median division is float64. Entries outside the vocabulary (position < 0) and
    values that are not > 0 (explicit zeros, 0/0) are dropped.
    """
    counts = np.zeros(r1 - r0, dtype=np.int64)
    width = neg.shape[1]
    for r in range(r0, r1):
        row = r - r0
        k = 0
        total = totals[r]
        for i in range(indptr[r], indptr[r + 1]):
            p = position[indices[i]]
            if p < 0:
                continue
            value = np.float64(data[i] / total * target) / medians[p]
            if not value > 0:
                continue
            neg[row, k] = -value
            entry_tokens[row, k] = tokens[p]
            k += 1
        for j in range(k, width):
            neg[row, j] = np.inf
        counts[row] = k
    return counts


@numba.njit(cache=True, nogil=True, error_model="numpy")
def emit_rows(neg, order, entry_tokens, counts, length, cls_id, flat):
    """Per row `<cls>` then the tokens of its first `length - 1` entries by `order`, where each run
    of equal values is re-ordered by column (the order a stable sort gives)."""
    out = 0
    for row in range(counts.size):
        n = counts[row]
        take = length[row] - 1
        flat[out] = cls_id
        out += 1
        j = 0
        while j < take:
            value = neg[row, order[row, j]]
            end = j + 1
            while end < n and neg[row, order[row, end]] == value:
                end += 1
            if end - j > 1:
                order[row, j:end] = np.sort(order[row, j:end])
            stop = min(end, take)
            for m in range(j, stop):
                flat[out] = entry_tokens[row, order[row, m]]
                out += 1
            j = end
