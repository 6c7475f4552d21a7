"""`langcell build`: an ingest folder -> scLibrary (docs/DEVELOPING.md, contract build -> pretrain/eval).

Work is cut by ingest part. For each part a worker verifies the part's sha256, tokenizes it in
chunks, writes its cells to webdataset tars (per split, numbered from a range reserved for the
part in advance, so names never depend on timing) and to one Arrow stream file per split, and
finally writes `work/parts/part-NNNNN.json` with the sha256 of everything it wrote. A rerun
trusts a part only through that record, its files and their checksums, so a killed run resumes
where it stopped and repeats nothing that is complete. Once every part is done, the Arrow files
become `hf/{split}` (`datasets.save_to_disk`), and `type2text.json`, `text_variants.json`,
`stats.md`/`stats.png` and `manifest.json` (complete) are written.

`--shard i/N` builds the parts with index % N == i (one machine each, same output folder on a
shared file system); the run that finds every part done finalizes.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ingest.ontology import split_term_ids
from langcell.errors import LangCellError
from langcell.files import atomic_path, atomic_write_json, output_lock, read_json, sha256_file

from build_sclibrary import ingest_io, stats as stats_mod, vocab as vocab_mod
from build_sclibrary.config import SPLITS, BuildConfig, load_text_config, parse_shard
from build_sclibrary.splits import assign_splits
from build_sclibrary.texts import TextBuilder, load_terms
from build_sclibrary.tokenizer import RankValueTokenizer

LIB_FORMAT = "langcell-sclibrary/1"
TEXT_BIN = 16  # characters per bin of the text-length histogram
TEXT_BINS = 256


def hf_schema() -> pa.Schema:
    fields = [pa.field("input_ids", pa.list_(pa.int32())), pa.field("length", pa.int64()),
              pa.field("soma_joinid", pa.int64())]
    fields += [pa.field(name, pa.string()) for name in ingest_io.META_COLUMNS]
    return pa.schema(fields)


@dataclass
class _PartJob:
    ingest_root: str
    out: str
    index: int
    part: dict
    gene_ids: list
    split_codes: np.ndarray
    shard_start: dict
    config: dict
    vocab_sha: dict
    text_config: dict = field(default_factory=dict)


def build_library(ingest_dir: str | os.PathLike, out_dir: str | os.PathLike, config: BuildConfig | None = None,
                  progress: bool = True) -> dict:
    """Build scLibrary from `ingest_dir` into `out_dir`; returns the manifest (complete or, for a
    `--shard` run whose siblings are not finished, the incomplete one)."""
    config = config or BuildConfig()
    out = Path(out_dir)
    shard_index, shard_count = parse_shard(config.shard)
    lock_dir = out if shard_count == 1 else out / "work" / "locks" / f"shard-{shard_index}-of-{shard_count}"
    with output_lock(lock_dir):
        return _build(Path(ingest_dir), out, config, shard_index, shard_count, progress)


def _build(ingest_root: Path, out: Path, config: BuildConfig, shard_index: int, shard_count: int,
           progress: bool) -> dict:
    ingest = ingest_io.open_ingest(ingest_root)
    text_config = load_text_config(config.texts)
    output_config = dict(config.output_config(), texts=text_config.__dict__)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        old = read_json(manifest_path, "scLibrary manifest")
        if old.get("config") != output_config or old.get("ingest_manifest_sha256") != _ingest_sha(ingest_root):
            raise LangCellError(f"{manifest_path}: this folder was built with another configuration or ingest; "
                                "use a new --out folder or repeat the original options")
        if old.get("complete"):
            return old
    manifest = {"format": LIB_FORMAT, "complete": False, "config": output_config,
                "ingest": str(ingest_root.resolve()), "ingest_manifest_sha256": _ingest_sha(ingest_root)}
    if shard_count == 1 or not manifest_path.exists():
        # A --shard run never rewrites an existing manifest: a sibling may have just completed it.
        atomic_write_json(manifest_path, manifest)
    if shard_count == 1:
        # With --shard, sibling runs may be writing temporaries right now; the finalizing run cleans.
        _remove_temporaries(out)
    load_terms(ingest_root)  # fail early, before any work, when the ontology step was not run

    mine = [i for i in range(len(ingest.parts)) if i % shard_count == shard_index]
    vocab_sha = _prepare_vocab(ingest, out, config, mine, progress)
    codes = _plan_splits(ingest, config)
    starts = _reserve_shards(codes, config.shard_size)
    pending = []
    for i in mine:
        if _trusted_record(out, i, vocab_sha) is None:
            pending.append(_PartJob(str(ingest_root), str(out), i, ingest.parts[i], ingest.gene_ids, codes[i],
                                    starts[i], output_config, vocab_sha, text_config.__dict__))
    _run_jobs(pending, config.workers, progress, "tokenize", _process_part)

    # This run checked (or wrote) its own parts; other shards' parts are checked here.
    all_records = [_trusted_record(out, i, vocab_sha, verify=i % shard_count != shard_index)
                   for i in range(len(ingest.parts))]
    if any(r is None for r in all_records):
        missing = sum(r is None for r in all_records)
        print(f"langcell build: shard {shard_index}/{shard_count} done; {missing} parts of other shards are "
              "still missing, the run that finishes last writes the library")
        return manifest
    if shard_count == 1:
        return _finalize(ingest, out, manifest, all_records, vocab_sha, text_config)
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
        return _finalize(ingest, out, manifest, all_records, vocab_sha, text_config)
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
def _prepare_vocab(ingest: ingest_io.Ingest, out: Path, config: BuildConfig, mine: list[int], progress: bool) -> dict:
    vocab_dir = out / "vocab"
    if config.vocab == "geneformer-v1":
        tokens, medians = vocab_mod.geneformer_v1_vocab()
        vocab_mod.copy_reference_extras(vocab_dir)
    else:
        selected = vocab_mod.select_corpus_genes(ingest.gene_ids, ingest.biotypes)
        sketch_dir = out / "work" / "sketch"
        jobs = [(str(ingest.root), ingest.parts[i], i, len(ingest.gene_ids), selected, config.chunk_rows,
                 config.bins_per_decade, str(sketch_dir)) for i in mine
                if not (sketch_dir / f"part-{i:05d}.npz").is_file()]
        _run_jobs(jobs, config.workers, progress, "gene medians", _sketch_part)
        paths = [sketch_dir / f"part-{i:05d}.npz" for i in range(len(ingest.parts))]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise LangCellError(f"{missing[0]}: gene-median sketches of {len(missing)} parts (other --shard runs) are "
                                "missing; rerun this command once every shard has passed the median step")
        merged = vocab_mod.MedianSketch.load(paths[0])
        for path in paths[1:]:
            merged.merge(vocab_mod.MedianSketch.load(path))
        tokens, medians = vocab_mod.corpus_vocab(ingest.gene_ids, selected, merged)
    # The tokenizer checks that the two files agree before anything is written with them.
    RankValueTokenizer(tokens, medians, max_length=config.max_length, source=str(vocab_dir))
    if not any(g in tokens for g in ingest.gene_ids):
        raise LangCellError(f"{ingest.root / 'genes.parquet'}: no gene of the ingest is in the {config.vocab} "
                            "vocabulary; use --vocab corpus for this organism or gene id scheme")
    return vocab_mod.write_vocab(vocab_dir, tokens, medians)


def _sketch_part(job) -> int:
    root, part, index, n_genes, selected, chunk_rows, bins_per_decade, sketch_dir = job
    ingest = ingest_io.Ingest(Path(root), {"parts": [part]}, [], [])
    path = ingest_io.verify_part(ingest, part)
    gene_map = np.full(n_genes, -1, dtype=np.int64)
    gene_map[selected] = np.arange(selected.size)
    sketch = vocab_mod.MedianSketch(selected.size, bins_per_decade)
    rows = 0
    for _, X, n_counts in ingest_io.iter_chunks(path, n_genes, chunk_rows):
        vocab_mod.sketch_chunk(sketch, X, n_counts, gene_map)
        rows += X.shape[0]
    sketch.save(Path(sketch_dir) / f"part-{index:05d}.npz")
    return rows


# --- splits and shard numbering ----------------------------------------------------------------
def _plan_splits(ingest: ingest_io.Ingest, config: BuildConfig) -> list[np.ndarray]:
    import pandas as pd

    columns = ["soma_joinid", "dataset_id", "donor_id", "cell_type", "cell_type_ontology_term_id"]
    frames, sizes = [], []
    for part in ingest.parts:
        path = ingest.part_path(part)
        try:
            table = ingest_io.read_obs(path, columns)
        except (pa.ArrowException, OSError) as exc:
            raise LangCellError(f"{path}: cannot read the part ({str(exc).splitlines()[0]}); "
                                "rerun `langcell ingest` to rewrite it") from None
        frames.append(table.to_pandas())
        sizes.append(table.num_rows)
    obs = pd.concat(frames, ignore_index=True)
    codes = assign_splits(obs, config.split_by, config.fractions, config.seed, config.holdout_cell_types)
    return np.split(codes, np.cumsum(sizes)[:-1])


def _reserve_shards(codes: list[np.ndarray], shard_size: int) -> list[dict]:
    """First shard number per part and split: each part owns ceil(cells / shard_size) numbers."""
    next_number = {split: 0 for split in SPLITS}
    starts = []
    for part_codes in codes:
        counts = np.bincount(part_codes, minlength=3)
        starts.append(dict(next_number))
        for code, split in enumerate(SPLITS):
            next_number[split] += math.ceil(int(counts[code]) / shard_size)
    return starts


# --- per-part work -----------------------------------------------------------------------------
def _record_path(out: Path, index: int) -> Path:
    return out / "work" / "parts" / f"part-{index:05d}.json"


def _trusted_record(out: Path, index: int, vocab_sha: dict, verify: bool = True) -> dict | None:
    path = _record_path(out, index)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("status") != "done" or record.get("vocab_sha256") != vocab_sha:
        return None
    for entry in [*(s for split in SPLITS for s in record["shards"][split]), *record["hf"].values()]:
        file = out / entry["name"]
        if not file.is_file() or (verify and sha256_file(file) != entry["sha256"]):
            return None
    return record


_CACHE: dict = {}


def _resources(job: _PartJob):
    """Tokenizer and text builder, loaded once per worker process."""
    key = (job.out, json.dumps(job.vocab_sha, sort_keys=True), job.ingest_root)
    if _CACHE.get("key") != key:
        from build_sclibrary.config import TextConfig

        tokenizer = RankValueTokenizer.from_vocab_dir(Path(job.out) / "vocab", max_length=job.config["max_length"])
        texts = TextBuilder(load_terms(job.ingest_root), TextConfig(**job.text_config))
        _CACHE.update(key=key, tokenizer=tokenizer, texts=texts)
    return _CACHE["tokenizer"], _CACHE["texts"]


class _SplitWriter:
    """Cells of one part and one split: tars of `shard_size` cells and one Arrow stream file."""

    def __init__(self, out: Path, split: str, part_index: int, first_number: int, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.number = first_number
        self.pending: list[tuple[str, bytes, bytes, bytes]] = []
        self.shards: list[dict] = []
        self.n_cells = 0
        self.arrow_name = f"work/hf/{split}/part-{part_index:05d}.arrow"
        self._arrow_ctx = atomic_path(out / self.arrow_name)
        self._arrow_tmp = self._arrow_ctx.__enter__()
        self._sink = pa.OSFile(str(self._arrow_tmp), "wb")
        self._writer = pa.ipc.new_stream(self._sink, hf_schema())

    def add(self, key: str, tokens: np.ndarray, meta: dict, texts: dict) -> None:
        buffer = io.BytesIO()
        np.save(buffer, tokens, allow_pickle=False)
        self.pending.append((key, buffer.getvalue(), _json_bytes(meta), _json_bytes(texts)))
        self.n_cells += 1
        if len(self.pending) == self.shard_size:
            self._flush_tar()

    def add_arrow(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def _flush_tar(self) -> None:
        if not self.pending:
            return
        name = f"shards/{self.split}/sclibrary-{self.number:06d}.tar"
        with atomic_path(self.out / name) as tmp:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for key, npy, meta, texts in self.pending:
                    for suffix, payload in (("input_ids.npy", npy), ("meta.json", meta), ("texts.json", texts)):
                        _add_member(tar, f"{key}.{suffix}", payload)
        self.shards.append({"name": name, "n_cells": len(self.pending), "sha256": sha256_file(self.out / name)})
        self.number += 1
        self.pending = []

    def close(self) -> dict:
        self._flush_tar()
        self._writer.close()
        self._sink.close()
        self._arrow_ctx.__exit__(None, None, None)
        return {"name": self.arrow_name, "n_cells": self.n_cells, "sha256": sha256_file(self.out / self.arrow_name)}

    def abort(self) -> None:
        self._writer.close()
        self._sink.close()
        self._arrow_ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    # Fixed mtime/owner: a rebuilt shard is byte-identical, so its checksum is reproducible.
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(payload))


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()


def _process_part(job: _PartJob) -> int:
    tokenizer, texts = _resources(job)
    out = Path(job.out)
    ingest = ingest_io.Ingest(Path(job.ingest_root), {"parts": [job.part]}, job.gene_ids, [])
    path = ingest_io.verify_part(ingest, job.part)
    writers = {split: _SplitWriter(out, split, job.index, job.shard_start[split], job.config["shard_size"])
               for split in SPLITS}
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
            row += obs.num_rows
            keep_rows = {split: [] for split in SPLITS}
            for i in range(obs.num_rows):
                if n_tokens[i] <= 1:
                    skipped += 1
                    continue
                meta = {name: _plain(columns[name][i]) for name in columns}
                cell_texts = texts.texts_for(meta)
                split = SPLITS[codes[i]]
                writers[split].add(str(meta["soma_joinid"]), flat[offsets[i]:offsets[i + 1]], meta, cell_texts)
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
                writers[split].add_arrow(_arrow_batch(obs, rows, flat, offsets))
        hf = {split: writers[split].close() for split in SPLITS}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if row != job.part.get("rows", row):
        raise LangCellError(f"{path}: {row} rows but the ingest manifest says {job.part['rows']}; "
                            "rerun `langcell ingest`")
    record = {"status": "done", "index": job.index, "name": job.part["name"], "vocab_sha256": job.vocab_sha,
              "n_cells_in": row, "n_skipped_no_vocab_gene": skipped,
              "shards": {split: writers[split].shards for split in SPLITS}, "hf": hf,
              "lengths": _sparse_hist(lengths), "text_lengths": _sparse_hist(text_lengths),
              "counts": {name: dict(counter) for name, counter in counters.items()},
              "terms": {aspect: sorted(ids) for aspect, ids in terms.items()}, "type2text": type2text}
    atomic_write_json(_record_path(out, job.index), record)
    return row


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _sparse_hist(hist: np.ndarray) -> dict:
    nonzero = np.flatnonzero(hist)
    return {str(int(i)): int(hist[i]) for i in nonzero}


def _arrow_batch(obs: pa.Table, rows: np.ndarray, flat: np.ndarray, offsets: np.ndarray) -> pa.RecordBatch:
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
    return pa.RecordBatch.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays],
                                      schema=hf_schema())


# --- running jobs ------------------------------------------------------------------------------
def _run_jobs(jobs: list, workers: int, progress: bool, what: str, function) -> None:
    from tqdm import tqdm

    if not jobs:
        return
    total = sum(int(_job_part(job).get("rows") or 0) for job in jobs)
    with tqdm(total=total, unit="cells", unit_scale=True, desc=what, disable=not progress) as bar:
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


def _job_part(job) -> dict:
    return job.part if isinstance(job, _PartJob) else job[1]


# --- finalization ------------------------------------------------------------------------------
def _finalize(ingest: ingest_io.Ingest, out: Path, manifest: dict, records: list[dict], vocab_sha: dict,
              text_config) -> dict:
    import datasets

    started = time.time()
    splits = {}
    for split in SPLITS:
        shards = [s for r in records for s in r["shards"][split]]
        splits[split] = {"n_cells": sum(s["n_cells"] for s in shards), "shards": shards}
        parts = [datasets.Dataset.from_file(str(out / r["hf"][split]["name"])) for r in records]
        dataset = datasets.concatenate_datasets(parts)
        target = out / "hf" / split
        tmp = out / "hf" / f".{split}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        dataset.save_to_disk(str(tmp))
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
    texts = TextBuilder(load_terms(ingest.root), text_config)
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
                    parts=[{"name": r["name"], "n_cells_in": r["n_cells_in"]} for r in records],
                    stats=summary, finalize_seconds=round(time.time() - started, 2))
    atomic_write_json(out / "manifest.json", manifest)
    # The per-part Arrow files duplicate hf/; once the manifest is complete they are not needed.
    shutil.rmtree(out / "work" / "hf", ignore_errors=True)
    return manifest
