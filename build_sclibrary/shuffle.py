"""Shard order: each split's cells in a seeded random order over the whole split, in flat memory.

The Census stores cells dataset by dataset. Shards written in ingest order would each hold one or
two datasets, and a trainer's shuffle buffer over a few shards cannot mix them: a batch would come
from one tissue and bias every contrastive gradient. So shards are written in two steps:

1. Scatter, while a part is tokenized: each cell's tar members go to one of K buckets of its
   split, drawn uniformly by a generator seeded with (seed, part), so any worker or machine draws
   the same. The part appends them, length-prefixed, to its spill file of the split
   (`work/spill/{split}/part-NNNNN.bin`), one run per tokenizer chunk with the run's cells grouped
   by bucket; `part-NNNNN.npy` holds where each bucket's slice of each run starts, in bytes and in
   cells. K = ceil(planned cells of the split / bucket_cells): a bucket holds ~bucket_cells cells
   whatever the size of the library.
2. Cut, once every part is done: bucket k is read back from every part (one read per run), put in
   an order drawn by a generator seeded with (seed, split, k) and cut into ceil(n_k / shard_size)
   shards of near-equal size, numbered after the shards of buckets 0..k-1.

Every bucket is a uniform random sample of its split and every shard a uniform random sample of
its bucket, so each shard holds the split's datasets in proportion. Memory: one chunk while
scattering, one bucket while cutting; neither grows with the number of cells.

Spill files never lie under shards/. A bucket's shards count only once its record
`work/shuffle/{split}/bucket-KKKKK.json` lists them with checksums: the record is written after the
shards and names the spill files it was cut from, so a killed cut resumes bucket by bucket.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from langcell.core.files import atomic_path, atomic_write_json, read_record, sha256_file

from langcell.build_sclibrary import shard_tar

# Generator streams of the two draws; the seed's stream 0 is the split assignment's.
SCATTER_STREAM = 1
CUT_STREAM = 2
_LENGTH = struct.Struct("<Q")


def bucket_counts(planned: dict[str, int], bucket_cells: int) -> dict[str, int]:
    """K per split, from the cells planned before tokenization (cells without a vocabulary gene
    are dropped later, so buckets end up at most slightly smaller)."""
    return {split: max(1, math.ceil(n / bucket_cells)) for split, n in planned.items()}


def scatter_buckets(seed: int, part_index: int, split_codes: np.ndarray, n_buckets: list[int]) -> np.ndarray:
    """The bucket of every row of part `part_index`, uniform over the K buckets of the row's split."""
    rng = np.random.default_rng([seed, SCATTER_STREAM, part_index])
    return rng.integers(0, np.asarray(n_buckets, dtype=np.int64)[split_codes], dtype=np.int64)


class SpillWriter:
    """One part's cells of one split: runs of length-prefixed cells, each run grouped by bucket."""

    def __init__(self, out: Path, split: str, part_index: int, n_buckets: int):
        self.out, self.n_buckets = out, n_buckets
        self.name = f"work/spill/{split}/part-{part_index:05d}.bin"
        self.index_name = f"work/spill/{split}/part-{part_index:05d}.npy"
        self._ctx = atomic_path(out / self.name)
        self._file = open(self._ctx.__enter__(), "wb")
        self._digest = hashlib.sha256()
        self._run: list[tuple[int, bytes]] = []
        self._byte_starts: list[np.ndarray] = []
        self._cell_starts: list[np.ndarray] = []
        self._offset = 0
        self.n_cells = 0

    def add(self, bucket: int, members: bytes) -> None:
        self._run.append((bucket, members))

    def end_run(self) -> None:
        """Write the cells added since the last run, grouped by bucket, in order of arrival within one."""
        if not self._run:
            return
        buckets = np.fromiter((b for b, _ in self._run), np.int64, len(self._run))
        order = np.argsort(buckets, kind="stable")
        cells = [self._run[i][1] for i in order]
        ends = np.zeros(len(cells) + 1, dtype=np.int64)
        np.cumsum([_LENGTH.size + len(c) for c in cells], out=ends[1:])
        first = np.searchsorted(buckets[order], np.arange(self.n_buckets + 1))
        self._byte_starts.append(self._offset + ends[first])
        self._cell_starts.append(self.n_cells + first)
        data = b"".join(piece for c in cells for piece in (_LENGTH.pack(len(c)), c))
        self._file.write(data)
        self._digest.update(data)
        self._offset += len(data)
        self.n_cells += len(cells)
        self._run = []

    def close(self) -> dict:
        self.end_run()
        self._file.close()
        self._ctx.__exit__(None, None, None)
        # (2, K + 1, runs): [0] byte offsets, [1] cells before, where bucket k of run r starts; row K ends the run.
        index = np.zeros((2, self.n_buckets + 1, len(self._byte_starts)), dtype=np.int64)
        if self._byte_starts:
            index[0] = np.stack(self._byte_starts, axis=1)
            index[1] = np.stack(self._cell_starts, axis=1)
        with atomic_path(self.out / self.index_name) as tmp, open(tmp, "wb") as handle:
            np.save(handle, index)
        return {"name": self.name, "sha256": self._digest.hexdigest(), "n_cells": self.n_cells,
                "index": self.index_name, "index_sha256": sha256_file(self.out / self.index_name)}

    def abort(self) -> None:
        self._file.close()
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


