"""The shard stream: deterministic, split across ranks, independent of worker count, skippable."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from pretrain.config import TextChoiceConfig
from pretrain.data import CellStream, choose_text, library_shards
from pretrain.model import resolve_text_model_path
from pretrain.synthetic import write_synthetic_library


def _stream(lib, **kw):
    args = dict(rank=0, world=1, seed=7, batch_size=8, shuffle_buffer=16, bucket_batches=4, max_length=128,
                with_text=False)
    args.update(kw)
    return CellStream([p for p, _ in library_shards(lib)], **args)


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
    picks = [choose_text(texts, np.random.default_rng([1, i]), cfg.always, cfg.optional, cfg.keep_prob)
             for i in range(200)]
    assert all(p.startswith("A T cell.") for p in picks)
    assert 0.4 < sum("In blood." in p for p in picks) / 200 < 0.6
    assert picks[3] == choose_text(texts, np.random.default_rng([1, 3]), cfg.always, cfg.optional, cfg.keep_prob)
    lib = write_synthetic_library(tmp_path / "lib", n_cells=16, n_shards=1, vocab_size=600, min_len=12, max_len=20)
    batch = _take(_stream(lib, with_text=True, tokenizer_path=resolve_text_model_path("all-MiniLM-L6-v2"),
                          text_choice=cfg, bucket_batches=1), 1)[0]
    assert batch["text_ids"].shape[0] == 8 and batch["text_keys"].dtype == torch.long
