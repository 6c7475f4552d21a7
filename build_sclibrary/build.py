"""`langcell build`: an ingest folder -> scLibrary (docs/DEVELOPING.md, contract build -> pretrain/eval).

Work is cut by ingest part. For each part a worker verifies the part's sha256, tokenizes it in
chunks, scatters its cells' tar members to the shuffle buckets of their split (one spill file per
split, build_sclibrary/shuffle.py), writes them to one Arrow stream file per split, and finally
writes `work/parts/part-NNNNN.json` with the sha256 of everything it wrote. A rerun trusts a part
only through that record, its files and their checksums, so a killed run resumes where it stopped
and repeats nothing that is complete. Once every part is done, each bucket is cut into shuffled
webdataset shards (resumable bucket by bucket), the Arrow files become `hf/{split}`
(`datasets.save_to_disk`, rows in ingest order), and `type2text.json`, `text_variants.json`,
`stats.md`/`stats.png` and `manifest.json` (complete) are written.

`--shard i/N` builds the parts with index % N == i (one machine each, same output folder on a
shared file system); the run that finds every part done cuts the shards and finalizes.

Several ingest folders build one library: their parts are numbered globally in the order given
(ingest 0's parts first), each part is tokenized with its own ingest's genes, and cells are
keyed by `ingest * KEY_STRIDE + soma_joinid` because every store numbers its cells from 0.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from langcell.ingest.ontology import split_term_ids
from langcell.core.errors import LangCellError
from langcell.core.files import atomic_path, atomic_write_json, output_lock, read_json, read_record, sha256_file

from langcell.build_sclibrary import ingest_io, shard_tar, shuffle, stats as stats_mod, vocab as vocab_mod
from langcell.build_sclibrary.config import SPLITS, BuildConfig, load_text_config, parse_shard
from langcell.build_sclibrary.splits import assign_splits
from langcell.build_sclibrary.texts import TextBuilder, load_terms
from langcell.build_sclibrary.tokenizer import RankValueTokenizer

LIB_FORMAT = "langcell-sclibrary/1"
# Cell key with several ingests: ingest i's cell j is i * KEY_STRIDE + j. The key stays an integer
# (pretrain reads int(__key__)) and ingest 0 keeps its plain soma_joinids; Census joinids are ~1e8.
KEY_STRIDE = 10**12
TEXT_BIN = 16  # characters per bin of the text-length histogram
TEXT_BINS = 256


def hf_schema(multi: bool = False) -> pa.Schema:
    fields = [pa.field("input_ids", pa.list_(pa.int32())), pa.field("length", pa.int64()),
              pa.field("soma_joinid", pa.int64())]
    fields += [pa.field(name, pa.string()) for name in ingest_io.META_COLUMNS]
    if multi:
        fields.append(pa.field("ingest", pa.int64()))
    return pa.schema(fields)


def cell_key(ingest_index: int | None, soma_joinid: int | np.ndarray) -> int | np.ndarray:
    """The library-wide cell id (`__key__`); `ingest_index` None for a one-ingest library."""
    return soma_joinid if not ingest_index else ingest_index * KEY_STRIDE + soma_joinid


@dataclass
class _PartJob:
    ingest_root: str
    out: str
    index: int
    part: dict
    gene_ids: list
    split_codes: np.ndarray
    n_buckets: list  # shuffle buckets per split, in SPLITS order
    config: dict
    vocab_sha: dict
    text_config: dict = field(default_factory=dict)
    # Position of the part's ingest when the library has several, else None (keys stay soma_joinids).
    ingest_index: int | None = None
    term_roots: list = field(default_factory=list)


class _Parts:
    """Every part of every ingest, in global order (the index of work/parts/part-NNNNN.json)."""

    def __init__(self, ingests: list[ingest_io.Ingest]):
        self.ingests = ingests
        self.owner = [k for k, ingest in enumerate(ingests) for _ in ingest.parts]
        self._parts = [part for ingest in ingests for part in ingest.parts]

    @property
    def multi(self) -> bool:
        return len(self.ingests) > 1

    def __len__(self) -> int:
        return len(self.owner)

    def part(self, g: int) -> dict:
        return self._parts[g]

    def ingest(self, g: int) -> ingest_io.Ingest:
        return self.ingests[self.owner[g]]

    def ingest_index(self, g: int) -> int | None:
        return self.owner[g] if self.multi else None


def build_library(ingest_dir: str | os.PathLike | list, out_dir: str | os.PathLike,
                  config: BuildConfig | None = None, progress: bool = True) -> dict:
    """Build scLibrary from one ingest folder, or a list of them, into `out_dir`; returns the
    manifest (complete or, for a `--shard` run whose siblings are not finished, the incomplete one)."""
    config = config or BuildConfig()
    roots = [Path(p) for p in ingest_dir] if isinstance(ingest_dir, (list, tuple)) else [Path(ingest_dir)]
    if not roots:
        raise LangCellError("--ingest: no ingest folder given; pass at least one `langcell ingest` output folder")
    resolved = [r.resolve() for r in roots]
    for k, root in enumerate(resolved):
        if root in resolved[:k]:
            raise LangCellError(f"{roots[k]}: ingest folder given twice; every cell would appear twice, "
                                "pass each folder once")
    out = Path(out_dir)
    shard_index, shard_count = parse_shard(config.shard)
    lock_dir = out if shard_count == 1 else out / "work" / "locks" / f"shard-{shard_index}-of-{shard_count}"
    with output_lock(lock_dir):
        return _build(roots, out, config, shard_index, shard_count, progress)


def _ingest_fields(roots: list[Path]) -> dict:
    """How the manifest names its input: `ingest` for one folder (as before), `ingests` for several."""
    if len(roots) == 1:
        return {"ingest": str(roots[0].resolve()), "ingest_manifest_sha256": _ingest_sha(roots[0])}
    return {"ingests": [{"path": str(r.resolve()), "manifest_sha256": _ingest_sha(r)} for r in roots]}


def _ingest_identity(manifest: dict) -> list:
    # Checksums in order, not paths: a moved ingest folder is the same input, a reordered list is
    # not (keys carry the ingest's position).
    if "ingests" in manifest:
        return [entry.get("manifest_sha256") for entry in manifest["ingests"]]
    return [manifest.get("ingest_manifest_sha256")]


def _build(roots: list[Path], out: Path, config: BuildConfig, shard_index: int, shard_count: int,
           progress: bool) -> dict:
    ingests = [ingest_io.open_ingest(root) for root in roots]
    parts = _Parts(ingests)
    text_config = load_text_config(config.texts)
    output_config = dict(config.output_config(), texts=text_config.__dict__)
    manifest_path = out / "manifest.json"
    inputs = _ingest_fields(roots)
    if manifest_path.exists():
        old = read_json(manifest_path, "scLibrary manifest")
        if old.get("config") != output_config or _ingest_identity(old) != _ingest_identity(inputs):
            raise LangCellError(f"{manifest_path}: this folder was built with another configuration or ingest; "
                                "use a new --out folder or repeat the original options")
        if old.get("complete"):
            return old
    manifest = {"format": LIB_FORMAT, "complete": False, "config": output_config, **inputs}
    if shard_count == 1 or not manifest_path.exists():
        # A --shard run never rewrites an existing manifest: a sibling may have just completed it.
        atomic_write_json(manifest_path, manifest)
    if shard_count == 1:
        # With --shard, sibling runs may be writing temporaries right now; the finalizing run cleans.
        _remove_temporaries(out)
    for root in roots:
        load_terms(root)  # fail early, before any work, when the ontology step was not run

    mine = [i for i in range(len(parts)) if i % shard_count == shard_index]
    # Splits first: reading every part's obs also checks the joinids before the median pass.
    codes = _plan_splits(parts, config)
    vocab_sha = _prepare_vocab(parts, out, config, mine, progress)
    planned = sum(np.bincount(c, minlength=len(SPLITS)) for c in codes)
    n_buckets = shuffle.bucket_counts({split: int(planned[k]) for k, split in enumerate(SPLITS)}, config.bucket_cells)
    term_roots = [str(root) for root in roots]
    pending = []
    for i in mine:
        if _trusted_record(out, i, vocab_sha) is None:
            ingest = parts.ingest(i)
            pending.append(_PartJob(str(ingest.root), str(out), i, parts.part(i), ingest.gene_ids, codes[i],
                                    [n_buckets[s] for s in SPLITS], output_config, vocab_sha, text_config.__dict__,
                                    parts.ingest_index(i), term_roots))
    _run_jobs(pending, [int(job.part.get("rows") or 0) for job in pending], config.workers, progress, "tokenize",
              _process_part)

    # This run checked (or wrote) its own parts; other shards' parts are checked here.
    all_records = [_trusted_record(out, i, vocab_sha, verify=i % shard_count != shard_index)
                   for i in range(len(parts))]
    if any(r is None for r in all_records):
        missing = sum(r is None for r in all_records)
        print(f"langcell build: shard {shard_index}/{shard_count} done; {missing} parts of other shards are "
              "still missing, the run that finishes last writes the library")
        return manifest
    if shard_count == 1:
        shards = _cut_shards(out, all_records, config, n_buckets, progress)
        return _finalize(roots, out, manifest, all_records, shards, vocab_sha, text_config)
    try:
        lock = output_lock(out)
        lock.__enter__()
    except LangCellError:
        print("langcell build: every part is done; another run is writing the library")
        return manifest
    try:
        current = read_json(manifest_path, "scLibrary manifest")
        if current.get("complete"):
            return current
        _remove_temporaries(out)
        shards = _cut_shards(out, all_records, config, n_buckets, progress)
        return _finalize(roots, out, manifest, all_records, shards, vocab_sha, text_config)
    finally:
        lock.__exit__(None, None, None)


def _ingest_sha(ingest_root: Path) -> str:
    return sha256_file(ingest_root / "manifest.json")


def _remove_temporaries(out: Path) -> None:
    """Leftovers of a killed run: atomic_path temporaries and half-written hf folders."""
    for folder in (out / "shards", out / "work", out / "hf", out / "vocab"):
        if not folder.exists():
            continue
        for path in folder.rglob(".*.tmp"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


# --- vocabulary --------------------------------------------------------------------------------
def _sketch_slots(ingests: list[ingest_io.Ingest]) -> tuple[list[str], list[np.ndarray]]:
    """The genes the median sketch counts (slot -> gene id) and, per ingest, column -> slot (-1: none).

    One ingest: one slot per selected column, as the single-ingest build always did. Several: one
    slot per distinct selected gene id, so every ingest's cells of a gene add to one median."""
    selected = [vocab_mod.select_corpus_genes(i.gene_ids, i.biotypes) for i in ingests]
    if len(ingests) == 1:
        slot_ids = [ingests[0].gene_ids[int(c)] for c in selected[0]]
    else:
        slot_ids = sorted({ingest.gene_ids[int(c)] for ingest, cols in zip(ingests, selected) for c in cols})
    slot_of = {gene: s for s, gene in enumerate(slot_ids)}
    maps = []
    for ingest, cols in zip(ingests, selected):
        gene_map = np.full(len(ingest.gene_ids), -1, dtype=np.int64)
        if len(ingests) == 1:
            gene_map[cols] = np.arange(cols.size)
        else:
            gene_map[cols] = [slot_of[ingest.gene_ids[int(c)]] for c in cols]
        maps.append(gene_map)
    return slot_ids, maps


