"""The shard stream: deterministic, split across ranks, independent of worker count, resumable from a saved position."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from langcell.core.errors import LangCellError
from langcell.pretrain.config import TextChoiceConfig
from langcell.pretrain.data import CellStream, choose_text, length_targets, library_shards
from langcell.pretrain.model import resolve_text_model_path
from langcell.pretrain.synthetic import write_synthetic_library
from langcell.pretrain.tar_reader import ShardReader


_STREAM = dict(rank=0, world=1, seed=7, batch_size=8, shuffle_buffer=16, bucket_batches=4, max_length=128,
               with_text=False)


def _stream(lib, **kw):
    return CellStream([p for p, _ in library_shards(lib)], **{**_STREAM, **kw})


def _take(dataset, n, workers=0):
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return list(itertools.islice(iter(loader), n))


def test_stream_is_deterministic_worker_independent_and_skippable(tmp_path):
    lib = write_synthetic_library(tmp_path / "lib", n_cells=96, n_shards=4, vocab_size=600, min_len=12, max_len=64)
    ids = [b["soma_joinid"].tolist() for b in _take(_stream(lib), 24)]
    # 96 cells = 12 batches per epoch; the shuffle buffer (16) only blurs the epoch boundary.
    counts = np.bincount(sum(ids, []), minlength=96)
    assert counts.min() >= 1 and counts.max() <= 3 and len(set(sum(ids[:12], []))) >= 80
    ids = ids[:14]
    assert ids == [b["soma_joinid"].tolist() for b in _take(_stream(lib), 14)]
    assert ids == [b["soma_joinid"].tolist() for b in _take(_stream(lib), 14, workers=2)]
    assert ids[5:] == [b["soma_joinid"].tolist() for b in _take(_stream(lib, start_batch=5), 9, workers=2)]
    assert ids != [b["soma_joinid"].tolist() for b in _take(_stream(lib, seed=8), 14)]
    # Epoch 2 visits the cells in another order.
    assert sum(ids[:12], []) != sum([b["soma_joinid"].tolist() for b in _take(_stream(lib), 24)[12:]], [])


def test_ranks_get_disjoint_cells(tmp_path):
    for n_shards in (4, 1):  # by shard, and by cell when there are fewer shards than ranks
        lib = write_synthetic_library(tmp_path / f"lib{n_shards}", n_cells=64, n_shards=n_shards, vocab_size=600,
                                      min_len=12, max_len=64)
        # One epoch per rank (32 cells), read without a shuffle buffer that would pull in epoch 2.
        seen = [set(sum((b["soma_joinid"].tolist() for b in _take(_stream(lib, rank=r, world=2, shuffle_buffer=1), 4)), []))
                for r in range(2)]
        assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 64


def test_length_bucketing_cuts_padding(tmp_path):
    lib = write_synthetic_library(tmp_path / "lib", n_cells=256, n_shards=2, vocab_size=600, min_len=8, max_len=128)

    def share(bucket_batches):
        batches = _take(_stream(lib, bucket_batches=bucket_batches, shuffle_buffer=64), 32)
        return 1 - sum(b["n_tokens"].item() for b in batches) / sum(b["n_padded"].item() for b in batches)
    plain, bucketed = share(1), share(16)
    assert plain > 0.3 and bucketed < plain / 3


def test_texts_always_hold_cell_type_and_are_seeded(tmp_path):
    texts = {"cell_type": "A T cell.", "tissue": "In blood.", "disease": "Healthy.", "sex": "Female."}
    cfg = TextChoiceConfig()
    picks = [choose_text(texts, np.random.default_rng([1, i]), cfg.always, cfg.optional, cfg.keep_prob)[0]
             for i in range(200)]
    assert all(p.startswith("A T cell.") for p in picks)
    assert 0.4 < sum("In blood." in p for p in picks) / 200 < 0.6
    assert picks[3] == choose_text(texts, np.random.default_rng([1, 3]), cfg.always, cfg.optional, cfg.keep_prob)[0]


def _text_batch(lib, **kw):
    return _take(_stream(lib, with_text=True, tokenizer_path=resolve_text_model_path("all-MiniLM-L6-v2"),
                         text_choice=TextChoiceConfig(), bucket_batches=1, **kw), 1)[0]


def test_text_batches_carry_terms_and_each_distinct_text_once(tmp_path):
    from transformers import AutoTokenizer
    lib = write_synthetic_library(tmp_path / "lib", n_cells=64, n_shards=1, vocab_size=600, min_len=12, max_len=20,
                                  unlabelled_every=4)
    batch = _text_batch(lib, batch_size=32)
    has, index, codes = batch["has_text"], batch["text_index"], batch["term_codes"]
    tok = AutoTokenizer.from_pretrained(resolve_text_model_path("all-MiniLM-L6-v2"))
    texts = tok.batch_decode(batch["text_ids"], skip_special_tokens=True)
    assert len(set(texts)) == len(texts) == int(index[has].max()) + 1  # distinct texts, each once
    # Cells without identity text: no codes, no mentioned aspects; the others mention cell type.
    assert 4 <= int((~has).sum()) <= 12 and (codes[~has] == 0).all() and not batch["text_aspects"][~has].any()
    assert batch["text_aspects"][has, 0].all() and (codes[has, 0] != 0).all()
    # Cells whose codes agree on every aspect their texts mention share a text only if they chose
    # the same aspects; the code of the cell type is shared by cells of one type.
    types = [texts[i].split(",")[0] for i in index[has]]
    for i, a in enumerate(types):
        for j, b in enumerate(types):
            assert (codes[has][i, 0] == codes[has][j, 0]) == (a == b)


def test_stage2_can_read_only_cells_with_text(tmp_path):
    lib = write_synthetic_library(tmp_path / "lib", n_cells=64, n_shards=2, vocab_size=600, min_len=12, max_len=20,
                                  unlabelled_every=4)
    batches = _take(_stream(lib, with_text=True, tokenizer_path=resolve_text_model_path("all-MiniLM-L6-v2"),
                            text_choice=TextChoiceConfig(), require_text=True), 12)
    assert all(b["has_text"].all() for b in batches)
    seen = set(sum((b["soma_joinid"].tolist() for b in batches), []))
    assert not any(j % 4 == 0 for j in seen) and len(seen) == 48


def test_open_shards_mix_cells_of_several_shards_into_a_batch(tmp_path):
    lib = write_synthetic_library(tmp_path / "lib", n_cells=256, n_shards=8, vocab_size=600, min_len=12, max_len=20)

    def shards_per_batch(open_shards):
        batches = _take(_stream(lib, shuffle_buffer=1, bucket_batches=1, open_shards=open_shards), 8)
        return np.mean([len(set((b["soma_joinid"] // 32).tolist())) for b in batches])
    assert shards_per_batch(1) <= 1.3 and shards_per_batch(4) >= 3.0
    # Still every cell once per epoch.
    ids = sum((b["soma_joinid"].tolist() for b in _take(_stream(lib, shuffle_buffer=1, open_shards=4), 32)), [])
    assert sorted(ids) == list(range(256))


def _positions(batches):
    """The resume position after each batch, as the trainer keeps it."""
    window, out = None, []
    for b in batches:
        window = json.loads(b["stream_window"]) if b["stream_window"] else window
        out.append({"window": window, "consumed": b["stream_batch"] + 1})
    return out


# (stream options, cells a resume may read: the shuffle buffer and one window of 4 batches)
RESUMES = [(dict(open_shards=2), 16 + 4 * 8),
           (dict(open_shards=1, require_text=True, rank=1, world=2), (16 + 4 * 8) * 1.5),
           # 3 to 6 cells a batch; a buffer of 48 lets targets reach below max_length
           (dict(open_shards=2, tokens_per_batch=384, shuffle_buffer=48), 48 + 4 * 6),
           (dict(open_shards=1, require_text=True, rank=1, world=2, tokens_per_batch=384, shuffle_buffer=48),
            (48 + 4 * 6) * 1.5)]


@pytest.mark.parametrize("kw,resume_reads", RESUMES)
def test_resume_from_a_saved_position_is_exact_and_costs_the_same_at_any_step(tmp_path, monkeypatch, kw, resume_reads):
    lib = write_synthetic_library(tmp_path / "lib", n_cells=96, n_shards=4, vocab_size=600, min_len=12, max_len=64,
                                  unlabelled_every=3)
    reads = []
    read = ShardReader.read

    def counted(self):
        got = read(self)
        reads.append(got is not None)
        return got
    monkeypatch.setattr(ShardReader, "read", counted)

    full = _take(_stream(lib, **kw), 40)  # more than 3 epochs of this rank's cells
    ids = [b["soma_joinid"].tolist() for b in full]
    positions = _positions(full)
    cost = {}
    for g in (1, 6, 13, 27, 39):
        position = json.loads(json.dumps(positions[g - 1]))  # as it comes back from the checkpoint file
        # A budgeted stream reads its sample of the library's lengths here, the same at any step.
        stream = _stream(lib, resume=position, **kw)
        reads.clear()
        resumed = iter(torch.utils.data.DataLoader(stream, batch_size=None))
        first = next(resumed)
        cost[g] = sum(reads)
        rest = [first] + list(itertools.islice(resumed, 40 - g - 1))
        assert [b["soma_joinid"].tolist() for b in rest] == ids[g:], g
        assert _positions(rest) == positions[g:], g
    # The shuffle buffer and one window (4 batches) are read again, never the stream so far (with
    # require_text, a third of the cells read are textless and skipped).
    assert max(cost.values()) <= resume_reads, cost
    stream = _stream(lib, start_batch=39, **kw)
    reads.clear()
    assert [b["soma_joinid"].tolist() for b in _take(stream, 1)] == ids[39:]
    assert sum(reads) > 4 * max(cost.values())  # what replaying the stream costs at batch 39
    assert [b["soma_joinid"].tolist() for b in _take(_stream(lib, resume=positions[26], **kw), 5, workers=2)] \
        == ids[27:32]


def test_a_position_from_another_configuration_is_refused(tmp_path):
    lib = write_synthetic_library(tmp_path / "lib", n_cells=32, n_shards=2, vocab_size=600, min_len=12, max_len=64)
    position = {**_positions(_take(_stream(lib), 2))[-1], "file": "stream_rank00000.json"}
    with pytest.raises(LangCellError, match=r"^stream_rank00000.json: the run's data stream has changed since "
                                            r"\(shards 2 shards -> 1 shards, batch_size 8 -> 4\); resume with"):
        CellStream([library_shards(lib)[0][0]], **{**_STREAM, "batch_size": 4, "resume": position})


def _ranks(lib, steps, world=8, **kw):
    """The first `steps` batches of every rank of `world`, step by step."""
    streams = [_stream(lib, rank=r, world=world, **kw) for r in range(world)]
    return list(zip(*[_take(s, steps) for s in streams]))


def _imbalance(steps) -> float:
    """Mean over steps of the most real tokens a rank got over the mean of the ranks."""
    real = np.array([[b["n_tokens"].item() for b in step] for step in steps], dtype=float)
    return float(np.mean(real.max(1) / real.mean(1)))


def test_token_budget_gives_every_rank_the_same_cells_count_within_budget(tmp_path):
    """8 ranks of one process: at every step every rank batches the same number of cells (the
    contrastive all-gathers need it), within the budget, and ranks' real tokens stay close; a
    fixed count per rank lets them drift apart."""
    lib = write_synthetic_library(tmp_path / "lib", n_cells=1024, n_shards=8, vocab_size=600, min_len=12, max_len=128)
    for pad_multiple in (1, 8):
        steps = _ranks(lib, 32, tokens_per_batch=1024, shuffle_buffer=256, pad_multiple=pad_multiple)
        counts = [[b["cell_ids"].shape[0] for b in step] for step in steps]
        assert all(len(set(c)) == 1 for c in counts), counts
        assert len({c[0] for c in counts}) >= 3  # shorter targets batch more cells
        for step in steps:
            for b in step:
                width = b["cell_ids"].shape[1]
                assert width % pad_multiple == 0 and b["n_padded"].item() == b["cell_ids"].numel() <= 1024
                assert b["cell_mask"].sum().item() == b["n_tokens"].item()
        assert _imbalance(steps) <= 1.1, pad_multiple
    assert _imbalance(_ranks(lib, 32, batch_size=8, shuffle_buffer=256)) > 1.3


def test_token_budget_stream_is_deterministic_worker_independent_and_skippable(tmp_path):
    lib = write_synthetic_library(tmp_path / "lib", n_cells=256, n_shards=4, vocab_size=600, min_len=12, max_len=128)
    kw = dict(tokens_per_batch=1024, shuffle_buffer=128, rank=1, world=2)
    batches = _take(_stream(lib, **kw), 16)
    ids = [b["soma_joinid"].tolist() for b in batches]
    assert len({len(i) for i in ids}) >= 2
    assert ids == [b["soma_joinid"].tolist() for b in _take(_stream(lib, **kw), 16)]
    assert ids == [b["soma_joinid"].tolist() for b in _take(_stream(lib, **kw), 16, workers=2)]
    assert ids[5:] == [b["soma_joinid"].tolist() for b in _take(_stream(lib, start_batch=5, **kw), 11, workers=2)]
    assert ids != [b["soma_joinid"].tolist() for b in _take(_stream(lib, **{**kw, "seed": 8}), 16)]
    # Picking by length starves no cell: in about 3 epochs (760 cells read) every cell comes.
    one = _stream(lib, **{**kw, "rank": 0, "world": 1})
    seen = np.bincount(sum((b["soma_joinid"].tolist() for b in _take(one, 80)), []), minlength=256)
    assert seen.sum() >= 700 and seen.min() >= 1 and seen.max() <= 4


def test_token_budget_stage2_batches_hold_only_cells_with_text(tmp_path):
    lib = write_synthetic_library(tmp_path / "lib", n_cells=256, n_shards=2, vocab_size=600, min_len=12, max_len=128,
                                  unlabelled_every=4)
    batches = _take(_stream(lib, with_text=True, tokenizer_path=resolve_text_model_path("all-MiniLM-L6-v2"),
                            text_choice=TextChoiceConfig(), require_text=True, tokens_per_batch=1024,
                            shuffle_buffer=128), 8)
    for b in batches:
        n = b["cell_ids"].shape[0]
        assert b["has_text"].all() and b["term_codes"].shape == (n, 7) and b["text_aspects"].shape == (n, 7)
        assert int(b["text_index"].max()) < b["text_ids"].shape[0] and (b["term_codes"][:, 0] != 0).all()
        assert not any(j % 4 == 0 for j in b["soma_joinid"].tolist())


def test_length_targets_batch_each_length_as_often_as_the_library_holds_it_leaning_long():
    lengths = np.sort(np.random.default_rng(0).integers(200, 2049, 4096))
    targets, cumulative = length_targets(lengths, 2048, 32768, 20000)
    assert targets[-1] == 2048 and (targets[:-1] % 8 == 0).all() and cumulative[-1] == 1.0
    steps = np.diff(cumulative, prepend=0.0)
    cells = steps * (32768 // targets)
    cells /= cells.sum()
    for length in range(256, 2049, 64):
        # Targets of at least `length` batch at least the sample's share of such cells, and no
        # more than the margins add (cells stretched by 5%, 3% at max_length).
        batched, held = cells[targets >= length].sum(), (lengths >= length).mean()
        assert held <= batched <= (lengths * 1.05 >= length).mean() + 0.03 + 0.01, length
    # A buffer too small for 8 batches at max_length is refused, naming the option.
    with pytest.raises(LangCellError, match=r"^data.shuffle_buffer: 100 cells are too few for batches of 16 "
                                            r"cells at max_length 2048 .*; set it to at least 128$"):
        length_targets(lengths, 2048, 32768, 100)


def test_token_budget_refuses_batches_of_one_and_a_buffer_that_keeps_growing(tmp_path):
    lib = write_synthetic_library(tmp_path / "lib", n_cells=128, n_shards=2, vocab_size=600, min_len=12, max_len=64)
    with pytest.raises(LangCellError, match=r"^data.tokens_per_batch: 255 tokens make 1 cell\(s\) a batch at "
                                            r"max_length 128 .*; set it to at least 256$"):
        _stream(lib, tokens_per_batch=255)
    # Targets that never reach the long cells: they pile up, and the stream stops rather than
    # read on for ever.
    stream = _stream(lib, tokens_per_batch=512, shuffle_buffer=32)
    stream.targets = (np.array([16]), np.array([1.0]))
    with pytest.raises(LangCellError, match=r"^data.shuffle_buffer: rank 0 read 512 cells without finding 32 of "
                                            r"at most 16 tokens"):
        _take(stream, 8)


@pytest.mark.parametrize("budget", [None, 128])
def test_a_stage_can_read_only_some_datasets(tmp_path, budget):
    lib = write_synthetic_library(tmp_path / "lib", n_cells=64, n_shards=2, vocab_size=600, min_len=12, max_len=20)
    batches = _take(_stream(lib, datasets=["d1", "d3"], tokens_per_batch=budget, max_length=32,
                            shuffle_buffer=32 if budget else 16), 24)
    seen = sum((b["soma_joinid"].tolist() for b in batches), [])
    # Cells of d1 and d3 only (dataset d{joinid % 4}), every one of them within two epochs' reading.
    assert seen and all(j % 2 == 1 for j in seen)
    assert set(seen) == set(range(1, 64, 2))
    # A saved position is only valid for the datasets it was read with.
    stream = _stream(lib, datasets=["d1", "d3"], bucket_batches=1)
    position = {"window": json.loads(_take(stream, 1)[0]["stream_window"]), "consumed": 1}
    with pytest.raises(LangCellError, match=r"datasets \['d1', 'd3'\] -> None"):
        _stream(lib, bucket_batches=1, resume=position)
    # Datasets the library does not hold: a clear error, not an endless search.
    with pytest.raises(LangCellError, match="got no cells of datasets"):
        _take(_stream(lib, datasets=["d9"]), 1)
    with pytest.raises(LangCellError, match="no cells of datasets"):
        _stream(lib, datasets=["d9"], tokens_per_batch=128, max_length=32, shuffle_buffer=32)
