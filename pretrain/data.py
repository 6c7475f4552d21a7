"""Streaming scLibrary shards into length-bucketed training batches, deterministically.

The batch sequence one rank sees is a pure function of (library, seed, stage, rank, world
size): shards are permuted per epoch with a seed, `open_shards` of them are read at once with
their samples interleaved at random and passed through a shuffle buffer. Batches then come one
of two ways:
- a fixed number of cells (`tokens_per_batch` None): windows of `bucket_batches` batches sorted
  by length, the window's batches in an order shuffled per rank. Enough for one process; across
  ranks, step s may give one rank its shortest batch and another its longest, and the longest
  sets every rank's step time.
- a token budget: every batch holds `tokens_per_batch // target` cells of at most `target`
  tokens, where the step's target length is drawn with an RNG seeded without the rank, so all
  ranks batch the same count of cells of about the same length at every step (the contrastive
  all-gathers see equal counts, and no rank waits on another's longer batch). Each rank takes
  the longest cells of at most the target from its shuffle buffer (oldest first among equal
  lengths). Targets are drawn so that each length is batched as often as the library holds it,
  estimated from a seeded sample of the library that every rank reads alike (`length_targets`).
Loader workers all walk the same stream and each collates only every `num_workers`-th batch, so
the sequence does not depend on the worker count. The state at the start of every window of
`bucket_batches` batches (shard order, open shards with byte offsets, the shuffle buffer as
(shard, offset) references, RNG states) travels with its batches; the trainer saves it with
each checkpoint and a resumed stream rebuilds it by reading the buffer and one window again.

A stage-2 batch carries, beside the cells, what the objectives need to tell true descriptions
from false ones by meaning: a term code per identity aspect of every cell and the aspects each
cell's sampled text mentions (see pretrain/losses.py `truth_matrix`). Cells without any identity
text carry none; each distinct text of a batch is tokenised once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from langcell.core.errors import LangCellError
from langcell.core.files import read_json, sha256_file

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


STREAM_FORMAT = "langcell-stream/1"

# Token-budget batching (see the module docstring). The sample of the library's lengths: enough
# cells to know each length's share to about a percent, from few shards (shards are uniform
# samples of their split; opening thousands would cost more than the reading).
SAMPLE_CELLS = 4096
SAMPLE_CELLS_PER_SHARD = 256
# A length that the targets serve less often than the library holds it piles up in the buffer,
# which must then be read past; one served more often only makes longer targets take shorter
# cells. So the targets lean long against the sample's error: each sampled length is stretched
# by LENGTH_MARGIN and TOP_SHARE of the cells are batched at max_length.
LENGTH_MARGIN = 0.05
TOP_SHARE = 0.03
# No target asks for more than 1/BUFFER_DEPTH of the cells an average buffer holds at or below
# it: a few short targets in a row would otherwise empty the buffer's short end.
BUFFER_DEPTH = 8
# A plain shuffle buffer of W cells emits 98% of its cells within 4 W arrivals; picking by
# length would let a cell that longer ones keep passing over wait far longer.
OVERDUE = 4
# A buffer that must grow past this many times its size to find cells that fit means the
# library's lengths differ from its sample: stop before memory does.
BUFFER_GROWTH_LIMIT = 16


def _round_up(value, multiple: int):
    return -(-value // multiple) * multiple


def admitted(sample: dict, require_text: bool, datasets: tuple | None) -> bool:
    """Whether a stage reads this cell: one with identity text where `require_text`, one of
    `datasets` (meta.json's dataset_id) where given."""
    if require_text and not json.loads(sample["texts.json"]):
        return False
    return datasets is None or json.loads(sample["meta.json"]).get("dataset_id") in datasets


def sample_lengths(shards: list, seed: int, max_length: int, require_text: bool = False,
                   datasets: tuple | None = None) -> np.ndarray:
    """Sorted lengths (cut at max_length) of up to SAMPLE_CELLS cells the stage reads: the first
    SAMPLE_CELLS_PER_SHARD such cells of each shard, shards in an order drawn with `seed` alone,
    so every rank and loader worker reads the same sample."""
    from langcell.pretrain.tar_reader import ShardReader
    lengths: list[int] = []
    for i in np.random.default_rng([seed, 5]).permutation(len(shards)):
        reader, taken = ShardReader(str(shards[i])), 0
        try:
            while taken < SAMPLE_CELLS_PER_SHARD and len(lengths) < SAMPLE_CELLS:
                got = reader.read()
                if got is None:
                    break
                sample = got[1]
                if not admitted(sample, require_text, datasets):
                    continue
                lengths.append(min(len(np.load(io.BytesIO(sample["input_ids.npy"]))), max_length))
                taken += 1
        finally:
            reader.close()
        if len(lengths) == SAMPLE_CELLS:
            break
    if not lengths:
        raise LangCellError(f"{shards[0] if shards else 'shards'}: the library's shards hold no cells"
                            f"{' with text' if require_text else ''}"
                            f"{f' of datasets {list(datasets)}' if datasets is not None else ''}; "
                            "use a library that has some")
    return np.sort(np.array(lengths, dtype=np.int64))


def length_targets(lengths: np.ndarray, max_length: int, tokens_per_batch: int, shuffle_buffer: int,
                   pad_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(target lengths, cumulative probability of drawing each for a step) such that every
    length is batched as often as `lengths` (a sample of the library) holds it, leaning long
    (LENGTH_MARGIN, TOP_SHARE). Targets are multiples of 8 (max_length excepted), the multiple
    GPUs pad widths to, so a padded batch can fill its budget; none lies below the shortest
    length at which an average buffer holds BUFFER_DEPTH batches of cells that fit."""
    grid = np.unique(np.minimum(np.arange(8, max_length + 8, 8), max_length))
    counts = tokens_per_batch // _round_up(grid, pad_multiple)
    share_below = np.searchsorted(lengths, grid, side="right") / len(lengths)
    deep = np.flatnonzero(share_below * shuffle_buffer >= BUFFER_DEPTH * counts)
    if not len(deep):
        raise LangCellError(f"data.shuffle_buffer: {shuffle_buffer} cells are too few for batches of "
                            f"{counts[-1]} cells at max_length {max_length} (data.tokens_per_batch "
                            f"{tokens_per_batch}); set it to at least {BUFFER_DEPTH * counts[-1]}")
    stretched = _round_up(np.ceil(lengths * (1 + LENGTH_MARGIN)).astype(np.int64), 8)
    targets = np.append(np.clip(stretched, grid[deep[0]], max_length), max_length)
    cells = np.append(np.full(len(lengths), (1 - TOP_SHARE) / len(lengths)), TOP_SHARE)
    # A step of target t batches tokens_per_batch // t cells: steps are drawn in proportion to
    # the cells a target must batch over the cells one of its steps takes.
    steps = cells / (tokens_per_batch // _round_up(targets, pad_multiple))
    unique, inverse = np.unique(targets, return_inverse=True)
    weight = np.cumsum(np.bincount(inverse, steps))
    cumulative = weight / weight[-1]
    cumulative[-1] = 1.0  # a draw in [0, 1) always lands on a target
    return unique, cumulative


class CellStream(torch.utils.data.IterableDataset):
    """Infinite stream of collated batches for one rank (see the module docstring).

    Every batch carries `stream_batch` (its index in its window of `bucket_batches` batches)
    and, on the first batch of each window this iterator yields, `stream_window`: the stream's
    state where that window began (JSON). `{"window": ..., "consumed": stream_batch + 1}` passed
    back as `resume` continues right after that batch, reading only the shuffle buffer and one
    window again. `batch_size` cells make a batch unless `tokens_per_batch` is set.
    """

    def __init__(self, shards: list[Path], *, rank: int, world: int, seed: int, batch_size: int,
                 shuffle_buffer: int, bucket_batches: int, max_length: int, with_text: bool,
                 tokenizer_path: str | None = None, text_max_length: int = 128, text_choice=None,
                 start_batch: int = 0, pad_multiple: int = 1, open_shards: int = 1, require_text: bool = False,
                 tokens_per_batch: int | None = None, datasets: list | None = None, resume: dict | None = None):
        super().__init__()
        self.datasets = None if datasets is None else tuple(datasets)
        self.shards = [str(s) for s in shards]
        self.rank, self.world, self.seed = rank, world, seed
        self.batch_size, self.shuffle_buffer, self.bucket_batches = batch_size, shuffle_buffer, bucket_batches
        self.max_length, self.with_text = max_length, with_text
        self.tokenizer_path, self.text_max_length, self.text_choice = tokenizer_path, text_max_length, text_choice
        self.start_batch = start_batch
        self.pad_multiple = pad_multiple
        self.open_shards = max(1, open_shards)
        self.require_text = require_text
        self.tokens_per_batch = tokens_per_batch
        self._tokenizer = None
        if resume is not None:
            saved, now = resume["window"]["stream"], self.identity()
            changed = [f"{k} {_short(k, saved.get(k))} -> {_short(k, now[k])}" for k in now if saved.get(k) != now[k]]
            if changed:
                raise LangCellError(f"{resume.get('file', 'saved data stream')}: the run's data stream has changed "
                                    f"since ({', '.join(changed)}); resume with the library, data config and "
                                    "number of ranks it started with")
        self.resume = resume
        if tokens_per_batch is not None:
            top = tokens_per_batch // _round_up(max_length, pad_multiple)
            if top < 2:
                raise LangCellError(f"data.tokens_per_batch: {tokens_per_batch} tokens make {top} cell(s) a batch at "
                                    f"max_length {max_length} (contrastive needs 2); set it to at least "
                                    f"{2 * _round_up(max_length, pad_multiple)}")
            # Read once here, so loader workers get it with the dataset instead of each reading it.
            lengths = sample_lengths(self.shards, seed, max_length, require_text, self.datasets)
            self.targets = length_targets(lengths, max_length, tokens_per_batch, shuffle_buffer, pad_multiple)

    def identity(self) -> dict:
        """What a saved position is only valid for."""
        return {"format": STREAM_FORMAT, "shards": [Path(s).name for s in self.shards], "rank": self.rank,
                "world": self.world, "seed": self.seed, "batch_size": self.batch_size,
                "shuffle_buffer": self.shuffle_buffer, "bucket_batches": self.bucket_batches,
                "max_length": self.max_length, "open_shards": self.open_shards, "require_text": self.require_text,
                "datasets": None if self.datasets is None else list(self.datasets),
                "tokens_per_batch": self.tokens_per_batch}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader takes batch k of its output from worker k % nw, starting at worker 0; so
        # worker w owns batch g of this iterator's output when (g - start) % nw == w.
        make_windows = self._windows if self.tokens_per_batch is None else self._budget_windows
        if self.resume is None:
            windows, skip, start = make_windows(None), 0, self.start_batch
        else:
            windows, skip, start = make_windows(self.resume["window"]), self.resume["consumed"], 0
        g = 0
        for state, batches in windows:
            first = True
            for k, cells in enumerate(batches):
                if k < skip:
                    continue
                if g >= start and (g - start) % nw == wid:
                    batch = self._collate(cells)
                    batch["stream_batch"] = k
                    batch["stream_window"] = json.dumps(state) if first else ""
                    yield batch
                first = first and g < start
                g += 1
            skip = 0

    def _windows(self, state: dict | None):
        """(state where the window began, its batches): windows of bucket_batches*batch_size
        cells, sorted by length, cut into batches whose order is then shuffled (so long and
        short batches alternate)."""
        source = _SampleSource(self, state["source"] if state else None)
        if state:
            buffer = [(epoch, (shard, offset), _read_sample(self.shards[shard], offset))
                      for epoch, shard, offset in state["buffer"]]
            shuffle_rng, batch_rng = _rng(state["shuffle_rng"]), _rng(state["batch_rng"])
        else:
            buffer, shuffle_rng, batch_rng = [], np.random.default_rng([self.seed, 1, self.rank]), \
                np.random.default_rng([self.seed, 2, self.rank])
        window = self.batch_size * self.bucket_batches
        while True:
            state = {"stream": self.identity(), "source": source.state(),
                     "buffer": [[epoch, shard, offset] for epoch, (shard, offset), _ in buffer],
                     "shuffle_rng": shuffle_rng.bit_generator.state, "batch_rng": batch_rng.bit_generator.state}
            cells = []
            while len(cells) < window:
                item = source.next()
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                i = int(shuffle_rng.integers(len(buffer)))
                buffer[i], item = item, buffer[i]
                epoch, _, sample = item
                cells.append((epoch, sample, np.load(io.BytesIO(sample["input_ids.npy"]))[: self.max_length]))
            cells.sort(key=lambda c: len(c[2]))
            batches = [cells[i:i + self.batch_size] for i in range(0, window, self.batch_size)]
            yield state, [batches[j] for j in batch_rng.permutation(len(batches))]

    def _budget_windows(self, state: dict | None):
        """(state where the window began, its bucket_batches batches) by token budget: a batch
        takes, from the shuffle buffer topped up to its size, `tokens_per_batch // target` cells
        of at most the step's target length: the longest, the oldest first among equal lengths.
        Two exceptions keep every cell's wait bounded, as a plain shuffle buffer's is: cells that
        have waited OVERDUE buffers' worth of arrivals go first, and the shortest target takes the
        oldest cells that fit (cells below it are passed over by every target while longer ones
        fit). The buffer grows past its size only while too few cells fit."""
        source = _SampleSource(self, state["source"] if state else None)
        if state:
            buffer = [self._buffered(epoch, (shard, offset), _read_sample(self.shards[shard], offset))
                      for epoch, shard, offset in state["buffer"]]
            arrived, arrivals = np.array(state["arrived"], dtype=np.int64), state["arrivals"]
            target_rng = _rng(state["target_rng"])
        else:
            buffer, arrived, arrivals = [], np.zeros(0, dtype=np.int64), 0
            target_rng = np.random.default_rng([self.seed, 6])  # no rank: one target for all ranks
        lengths = np.array([len(ids) for *_, ids in buffer], dtype=np.int64)
        targets, cumulative = self.targets
        while True:
            state = {"stream": self.identity(), "source": source.state(),
                     "buffer": [[epoch, shard, offset] for epoch, (shard, offset), _, _ in buffer],
                     "arrived": arrived.tolist(), "arrivals": arrivals, "target_rng": target_rng.bit_generator.state}
            batches = []
            for _ in range(self.bucket_batches):
                target = int(targets[np.searchsorted(cumulative, target_rng.random(), side="right")])
                count = self.tokens_per_batch // _round_up(target, self.pad_multiple)
                fit, added = int((lengths <= target).sum()), []
                while len(buffer) + len(added) < self.shuffle_buffer or fit < count:
                    if len(buffer) + len(added) >= BUFFER_GROWTH_LIMIT * self.shuffle_buffer:
                        raise LangCellError(
                            f"data.shuffle_buffer: rank {self.rank} read {len(buffer) + len(added)} cells without "
                            f"finding {count} of at most {target} tokens (the library's lengths differ from its "
                            "sample); raise data.shuffle_buffer or set data.tokens_per_batch to null")
                    added.append(self._buffered(*source.next()))
                    fit += len(added[-1][3]) <= target
                if added:
                    buffer += added
                    lengths = np.append(lengths, [len(ids) for *_, ids in added])
                    arrived = np.append(arrived, np.arange(arrivals, arrivals + len(added)))
                    arrivals += len(added)
                fits = np.flatnonzero(lengths <= target)  # in arrival order
                if target == targets[0]:
                    chosen = fits[:count]
                else:
                    overdue = arrivals - arrived[fits] >= OVERDUE * self.shuffle_buffer
                    chosen = fits[np.lexsort((fits, -lengths[fits], ~overdue))[:count]]
                batches.append([(buffer[i][0], buffer[i][2], buffer[i][3]) for i in chosen])
                keep = np.ones(len(buffer), dtype=bool)
                keep[chosen] = False
                buffer = [cell for cell, kept in zip(buffer, keep) if kept]
                lengths, arrived = lengths[keep], arrived[keep]
            yield state, batches

    def _buffered(self, epoch: int, ref: tuple[int, int], sample: dict) -> tuple:
        """(epoch, (shard, offset), sample, token ids): the ids decoded once, their bytes dropped."""
        return epoch, ref, sample, np.load(io.BytesIO(sample.pop("input_ids.npy")))[: self.max_length]

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
                # Listed here so that the matching objective's shapes are known on the host.
                "text_rows": (index >= 0).nonzero().squeeze(1),
                "term_codes": torch.tensor(codes, dtype=torch.long),
                "text_aspects": torch.tensor(mentioned, dtype=torch.bool)}


def _short(key: str, value) -> str:
    return f"{len(value)} shards" if key == "shards" and isinstance(value, list) else repr(value)


def _rng(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def _read_sample(path: str, offset: int) -> dict:
    from langcell.pretrain.tar_reader import read_sample_at
    try:
        return read_sample_at(path, offset)
    except (OSError, ValueError, tarfile.TarError) as exc:
        raise LangCellError(f"{path}: cannot read the sample at byte {offset} that the saved data stream "
                            f"holds ({exc}); was the library rebuilt? resume against the library the run "
                            "started with") from None


class _SampleSource:
    """This rank's samples, epoch after epoch: shards permuted per epoch with the seed,
    `open_shards` of them read at once, each next sample from one of them at random (a
    finished shard replaced by the next in order). With fewer shards than ranks, every rank
    reads all shards and keeps every world-th cell. `state()` is where it stands; a source
    built from that state goes on exactly from there."""

    def __init__(self, stream: CellStream, state: dict | None):
        self.s = stream
        self._start_epoch(state["epoch"] if state else 0, state)

    def _start_epoch(self, epoch: int, state: dict | None = None) -> None:
        from langcell.pretrain.tar_reader import ShardReader
        s = self.s
        self.epoch = epoch
        order = np.random.default_rng([s.seed, epoch]).permutation(len(s.shards))
        self.by_shard = len(order) >= s.world
        self.mine = [int(i) for i in (order[s.rank::s.world] if self.by_shard else order)]
        if state is None:
            # One interleaving for all ranks: when they share shards, they split its cells by position.
            self.rng = np.random.default_rng([s.seed, 4, epoch])
            self.pending = min(s.open_shards, len(self.mine))
            opened = [(j, 0) for j in range(self.pending)]
            self.index = self.kept = 0
        else:
            self.rng = _rng(state["rng"])
            self.pending, opened = state["pending"], state["readers"]
            self.index, self.kept = state["index"], state["kept"]
        self.readers = [(j, ShardReader(s.shards[self.mine[j]], offset)) for j, offset in opened]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pending": self.pending, "index": self.index, "kept": self.kept,
                "readers": [[j, reader.position] for j, reader in self.readers],
                "rng": self.rng.bit_generator.state}

    def next(self) -> tuple[int, tuple[int, int], dict]:
        """(epoch, (shard, byte offset), sample)."""
        from langcell.pretrain.tar_reader import ShardReader
        s = self.s
        while True:
            if not self.readers:
                if self.kept == 0:  # an endless loop over empty shards would hang every rank
                    first = s.shards[self.mine[0]] if self.mine else "shards"
                    wanted = (f" of datasets {list(s.datasets)} (the stage's `datasets`: meta.json's dataset_id)"
                              if s.datasets is not None else "")
                    raise LangCellError(f"{first}: rank {s.rank} of {s.world} got no cells{wanted}; use fewer ranks "
                                        "or a library with more cells")
                self._start_epoch(self.epoch + 1)
                continue
            i = int(self.rng.integers(len(self.readers)))
            j, reader = self.readers[i]
            got = reader.read()
            if got is None:
                if self.pending < len(self.mine):
                    self.readers[i] = (self.pending, ShardReader(s.shards[self.mine[self.pending]]))
                    self.pending += 1
                else:
                    self.readers.pop(i)
                continue
            offset, sample = got
            if not admitted(sample, s.require_text, s.datasets):
                continue
            keep = self.by_shard or self.index % s.world == s.rank
            self.index += 1
            if keep:
                self.kept += 1
                return self.epoch, (self.mine[j], offset), sample