def _prepare_vocab(parts: _Parts, out: Path, config: BuildConfig, mine: list[int], progress: bool) -> dict:
    vocab_dir = out / "vocab"
    if config.vocab == "geneformer-v1":
        tokens, medians = vocab_mod.geneformer_v1_vocab()
        vocab_mod.copy_reference_extras(vocab_dir)
    else:
        slot_ids, maps = _sketch_slots(parts.ingests)
        sketch_dir = out / "work" / "sketch"
        jobs = [(str(parts.ingest(i).root), parts.part(i), i, maps[parts.owner[i]], len(slot_ids), config.chunk_rows,
                 config.bins_per_decade, str(sketch_dir)) for i in mine
                if not (sketch_dir / f"part-{i:05d}.npz").is_file()]
        _run_jobs(jobs, [int(job[1].get("rows") or 0) for job in jobs], config.workers, progress, "gene medians",
                  _sketch_part)
        paths = [sketch_dir / f"part-{i:05d}.npz" for i in range(len(parts))]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise LangCellError(f"{missing[0]}: gene-median sketches of {len(missing)} parts (other --shard runs) are "
                                "missing; rerun this command once every shard has passed the median step")
        merged = vocab_mod.MedianSketch.load(paths[0])
        for path in paths[1:]:
            merged.merge(vocab_mod.MedianSketch.load(path))
        tokens, medians = vocab_mod.corpus_vocab(slot_ids, np.arange(len(slot_ids)), merged)
    # The tokenizer checks that the two files agree before anything is written with them.
    RankValueTokenizer(tokens, medians, max_length=config.max_length, source=str(vocab_dir))
    for ingest in parts.ingests:
        if not any(g in tokens for g in ingest.gene_ids):
            raise LangCellError(f"{ingest.root / 'genes.parquet'}: no gene of the ingest is in the {config.vocab} "
                                "vocabulary; use --vocab corpus for this organism or gene id scheme")
    return vocab_mod.write_vocab(vocab_dir, tokens, medians)


