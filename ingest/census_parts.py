"""Writing parts of `langcell ingest census`: each part's cells cut into chunks, read (by the
`read_chunk`/`build_chunk` a `_PartTask` carries) and encoded through one pipeline, into a parquet
file renamed into place when complete."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from langcell.core.errors import LangCellError
from langcell.core.files import atomic_path, sha256_file
from langcell.ingest import coo_rows
from langcell.ingest.census_store import Source, _plain_type
from langcell.ingest.retry import with_retries

# Test hook: "EVENT:K" SIGKILLs the process the K-th time EVENT happens, so tests can kill a run
# at exactly the moments that matter (mid-part, after a rename but before the manifest update).
CRASH_ENV = "LANGCELL_INGEST_CRASH_AT"



@dataclass(frozen=True)
class _PartTask:
    # The chunk reader of ingest.census (module-level functions, so a task pickles to spawned workers).
    read_chunk: Callable[..., pa.Table]
    build_chunk: Callable[..., pa.Table]
    source: Source
    organism: str
    obs_filter: str
    keep_map: np.ndarray
    obs_columns: list[str]
    chunk_cells: int
    chunk_counts: int
    retries: int
    out: str



def _row_buffers() -> list[coo_rows.RowBuffers]:
    """The chunks in flight in `_write_parts` (one being read, one being encoded, one built in
    between), each with its own buffers, kept across parts so the run settles on one allocation."""
    return [coo_rows.RowBuffers() for _ in range(3)]



@dataclass(frozen=True)
class _Step:
    part: dict[str, Any]
    joinids: np.ndarray
    number: int  # of the chunk within its part
    first: bool
    last: bool



def _write_parts(experiment, task: _PartTask, parts: list[dict[str, Any]], advance: Callable[[int], None],
                 buffers: list[coo_rows.RowBuffers]) -> Iterator[dict[str, Any]]:
    """Write `parts` through one pipeline; yield each part's result, in order, once its file is in place.

    TileDB reads chunk k+1 into the next buffers while parquet encodes chunk k-1 (both release the
    GIL) and this thread turns chunk k into a table. Chunk k+1 takes the buffers of chunk k-2,
    whose write has been waited for. Writes stay in chunk order, so each file is deterministic.
    The pipeline runs on across part boundaries, and a part's file is finished (fsync, rename,
    sha256) in a third thread, so neither lane waits for the other at the end of a part.
    """
    source, X = task.source, experiment.ms["RNA"].X["raw"]
    schema = _cells_schema(experiment.obs.schema, task.obs_columns)
    plan = _chunk_plan(experiment, task, parts)
    step = next(plan, None)
    if step is None:
        return
    files: list[_PartFile] = []
    finishing: collections.deque = collections.deque()
    # The pools are left (waiting for their threads) before an unfinished file is removed, also on errors.
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as lanes, concurrent.futures.ThreadPoolExecutor(1) as finisher:
            def read(step: _Step, number: int):
                what = (f"{source.describe()}: chunk {step.number} of {step.part['name']} ({step.joinids.size} "
                        f"cells, soma_joinid {step.joinids[0]}..{step.joinids[-1]})")
                return lanes.submit(with_retries, functools.partial(
                    task.read_chunk, experiment, X, source, step.joinids, task.obs_columns, task.keep_map.size,
                    buffers[number % len(buffers)]), what, task.retries)

            reading, writing, number = read(step, 0), None, 0
            while step is not None:
                obs = reading.result()
                following = next(plan, None)
                if following is not None:
                    reading = read(following, number + 1)
                table = task.build_chunk(source, step.joinids, obs, buffers[number % len(buffers)], task.keep_map,
                                     schema, task.obs_columns)
                if writing is not None:
                    writing.result()
                    _chunk_written(advance, previous)
                if step.first:
                    files.append(_PartFile(Path(task.out), step.part, schema))
                writing = lanes.submit(files[-1].write, table, step.joinids.size)
                if step.last:
                    finishing.append(finisher.submit(files[-1].finish_after, writing))
                while finishing and finishing[0].done():
                    yield finishing.popleft().result()
                previous, step, number = step.joinids.size, following, number + 1
            writing.result()
            _chunk_written(advance, previous)
            while finishing:
                yield finishing.popleft().result()
    finally:
        for file in files:
            file.abort()



def _chunk_plan(experiment, task: _PartTask, parts: list[dict[str, Any]]) -> Iterator[_Step]:
    for part in parts:
        joinids, nnz = _part_joinids(experiment, task, part)
        bounds = chunk_bounds(nnz, task.chunk_cells, task.chunk_counts)
        for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            yield _Step(part, joinids[start:stop], number, start == 0, stop == joinids.size)



def chunk_bounds(nnz: np.ndarray, chunk_cells: int, chunk_counts: int) -> list[int]:
    """Where chunks of consecutive cells start, and the end: each at most `chunk_cells` cells and
    `chunk_counts` counts, unless a single cell holds more counts (it is then a chunk alone)."""
    total = np.concatenate([[0], np.cumsum(nnz, dtype=np.int64)])
    bounds = [0]
    while bounds[-1] < nnz.size:
        start = bounds[-1]
        stop = int(np.searchsorted(total, total[start] + chunk_counts, side="right")) - 1
        bounds.append(min(max(stop, start + 1), start + chunk_cells, nnz.size))
    return bounds



def _part_joinids(experiment, task: _PartTask, part: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The part's soma_joinids (ascending) and each cell's number of stored counts where obs has
    the Census' `nnz` (zeros where it does not: chunks are then cut by cells only)."""
    source = task.source
    columns = ["soma_joinid", "nnz"] if "nnz" in task.obs_columns else ["soma_joinid"]

    def read():
        return experiment.obs.read(coords=(slice(part["joinid_min"], part["joinid_max"]),),
                                   value_filter=task.obs_filter, column_names=columns).concat()

    found = with_retries(read, f"{source.describe()}: cells of {part['name']}", task.retries)
    order = np.argsort(found["soma_joinid"].to_numpy(), kind="stable")
    joinids = found["soma_joinid"].to_numpy().astype(np.int64, copy=False)[order]
    if joinids.size != part["planned_rows"]:
        raise LangCellError(f"{source.describe()}: {joinids.size} cells pass the filter in soma_joinid "
                            f"[{part['joinid_min']}, {part['joinid_max']}], the plan has {part['planned_rows']}; "
                            "the store changed since the plan was made, ingest into a new --out")
    if "nnz" not in columns:
        return joinids, np.zeros(joinids.size, np.int64)
    # A missing nnz says nothing about the cell's size: the --chunk-cells cap still holds.
    return joinids, np.maximum(found["nnz"].fill_null(0).to_numpy().astype(np.int64)[order], 0)



