"""Streaming scLibrary shards into length-bucketed training batches, deterministically.

The batch sequence one rank sees is a pure function of (library, seed, stage, rank, world
size): shards are permuted per epoch with a seed, `open_shards` of them are read at once with
their samples interleaved at random, passed through a seeded shuffle buffer, and batched inside
windows sorted by length. Loader workers all walk the same stream and each collates only every
`num_workers`-th batch, so the sequence does not depend on the worker count and a resumed run
skips the first N batches without tokenising them.

A stage-2 batch carries, beside the cells, what the objectives need to tell true descriptions
from false ones by meaning: a term code per identity aspect of every cell and the aspects each
cell's sampled text mentions (see pretrain/losses.py `truth_matrix`). Cells without any identity
text carry none; each distinct text of a batch is tokenised once.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch

from langcell.errors import LangCellError
from langcell.files import read_json, sha256_file

LIBRARY_FORMAT = "langcell-sclibrary/1"
ASPECT_ORDER = ("cell_type", "tissue", "disease", "development_stage", "sex", "assay", "self_reported_ethnicity")


def _shard_entries(node, context: tuple, found: list) -> list:
    """(name, sha256, context keys) of every .tar the manifest lists, however it nests them:
    {"name"|"path"|"file": "...tar", "sha256": ...} objects or {"...tar": sha256} mappings."""
    if isinstance(node, dict):
        name = next((node[k] for k in ("name", "path", "file", "shard") if isinstance(node.get(k), str)), None)
        if name and name.endswith(".tar") and isinstance(node.get("sha256"), str):
            found.append((name, node["sha256"], context))
        for key, value in node.items():
            if isinstance(value, str) and key.endswith(".tar"):
                found.append((key, value, context))
            else:
                _shard_entries(value, context + (str(key),), found)
    elif isinstance(node, list):
        for value in node:
            _shard_entries(value, context, found)
    return found


def library_shards(lib: str | os.PathLike, split: str = "train") -> list[tuple[Path, str]]:
    """(path, sha256) of the split's shards as the manifest lists them; errors if incomplete."""
    lib = Path(lib)
    manifest = read_json(lib / "manifest.json", "scLibrary manifest")
    if manifest.get("format") != LIBRARY_FORMAT:
        raise LangCellError(f"{lib}/manifest.json: format {manifest.get('format')!r}, expected "
                            f"{LIBRARY_FORMAT!r}; rebuild with `langcell build`")
    if not manifest.get("complete"):
        raise LangCellError(f"{lib}/manifest.json: library is not complete; rerun `langcell build` to finish it")
    shards = {}
    for name, digest, context in _shard_entries(manifest, (), []):
        in_split = split in Path(name).parts[:-1] or split in context
        if in_split:
            path = lib / name if "/" in name else lib / "shards" / split / name
            shards[path] = digest
    if not shards:
        raise LangCellError(f"{lib}/manifest.json: lists no '{split}' shards with sha256; rebuild the library")
    return sorted(shards.items())


def verify_shards(shards: list[tuple[Path, str]], lib: str | os.PathLike) -> None:
    for path, digest in shards:
        if not path.is_file():
            raise LangCellError(f"{path}: shard listed in {lib}/manifest.json is missing; rerun `langcell build`")
        if sha256_file(path) != digest:
            raise LangCellError(f"{path}: checksum differs from {lib}/manifest.json (corrupt or replaced); "
                                "rerun `langcell build` to rewrite it")


def library_vocab_size(lib: str | os.PathLike) -> int:
    return len(read_json(Path(lib) / "vocab" / "token_dictionary.json", "gene token dictionary"))


def choose_text(texts: dict, rng: np.random.Generator, always: list, optional: list,
                keep_prob: float) -> tuple[str, list[str]]:
    """One description of the cell and the aspects it mentions: `always` aspects plus each
    `optional` one with keep_prob, in the canonical aspect order. A cell without any identity
    text gets ("", [])."""
    keep = [a for a in ASPECT_ORDER if a in texts and (a in always or (a in optional and rng.random() < keep_prob))]
    if not keep:  # a cell without any chosen aspect still gets its first known description
        keep = [a for a in ASPECT_ORDER if a in texts][:1]
    return " ".join(str(texts[a]).strip() for a in keep), keep