def _sketch_part(job) -> int:
    root, part, index, gene_map, n_slots, chunk_rows, bins_per_decade, sketch_dir = job
    ingest = ingest_io.Ingest(Path(root), {"parts": [part]}, [], [])
    path = ingest_io.verify_part(ingest, part)
    sketch = vocab_mod.MedianSketch(n_slots, bins_per_decade)
    rows = 0
    for _, X, n_counts in ingest_io.iter_chunks(path, gene_map.size, chunk_rows):
        vocab_mod.sketch_chunk(sketch, X, n_counts, gene_map)
        rows += X.shape[0]
    sketch.save(Path(sketch_dir) / f"part-{index:05d}.npz")
    return rows


# --- splits ------------------------------------------------------------------------------------
def _plan_splits(parts: _Parts, config: BuildConfig) -> list[np.ndarray]:
    import pandas as pd

    columns = ["soma_joinid", "dataset_id", "donor_id", "cell_type", "cell_type_ontology_term_id"]
    frames, sizes = [], []
    for g in range(len(parts)):
        path = parts.ingest(g).part_path(parts.part(g))
        try:
            table = ingest_io.read_obs(path, columns)
        except (pa.ArrowException, OSError) as exc:
            raise LangCellError(f"{path}: cannot read the part ({str(exc).splitlines()[0]}); "
                                "rerun `langcell ingest` to rewrite it") from None
        frame = table.to_pandas()
        if parts.multi:
            joinids = frame["soma_joinid"].to_numpy()
            if joinids.size and (joinids.min() < 0 or joinids.max() >= KEY_STRIDE):
                raise LangCellError(f"{path}: soma_joinid outside 0..{KEY_STRIDE - 1}, which cell keys of a "
                                    "several-ingest library need; build this ingest on its own")
            # Cell-level splits draw keys in joinid order; the cell key keeps that order unique.
            frame["soma_joinid"] = cell_key(parts.owner[g], joinids)
        frames.append(frame)
        sizes.append(table.num_rows)
    obs = pd.concat(frames, ignore_index=True)
    codes = assign_splits(obs, config.split_by, config.fractions, config.seed, config.holdout_cell_types)
    return np.split(codes, np.cumsum(sizes)[:-1])