# --- cut ---------------------------------------------------------------------------------------
@dataclass
class BucketJob:
    out: str
    split: str
    split_code: int
    bucket: int
    spills: list  # the split's spill entries of every part, in part order
    first_number: int
    n_cells: int
    seed: int
    shard_size: int
    source: str


def spill_source(spills: list[dict]) -> str:
    """What a split's buckets are cut from: the checksums of its spill files, in part order."""
    return hashlib.sha256(json.dumps([[s["sha256"], s["index_sha256"]] for s in spills]).encode()).hexdigest()


def bucket_sizes(out: Path, spills: list[dict], n_buckets: int) -> np.ndarray:
    sizes = np.zeros(n_buckets, dtype=np.int64)
    for spill in spills:
        if spill["n_cells"]:
            starts = np.load(out / spill["index"], mmap_mode="r")[1]
            sizes += (starts[1:] - starts[:-1]).sum(axis=1)
    return sizes


def bucket_record_path(out: Path, split: str, bucket: int) -> Path:
    return out / "work" / "shuffle" / split / f"bucket-{bucket:05d}.json"


def trusted_bucket(out: Path, split: str, bucket: int, source: str, first_number: int,
                   verify: bool = True) -> list[dict] | None:
    """The shards of a bucket that an earlier cut finished from these spill files, else None."""
    record = read_record(bucket_record_path(out, split, bucket))
    if record is None:
        return None
    if record.get("status") != "done" or record.get("source") != source or record.get("first_number") != first_number:
        return None
    for shard in record["shards"]:
        file = out / shard["name"]
        if not file.is_file() or (verify and sha256_file(file) != shard["sha256"]):
            return None
    return record["shards"]


def plan_cut(out: Path, split: str, split_code: int, spills: list[dict], n_buckets: int, seed: int,
             shard_size: int) -> tuple[dict[int, list], list[BucketJob]]:
    """Per bucket of a split: its trusted shards, or a job to cut it."""
    source = spill_source(spills)
    sizes = bucket_sizes(out, spills, n_buckets)
    first = np.zeros(n_buckets + 1, dtype=np.int64)
    np.cumsum(-(-sizes // shard_size), out=first[1:])
    done, jobs = {}, []
    for k in range(n_buckets):
        shards = trusted_bucket(out, split, k, source, int(first[k]))
        if shards is not None:
            done[k] = shards
        else:
            jobs.append(BucketJob(str(out), split, split_code, k, spills, int(first[k]), int(sizes[k]), seed,
                                  shard_size, source))
    return done, jobs


def cut_bucket(job: BucketJob) -> int:
    out = Path(job.out)
    cells = _read_bucket(out, job.spills, job.bucket)
    order = np.random.default_rng([job.seed, CUT_STREAM, job.split_code, job.bucket]).permutation(len(cells))
    n_shards = math.ceil(len(cells) / job.shard_size)
    # Near-equal shards: with a full-size cut the bucket's last shard could hold a handful of cells.
    bounds = [i * len(cells) // max(n_shards, 1) for i in range(n_shards + 1)]  # an empty bucket: no shard
    shards = []
    for i in range(n_shards):
        name = f"shards/{job.split}/sclibrary-{job.first_number + i:06d}.tar"
        picked = [cells[j] for j in order[bounds[i]:bounds[i + 1]]]
        shards.append({"name": name, "n_cells": len(picked), "sha256": _write_shard(out / name, picked)})
    atomic_write_json(bucket_record_path(out, job.split, job.bucket),
                      {"status": "done", "source": job.source, "first_number": job.first_number, "shards": shards})
    return len(cells)


def _read_bucket(out: Path, spills: list[dict], bucket: int) -> list[memoryview]:
    cells: list[memoryview] = []
    for spill in spills:
        if not spill["n_cells"]:
            continue
        index = np.load(out / spill["index"], mmap_mode="r")
        starts, ends = index[0, bucket].tolist(), index[0, bucket + 1].tolist()
        with open(out / spill["name"], "rb") as handle:
            for start, end in zip(starts, ends):
                if end > start:
                    handle.seek(start)
                    cells += _split_cells(handle.read(end - start))
    return cells


def _split_cells(data: bytes) -> list[memoryview]:
    view, cells, pos = memoryview(data), [], 0
    while pos < len(view):
        (size,) = _LENGTH.unpack_from(view, pos)
        pos += _LENGTH.size
        cells.append(view[pos:pos + size])
        pos += size
    return cells


def _write_shard(path: Path, cells: list) -> str:
    """Write the cells' members as one archive, piece by piece (no second copy of the shard)."""
    digest = hashlib.sha256()
    size = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        for piece in cells:
            handle.write(piece)
            digest.update(piece)
            size += len(piece)
        end = shard_tar.archive_end(size)
        handle.write(end)
        digest.update(end)
    return digest.hexdigest()