class _PartFile:
    """One part's parquet file, written under a temporary name and renamed into place when complete."""

    def __init__(self, out: Path, part: dict[str, Any], schema: pa.Schema):
        self._name, self._final = part["name"], out / part["name"]
        self._files = contextlib.ExitStack()
        tmp = self._files.enter_context(atomic_path(self._final))
        self._writer = self._files.enter_context(pq.ParquetWriter(tmp, schema, **_part_encoding(schema)))
        self._rows = self._empty = 0
        self._done = False

    def write(self, table: pa.Table, cells: int) -> None:
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._rows += table.num_rows
        self._empty += cells - table.num_rows

    def finish_after(self, writing: concurrent.futures.Future) -> dict[str, Any]:
        """Once the last write is done: close, rename into place, and the part's manifest entry."""
        writing.result()
        self._files.close()
        # A closed writer still holds its encoding buffers (~190 MB a part here) until it is freed.
        self._writer = None
        self._done = True
        _crash_point("part_renamed")
        return {"name": self._name, "rows": self._rows, "empty_cells": self._empty,
                "sha256": sha256_file(self._final)}

    def abort(self) -> None:
        """Remove the temporary file of a part that was not finished."""
        if not self._done:
            self._done = True
            self._files.__exit__(LangCellError, LangCellError("ingest stopped"), None)



def _chunk_written(advance: Callable[[int], None], cells: int) -> None:
    _crash_point("chunk_written")
    advance(int(cells))



def _part_encoding(schema: pa.Schema) -> dict[str, Any]:
    """Parquet writer options of a part; the count columns are most of its bytes and of its CPU.

    Measured on 20,000 cells x 2,500 counts against zstd with plain encoding: gene indices, ascending
    within a cell, as deltas and counts byte-stream-split before zstd level 1 encode in 0.64x the
    CPU, decode in 0.57x and take 0.45x the bytes. Dictionary encoding is kept for the label columns
    only (on the lists it costs a third of the encoding time and saves nothing after zstd), and
    min/max statistics for the scalar columns only (on the lists a third of what is left).
    """
    lists = [field.name for field in schema if pa.types.is_list(field.type)]
    return {"compression": "zstd", "compression_level": 1,
            "use_dictionary": [field.name for field in schema if pa.types.is_string(field.type)],
            "write_statistics": [field.name for field in schema if field.name not in lists],
            "column_encoding": {"gene_index.list.element": "DELTA_BINARY_PACKED",
                                "counts.list.element": "BYTE_STREAM_SPLIT"}}



def _cells_schema(obs_schema: pa.Schema, obs_columns: list[str]) -> pa.Schema:
    fields = [pa.field("soma_joinid", pa.int64())]
    for name in obs_columns:
        fields.append(pa.field(name, _plain_type(obs_schema.field(name).type)))
    fields += [pa.field("n_counts", pa.float64()), pa.field("gene_index", pa.list_(pa.int32())),
               pa.field("counts", pa.list_(pa.float32()))]
    return pa.schema(fields)



_CRASH_COUNTS: dict[str, int] = {}



def _crash_point(event: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec or not spec.startswith(event + ":"):
        return
    _CRASH_COUNTS[event] = _CRASH_COUNTS.get(event, 0) + 1
    if _CRASH_COUNTS[event] == int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)