# --- per-part work -----------------------------------------------------------------------------
def _record_path(out: Path, index: int) -> Path:
    return out / "work" / "parts" / f"part-{index:05d}.json"


def _trusted_record(out: Path, index: int, vocab_sha: dict, verify: bool = True) -> dict | None:
    record = read_record(_record_path(out, index))
    if record is None:
        return None
    if record.get("status") != "done" or record.get("vocab_sha256") != vocab_sha:
        return None
    for split in SPLITS:
        spill, hf = record["spill"][split], record["hf"][split]
        for name, digest in ((spill["name"], spill["sha256"]), (spill["index"], spill["index_sha256"]),
                             (hf["name"], hf["sha256"])):
            file = out / name
            if not file.is_file() or (verify and sha256_file(file) != digest):
                return None
    return record


_CACHE: dict = {}


def _union_terms(roots: list) -> dict:
    """Terms of every ingest (ids are global); where two ingests define one id, the earlier wins."""
    terms: dict = {}
    for root in roots:
        for term_id, info in load_terms(root).items():
            terms.setdefault(term_id, info)
    return terms


def _resources(job: _PartJob):
    """Tokenizer and text builder, loaded once per worker process."""
    key = (job.out, json.dumps(job.vocab_sha, sort_keys=True), tuple(job.term_roots))
    if _CACHE.get("key") != key:
        from langcell.build_sclibrary.config import TextConfig

        tokenizer = RankValueTokenizer.from_vocab_dir(Path(job.out) / "vocab", max_length=job.config["max_length"])
        texts = TextBuilder(_union_terms(job.term_roots), TextConfig(**job.text_config))
        _CACHE.update(key=key, tokenizer=tokenizer, texts=texts)
    return _CACHE["tokenizer"], _CACHE["texts"]


