"""TileDB's COO entries of a chunk -> CSR rows, batch by batch as the read returns them.

A chunk's read arrives as many small batches (the ingest keeps TileDB's result buffers small so
glibc recycles them instead of mapping fresh pages for every chunk). `RowBuffers` appends each
batch with one compiled pass that validates the counts, drops explicit zeros, casts gene indices
to int32 and cuts the entries into runs: consecutive entries of one cell with strictly ascending
genes, each with where it starts and what it sums to. Its arrays are kept and reused from chunk
to chunk, so a chunk's rows cost no new memory either.

`whole_rows` turns the runs into rows without touching entries one by one where it can:
- stores whose space tile spans every gene (synth-census `--layout rows`, most AnnData
  conversions) return entries row-major: every run is a whole row, the buffers are the rows;
- the Census' 2048 x 2048 space tiles return a cell as one run per tile of genes, tile after
  tile: sorting the runs by (cell, first gene) and copying each run once makes the rows, O(nnz)
  sequential copies plus a sort of the runs (about one per cell and 2048 genes).
Runs of one cell that interleave (another cell order, a cell written twice) go through a
counting sort of every entry (`ingest.census._general_rows`) over `entry_cells`.
"""

from __future__ import annotations

import numba
import numpy as np

# state slots of `_append`, carried from batch to batch of one chunk
_ZEROS, _ENTRIES, _RUNS = range(3)


@numba.njit(cache=True, nogil=True)
def _append(cells, genes, data, start, out_genes, out_counts, run_cells, run_starts, run_sums, state):
    """Append entries `start:` of a batch until the run arrays are full; returns (every count seen
    a finite non-negative integer, largest gene seen, where it stopped)."""
    zeros, at, runs = state[_ZEROS], state[_ENTRIES], state[_RUNS]
    valid = True
    largest = -1
    stop = data.size
    total = run_sums[runs - 1] if runs else 0.0  # of the open run, kept in a register
    for i in range(start, data.size):
        cell, gene, value = cells[i], genes[i], data[i]
        # A run's genes ascend strictly, so a gene seen twice in a row of entries starts a new
        # run and shows up as overlapping runs (a duplicate) when the rows are made.
        new_run = value != 0 and (runs == 0 or run_cells[runs - 1] != cell or gene <= out_genes[at - 1])
        if new_run and runs == run_cells.size:
            stop = i
            break
        valid &= (value >= 0) & (value == np.floor(value)) & (value < np.inf)
        largest = max(largest, gene)
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
    state[_ZEROS], state[_ENTRIES], state[_RUNS] = zeros, at, runs
    return valid, largest, stop


@numba.njit(cache=True, nogil=True)
def _gather(order, starts, ends, genes, counts, out_genes, out_counts):
    at = 0
    for run in order:
        for i in range(starts[run], ends[run]):
            out_genes[at] = genes[i]
            out_counts[at] = counts[i]
            at += 1


class RowBuffers:
    """One chunk's entries as appended so far: gene indices (int32), counts (float32) and runs
    (consecutive entries of one cell, genes ascending: its soma_joinid, first entry, sum of counts)."""

    def __init__(self):
        self._genes = np.empty(0, np.int32)
        self._counts = np.empty(0, np.float32)
        self._run_cells = np.empty(1024, np.int64)
        self._run_starts = np.empty(1024, np.int64)
        self._run_sums = np.empty(1024, np.float64)
        # Where tile-ordered runs are copied into rows; kept like the others.
        self._row_genes = np.empty(0, np.int32)
        self._row_counts = np.empty(0, np.float32)
        self._state = np.zeros(3, np.int64)
        self.clear()

    def clear(self) -> None:
        self._state[:] = 0

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
        """Every run a whole row, rows ascending: the entries came in row-major order."""
        run_cells = self.runs[0]
        return bool(np.all(run_cells[1:] > run_cells[:-1]))

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

    def whole_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """(soma_joinid, first entry, sum of counts) of each row, ascending by soma_joinid, and the
        rows' gene indices and counts; None when runs of one cell interleave. The arrays are
        views of this buffer's memory, valid until the next `clear`."""
        run_cells, run_starts, run_sums = self.runs
        if self.row_major:
            return run_cells, run_starts, run_sums, self.genes, self.counts
        entries = self.genes.size
        run_ends = np.append(run_starts[1:], entries)
        first, last = self.genes[run_starts], self.genes[run_ends - 1]
        order = np.lexsort((first, run_cells))
        cells = run_cells[order]
        same_cell = cells[1:] == cells[:-1]
        if np.any(same_cell & (first[order][1:] <= last[order][:-1])):
            return None
        self._row_genes, self._row_counts = (_grown(a, 0, entries) for a in (self._row_genes, self._row_counts))
        _gather(order, run_starts, run_ends, self.genes, self.counts, self._row_genes, self._row_counts)
        row_runs = np.flatnonzero(np.append(True, ~same_cell))
        run_out_starts = np.append(0, np.cumsum((run_ends - run_starts)[order]))
        return (cells[row_runs], run_out_starts[row_runs], np.add.reduceat(run_sums[order], row_runs),
                self._row_genes[:entries], self._row_counts[:entries])

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