def term_code(value: str) -> int:
    """A stable positive 63-bit code of a term (0 is reserved for "unknown")."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") >> 1 or 1


def term_codes(meta: dict, texts: dict) -> list[int]:
    """Per aspect of ASPECT_ORDER, the code of the cell's term: its ontology term id, or, where
    the metadata has none, the aspect's description (equal terms have equal descriptions);
    0 where the cell has no text for the aspect (an unknown value)."""
    codes = []
    for aspect in ASPECT_ORDER:
        if aspect not in texts:
            codes.append(0)
            continue
        term = meta.get(f"{aspect}_ontology_term_id")
        codes.append(term_code(f"{aspect}={term}" if term else f"{aspect}:{texts[aspect]}"))
    return codes


class CellStream(torch.utils.data.IterableDataset):
    """Infinite stream of collated batches for one rank (see the module docstring)."""

    def __init__(self, shards: list[Path], *, rank: int, world: int, seed: int, batch_size: int,
                 shuffle_buffer: int, bucket_batches: int, max_length: int, with_text: bool,
                 tokenizer_path: str | None = None, text_max_length: int = 128, text_choice=None,
                 start_batch: int = 0, pad_multiple: int = 1, open_shards: int = 1, require_text: bool = False):
        super().__init__()
        self.shards = [str(s) for s in shards]
        self.rank, self.world, self.seed = rank, world, seed
        self.batch_size, self.shuffle_buffer, self.bucket_batches = batch_size, shuffle_buffer, bucket_batches
        self.max_length, self.with_text = max_length, with_text
        self.tokenizer_path, self.text_max_length, self.text_choice = tokenizer_path, text_max_length, text_choice
        self.start_batch = start_batch
        self.pad_multiple = pad_multiple
        self.open_shards = max(1, open_shards)
        self.require_text = require_text
        self._tokenizer = None

    # -- the sample stream (identical in every worker of a rank)
    def _samples(self):
        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            shards = [self.shards[i] for i in order]
            # With fewer shards than ranks, every rank reads all shards and keeps every world-th cell.
            by_shard = len(shards) >= self.world
            mine = shards[self.rank::self.world] if by_shard else shards
            index = kept = 0
            # One interleaving for all ranks: when they share shards, they split its cells by position.
            for sample in self._interleaved(mine, np.random.default_rng([self.seed, 4, epoch])):
                if self.require_text and not json.loads(sample["texts.json"]):
                    continue
                keep = by_shard or index % self.world == self.rank
                index += 1
                if keep:
                    kept += 1
                    yield epoch, sample
            if kept == 0:  # an endless loop over empty shards would hang every rank
                raise LangCellError(f"{mine[0] if mine else 'shards'}: rank {self.rank} of {self.world} got no "
                                    "cells; use fewer ranks or a library with more cells")

    def _interleaved(self, shards: list[str], rng: np.random.Generator):
        """Samples of `open_shards` shards at a time, each next sample from one of them at random;
        a finished shard is replaced by the next in order."""
        from webdataset.tariterators import tarfile_samples
        pending = iter(shards)
        readers = [tarfile_samples([{"url": s}]) for s in itertools.islice(pending, self.open_shards)]
        while readers:
            i = int(rng.integers(len(readers)))
            sample = next(readers[i], None)
            if sample is not None:
                yield sample
                continue
            following = next(pending, None)
            if following is None:
                readers.pop(i)
            else:
                readers[i] = tarfile_samples([{"url": following}])

    def _shuffled(self):
        rng = np.random.default_rng([self.seed, 1, self.rank])
        buffer = []
        for item in self._samples():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], item = item, buffer[i]
            yield item

    def _batches(self):
        """Windows of bucket_batches*batch_size cells, sorted by length, cut into batches whose
        order is then shuffled (so long and short batches alternate)."""
        rng = np.random.default_rng([self.seed, 2, self.rank])
        window = self.batch_size * self.bucket_batches
        stream = self._shuffled()
        while True:
            cells = []
            for epoch, sample in itertools.islice(stream, window):
                ids = np.load(io.BytesIO(sample["input_ids.npy"]))[: self.max_length]
                cells.append((epoch, sample, ids))
            cells.sort(key=lambda c: len(c[2]))
            batches = [cells[i:i + self.batch_size] for i in range(0, window, self.batch_size)]
            for j in rng.permutation(len(batches)):
                yield batches[j]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader takes batch k of its output from worker k % nw, starting at worker 0; so
        # worker w owns global batch g when (g - start) % nw == w.
        for g, cells in enumerate(self._batches()):
            if g >= self.start_batch and (g - self.start_batch) % nw == wid:
                yield self._collate(cells)

    def _collate(self, cells) -> dict:
        lengths = [len(ids) for _, _, ids in cells]
        width = -(-max(lengths) // self.pad_multiple) * self.pad_multiple
        cell_ids = torch.zeros(len(cells), width, dtype=torch.long)
        for i, (_, _, ids) in enumerate(cells):
            cell_ids[i, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
        batch = {"cell_ids": cell_ids, "cell_mask": (cell_ids != 0).long(),
                 "n_tokens": torch.tensor(sum(lengths)), "n_padded": torch.tensor(width * len(cells)),
                 "soma_joinid": torch.tensor([int(s["__key__"]) for _, s, _ in cells])}
        if self.with_text:
            batch.update(self._collate_texts(cells))
        return batch

    def _collate_texts(self, cells) -> dict:
        c = self.text_choice
        unique: dict[str, int] = {}
        index, codes, mentioned = [], [], []
        for epoch, sample, _ in cells:
            rng = np.random.default_rng([self.seed, 3, epoch, int(sample["__key__"])])
            texts = json.loads(sample["texts.json"])
            text, aspects = choose_text(texts, rng, c.always, c.optional, c.keep_prob)
            index.append(unique.setdefault(text, len(unique)) if text else -1)
            codes.append(term_codes(json.loads(sample["meta.json"]), texts))
            mentioned.append([a in aspects for a in ASPECT_ORDER])
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        # A batch without any text still runs the text encoder once (on ""), weighted zero by
        # the losses, so that every rank backpropagates through the same parameters.
        enc = self._tokenizer(list(unique) or [""], padding=True, truncation=True,
                              max_length=self.text_max_length, return_tensors="pt")
        index = torch.tensor(index, dtype=torch.long)
        return {"text_ids": enc["input_ids"], "text_mask": enc["attention_mask"],
                "has_text": index >= 0, "text_index": index.clamp(min=0),
                "term_codes": torch.tensor(codes, dtype=torch.long),
                "text_aspects": torch.tensor(mentioned, dtype=torch.bool)}