class _SplitWriter:
    """Cells of one part and one split: tar members scattered to the split's shuffle buckets, and
    one Arrow stream file."""

    def __init__(self, out: Path, split: str, part_index: int, n_buckets: int, multi: bool = False):
        self.out = out
        self.spill = shuffle.SpillWriter(out, split, part_index, n_buckets)
        self.arrow_name = f"work/hf/{split}/part-{part_index:05d}.arrow"
        self._arrow_ctx = atomic_path(out / self.arrow_name)
        self._arrow_tmp = self._arrow_ctx.__enter__()
        self._sink = pa.OSFile(str(self._arrow_tmp), "wb")
        self._writer = pa.ipc.new_stream(self._sink, hf_schema(multi))

    def add(self, bucket: int, key: str, tokens: np.ndarray, meta: dict, texts: dict) -> None:
        members = (("input_ids.npy", shard_tar.npy_bytes(tokens)), ("meta.json", _json_bytes(meta)),
                   ("texts.json", _json_bytes(texts)))
        self.spill.add(bucket, b"".join(shard_tar.member_bytes(f"{key}.{suffix}", data) for suffix, data in members))

    def end_chunk(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.spill.end_run()

    def close(self) -> tuple[dict, dict]:
        spill = self.spill.close()
        self._writer.close()
        self._sink.close()
        self._arrow_ctx.__exit__(None, None, None)
        hf = {"name": self.arrow_name, "n_cells": spill["n_cells"], "sha256": sha256_file(self.out / self.arrow_name)}
        return spill, hf

    def abort(self) -> None:
        self.spill.abort()
        self._writer.close()
        self._sink.close()
        self._arrow_ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()


def _process_part(job: _PartJob) -> int:
    tokenizer, texts = _resources(job)
    out = Path(job.out)
    ingest = ingest_io.Ingest(Path(job.ingest_root), {"parts": [job.part]}, job.gene_ids, [])
    path = ingest_io.verify_part(ingest, job.part)
    multi = job.ingest_index is not None
    buckets = shuffle.scatter_buckets(job.config["seed"], job.index, job.split_codes, job.n_buckets)
    writers = {split: _SplitWriter(out, split, job.index, job.n_buckets[code], multi)
               for code, split in enumerate(SPLITS)}
    max_length = job.config["max_length"]
    lengths = np.zeros(max_length + 1, dtype=np.int64)
    text_lengths = np.zeros(TEXT_BINS, dtype=np.int64)
    counters = {name: Counter() for name in ("cell_type", "tissue", "disease")}
    terms = {aspect: set() for aspect in ingest_io.ASPECTS}
    type2text: dict[str, str] = {}
    skipped = 0
    row = 0
    try:
        for obs, X, n_counts in ingest_io.iter_chunks(path, len(job.gene_ids), job.config["chunk_rows"]):
            flat, offsets = tokenizer.tokenize_csr_flat(X, job.gene_ids, n_counts)
            n_tokens = np.diff(offsets)
            columns = {name: obs[name].to_pylist() for name in obs.column_names}
            codes = job.split_codes[row:row + obs.num_rows]
            chunk_buckets = buckets[row:row + obs.num_rows]
            row += obs.num_rows
            keep_rows = {split: [] for split in SPLITS}
            for i in range(obs.num_rows):
                if n_tokens[i] <= 1:
                    skipped += 1
                    continue
                meta = {name: _plain(columns[name][i]) for name in columns}
                cell_texts = texts.texts_for(meta)
                if multi:
                    meta["ingest"] = job.ingest_index
                split = SPLITS[codes[i]]
                key = str(cell_key(job.ingest_index, meta["soma_joinid"]))
                writers[split].add(int(chunk_buckets[i]), key, flat[offsets[i]:offsets[i + 1]], meta, cell_texts)
                keep_rows[split].append(i)
                lengths[n_tokens[i]] += 1
                text_lengths[min(TEXT_BINS - 1, len(" ".join(cell_texts.values())) // TEXT_BIN)] += 1
                for name, counter in counters.items():
                    counter[f"{split}\t{meta[name]}"] += 1
                for aspect in ingest_io.ASPECTS:
                    terms[aspect].update(split_term_ids(meta[f"{aspect}_ontology_term_id"]))
                if "cell_type" in cell_texts:
                    type2text.setdefault(str(meta["cell_type"]), cell_texts["cell_type"])
            for split in SPLITS:
                rows = np.asarray(keep_rows[split], dtype=np.int64)
                writers[split].end_chunk(_arrow_batch(obs, rows, flat, offsets, job.ingest_index))
        closed = {split: writers[split].close() for split in SPLITS}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if row != job.part.get("rows", row):
        raise LangCellError(f"{path}: {row} rows but the ingest manifest says {job.part['rows']}; "
                            "rerun `langcell ingest`")
    record = {"status": "done", "index": job.index, "name": job.part["name"], "vocab_sha256": job.vocab_sha,
              "n_cells_in": row, "n_skipped_no_vocab_gene": skipped,
              "spill": {split: closed[split][0] for split in SPLITS},
              "hf": {split: closed[split][1] for split in SPLITS},
              "lengths": _sparse_hist(lengths), "text_lengths": _sparse_hist(text_lengths),
              "counts": {name: dict(counter) for name, counter in counters.items()},
              "terms": {aspect: sorted(ids) for aspect, ids in terms.items()}, "type2text": type2text}
    if multi:
        record["ingest"] = job.ingest_index
    atomic_write_json(_record_path(out, job.index), record)
    return row


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _sparse_hist(hist: np.ndarray) -> dict:
    nonzero = np.flatnonzero(hist)
    return {str(int(i)): int(hist[i]) for i in nonzero}


def _arrow_batch(obs: pa.Table, rows: np.ndarray, flat: np.ndarray, offsets: np.ndarray,
                 ingest_index: int | None = None) -> pa.RecordBatch:
    starts, ends = offsets[rows], offsets[rows + 1]
    lengths = ends - starts
    new_offsets = np.zeros(rows.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=new_offsets[1:])
    take = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(int(new_offsets[-1]))
    ids = pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(flat[take], pa.int32()))
    picked = obs.take(pa.array(rows))
    arrays = [ids, pa.array(lengths.astype(np.int64)), picked["soma_joinid"].cast(pa.int64())]
    arrays += [picked[name].cast(pa.string()).combine_chunks() if picked.num_rows else pa.array([], pa.string())
               for name in ingest_io.META_COLUMNS]
    if ingest_index is not None:
        arrays.append(pa.array(np.full(rows.size, ingest_index, dtype=np.int64)))
    return pa.RecordBatch.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays],
                                      schema=hf_schema(ingest_index is not None))


