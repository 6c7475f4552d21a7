"""TileDB's COO entries of a chunk -> CSR rows: one compiled scan, then the common layout's fast path.

Stores whose space tile spans every gene (synth-census, most AnnData conversions) return a chunk
in row-major order. One branch-light pass over the entries then validates the counts and the
order, after which the rows are a binary search per cell and two casts; the general path (a
counting sort) is left for other layouts, such as the Census' square space tiles.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def scan(cells, genes, data):
    """(all counts finite non-negative integers, entries sorted by cell then gene with no gene
    twice, number of distinct cells, largest gene); branch-free, so it vectorises."""
    if data.size == 0:
        return True, True, 0, -1
    value = data[0]
    valid = (value >= 0) & (value == np.floor(value)) & (value < np.inf)
    ordered = True
    distinct = 1
    largest = genes[0]
    for i in range(1, data.size):
        value = data[i]
        valid &= (value >= 0) & (value == np.floor(value)) & (value < np.inf)
        largest = max(largest, genes[i])
        new_cell = cells[i] != cells[i - 1]
        distinct += new_cell
        ordered &= (cells[i] > cells[i - 1]) | (~new_cell & (genes[i] > genes[i - 1]))
    return valid, ordered, distinct, largest


def row_major_to_csr(joinids: np.ndarray, cells: np.ndarray, genes: np.ndarray, data: np.ndarray,
                     distinct: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(indptr, indices int32, counts float32) of entries sorted by cell then gene (`scan`), over
    the rows `joinids` (ascending); None when some cell is not in `joinids`."""
    indptr = np.append(np.searchsorted(cells, joinids), cells.size)
    # Each row's range starts at its own cell, and there are as many rows with entries as cells.
    nonempty = indptr[1:] > indptr[:-1]
    starts = indptr[:-1][nonempty]
    if indptr[0] != 0 or starts.size != distinct or not np.array_equal(cells[starts], joinids[nonempty]):
        return None
    return indptr, genes.astype(np.int32), data.astype(np.float32, copy=False)


def row_sums(indptr: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Exact float64 sum of each CSR row of integer counts (0 for an empty row)."""
    sums = np.zeros(indptr.size - 1, dtype=np.float64)
    if values.size:
        starts = np.minimum(indptr[:-1], values.size - 1)
        # float32 sums of integer counts are exact below 2**24; only rows above that are redone
        # in float64 (summing everything in float64 costs a cast of every count).
        sums = np.add.reduceat(values, starts).astype(np.float64)
        for row in np.flatnonzero(sums >= 2.0 ** 24):
            sums[row] = values[indptr[row]:indptr[row + 1]].sum(dtype=np.float64)
        sums[indptr[1:] == indptr[:-1]] = 0.0
    return sums
