"""TileDB's COO entries of a chunk -> CSR rows, batch by batch as the read returns them.

A chunk's read arrives as many small batches (the ingest keeps TileDB's result buffers small so
glibc recycles them instead of mapping fresh pages for every chunk). `RowBuffers` appends each
batch with one compiled pass that validates the counts, drops explicit zeros, casts gene indices
to int32 and records where each cell's run of entries starts and what it sums to. Its arrays are
kept and reused from chunk to chunk, so a chunk's rows cost no new memory either.

Stores whose space tile spans every gene (synth-census, most AnnData conversions) return entries
in row-major order: then every run is a whole row and the CSR rows are the buffers as they are.
Other layouts (the Census' square space tiles) go through a counting sort
(`ingest.census._general_rows`) over `entry_cells`.
"""

from __future__ import annotations

import numba
import numpy as np

# state slots of `_append`, carried from batch to batch of one chunk
_LAST_CELL, _LAST_GENE, _ORDERED, _ZEROS, _ENTRIES, _RUNS = range(6)


@numba.njit(cache=True, nogil=True)
def _append(cells, genes, data, start, out_genes, out_counts, run_cells, run_starts, run_sums, state):
    """Append entries `start:` of a batch until the run arrays are full; returns (every count seen
    a finite non-negative integer, largest gene seen, where it stopped)."""
    last_cell, last_gene, ordered = state[_LAST_CELL], state[_LAST_GENE], state[_ORDERED]
    zeros, at, runs = state[_ZEROS], state[_ENTRIES], state[_RUNS]
    valid = True
    largest = -1
    stop = data.size
    total = run_sums[runs - 1] if runs else 0.0  # of the open run, kept in a register
    for i in range(start, data.size):
        cell, gene, value = cells[i], genes[i], data[i]
        new_run = value != 0 and (runs == 0 or run_cells[runs - 1] != cell)
        if new_run and runs == run_cells.size:
            stop = i
            break
        valid &= (value >= 0) & (value == np.floor(value)) & (value < np.inf)
        largest = max(largest, gene)
        # row-major: cells ascending, genes strictly ascending within a cell (so no entry twice)
        ordered &= (cell > last_cell) | ((cell == last_cell) & (gene > last_gene))
        last_cell, last_gene = cell, gene
        if value == 0:  # an explicit zero is no count; the contract's counts are all > 0
            zeros += 1
            continue
        if new_run:
            if runs:
                run_sums[runs - 1] = total
            run_cells[runs] = cell
            run_starts[runs] = at
            runs += 1
            total = 0.0
        out_genes[at] = gene
        out_counts[at] = value
        total += value  # float64: exact for any realistic cell total
        at += 1
    if runs:
        run_sums[runs - 1] = total
    state[_LAST_CELL], state[_LAST_GENE], state[_ORDERED] = last_cell, last_gene, ordered
    state[_ZEROS], state[_ENTRIES], state[_RUNS] = zeros, at, runs
    return valid, largest, stop


class RowBuffers:
    """One chunk's entries as appended so far: gene indices (int32), counts (float32) and runs
    (consecutive entries of one cell: its soma_joinid, first entry, sum of counts)."""

    def __init__(self):
        self._genes = np.empty(0, np.int32)
        self._counts = np.empty(0, np.float32)
        self._run_cells = np.empty(1024, np.int64)
        self._run_starts = np.empty(1024, np.int64)
        self._run_sums = np.empty(1024, np.float64)
        self._state = np.zeros(6, np.int64)
        self.clear()

    def clear(self) -> None:
        self._state[:] = (-1, -1, 1, 0, 0, 0)

    def append(self, cells: np.ndarray, genes: np.ndarray, data: np.ndarray) -> tuple[bool, int]:
        """Add a batch of COO entries; returns (all counts finite non-negative integers, largest
        gene soma_joinid, -1 for an empty batch)."""
        entries = int(self._state[_ENTRIES])
        self._genes, self._counts = (_grown(a, entries, entries + data.size) for a in (self._genes, self._counts))
        valid, largest, at = True, -1, 0
        while True:
            batch_valid, batch_largest, at = _append(cells, genes, data, at, self._genes, self._counts,
                                                     self._run_cells, self._run_starts, self._run_sums, self._state)
            valid, largest = valid and batch_valid, max(largest, batch_largest)
            if at == data.size:
                return bool(valid), int(largest)
            runs = int(self._state[_RUNS])
            self._run_cells, self._run_starts, self._run_sums = (
                _grown(a, runs, runs + 1) for a in (self._run_cells, self._run_starts, self._run_sums))

    @property
    def row_major(self) -> bool:
        return bool(self._state[_ORDERED])

    @property
    def explicit_zeros(self) -> int:
        return int(self._state[_ZEROS])

    @property
    def genes(self) -> np.ndarray:
        return self._genes[:self._state[_ENTRIES]]

    @property
    def counts(self) -> np.ndarray:
        return self._counts[:self._state[_ENTRIES]]

    @property
    def runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(soma_joinid, first entry, sum of counts) of each run, in entry order."""
        n = self._state[_RUNS]
        return self._run_cells[:n], self._run_starts[:n], self._run_sums[:n]

    def entry_cells(self) -> np.ndarray:
        """The soma_joinid of every entry (for the general path only: it costs 8 bytes an entry)."""
        run_cells, run_starts, _ = self.runs
        return np.repeat(run_cells, np.diff(np.append(run_starts, self.genes.size)))


def _grown(array: np.ndarray, keep: int, needed: int) -> np.ndarray:
    """`array`, or a copy of its first `keep` items with room for `needed` when it is too small;
    capacity doubles, so a run of chunks settles on one allocation."""
    if array.size >= needed:
        return array
    grown = np.empty(max(needed, 2 * array.size), array.dtype)
    grown[:keep] = array[:keep]
    return grown


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