# --- running jobs ------------------------------------------------------------------------------
def _run_jobs(jobs: list, cells: list[int], workers: int, progress: bool, what: str, function) -> None:
    """Run `function` (returns the cells it did) on every job; `cells` per job sizes the progress bar."""
    from tqdm import tqdm

    if not jobs:
        return
    with tqdm(total=sum(cells), unit="cells", unit_scale=True, desc=what, disable=not progress) as bar:
        if workers <= 1 or len(jobs) == 1:
            for job in jobs:
                bar.update(function(job))
            return
        import multiprocessing
        from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

        # spawn: a fresh interpreter per worker, no inherited locks or threads from the parent.
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(function, job) for job in jobs}
            while futures:
                done, futures = wait(futures, return_when=FIRST_EXCEPTION)
                for future in done:
                    bar.update(future.result())


# --- finalization ------------------------------------------------------------------------------
def _cut_shards(out: Path, records: list[dict], config: BuildConfig, n_buckets: dict, progress: bool) -> dict:
    """Every split's shards, in bucket order: buckets an earlier run cut are kept, the others cut now."""
    done, jobs = {}, []
    for code, split in enumerate(SPLITS):
        spills = [record["spill"][split] for record in records]
        done[split], pending = shuffle.plan_cut(out, split, code, spills, n_buckets[split], config.seed,
                                                config.shard_size)
        jobs += pending
    _run_jobs(jobs, [job.n_cells for job in jobs], config.workers, progress, "shuffle", shuffle.cut_bucket)
    for job in jobs:  # written just now by this run: no second pass over their bytes
        done[job.split][job.bucket] = shuffle.trusted_bucket(out, job.split, job.bucket, job.source, job.first_number,
                                                             verify=False)
    return {split: [shard for k in sorted(done[split]) for shard in done[split][k]] for split in SPLITS}


def _finalize(roots: list[Path], out: Path, manifest: dict, records: list[dict], shards: dict, vocab_sha: dict,
              text_config) -> dict:
    import datasets

    started = time.time()
    splits = {}
    for split in SPLITS:
        splits[split] = {"n_cells": sum(s["n_cells"] for s in shards[split]), "shards": shards[split]}
        parts = [datasets.Dataset.from_file(str(out / r["hf"][split]["name"])) for r in records]
        dataset = datasets.concatenate_datasets(parts)
        target = out / "hf" / split
        tmp = out / "hf" / f".{split}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        # An empty split (2 datasets split by dataset leave test empty) is saved as one empty
        # shard: with the default sharding datasets writes no data file and cannot load it back.
        dataset.save_to_disk(str(tmp), num_shards=1 if len(dataset) == 0 else None)
        del dataset, parts
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        splits[split]["hf"] = f"hf/{split}"
    listed = {s["name"] for split in SPLITS for s in splits[split]["shards"]}
    for split in SPLITS:
        for stale in (out / "shards" / split).glob("*.tar"):
            if f"shards/{split}/{stale.name}" not in listed:
                stale.unlink()

    type2text: dict[str, str] = {}
    for record in records:
        for label, text in record["type2text"].items():
            type2text.setdefault(label, text)
    atomic_write_json(out / "type2text.json", dict(sorted(type2text.items())))
    texts = TextBuilder(_union_terms(roots), text_config)
    variants = {}
    for aspect in ingest_io.ASPECTS:
        ids = sorted({tid for r in records for tid in r["terms"][aspect]})
        variants[aspect] = {tid: v for tid in ids if (v := texts.variants(aspect, tid)) is not None}
    atomic_write_json(out / "text_variants.json", variants)

    summary = stats_mod.write_stats(out, records, splits, SPLITS, TEXT_BIN)
    manifest = dict(manifest, complete=True, vocab_sha256=vocab_sha, splits=splits,
                    n_cells=sum(splits[s]["n_cells"] for s in SPLITS),
                    n_cells_in=sum(r["n_cells_in"] for r in records),
                    n_skipped_no_vocab_gene=sum(r["n_skipped_no_vocab_gene"] for r in records),
                    parts=[{"name": r["name"], "n_cells_in": r["n_cells_in"],
                            **({"ingest": r["ingest"]} if "ingest" in r else {})} for r in records],
                    stats=summary, finalize_seconds=round(time.time() - started, 2))
    atomic_write_json(out / "manifest.json", manifest)
    # The per-part Arrow and spill files duplicate hf/ and the shards; once the manifest is complete
    # they are not needed (nor are the bucket records, which point at the spill files).
    for folder in ("hf", "spill", "shuffle"):
        shutil.rmtree(out / "work" / folder, ignore_errors=True)
    return manifest
