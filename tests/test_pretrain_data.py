"""The shard stream: deterministic, split across ranks, independent of worker count, resumable from a saved position."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from langcell.core.errors import LangCellError
from langcell.pretrain.config import TextChoiceConfig
from langcell.pretrain.data import CellStream, choose_text, library_shards
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


@pytest.mark.parametrize("kw", [dict(open_shards=2), dict(open_shards=1, require_text=True, rank=1, world=2)])
def test_resume_from_a_saved_position_is_exact_and_costs_the_same_at_any_step(tmp_path, monkeypatch, kw):
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
        reads.clear()
        resumed = iter(torch.utils.data.DataLoader(_stream(lib, resume=position, **kw), batch_size=None))
        first = next(resumed)
        cost[g] = sum(reads)
        rest = [first] + list(itertools.islice(resumed, 40 - g - 1))
        assert [b["soma_joinid"].tolist() for b in rest] == ids[g:], g
        assert _positions(rest) == positions[g:], g
    # The shuffle buffer (16 cells) and one window (4 batches of 8) are read again, never the stream
    # so far (with require_text, a third of the cells read are textless and skipped).
    assert max(cost.values()) <= (16 + 32) * (1.5 if kw.get("require_text") else 1), cost
    reads.clear()
    assert [b["soma_joinid"].tolist() for b in _take(_stream(lib, start_batch=39, **kw), 1)] == ids[39:]
    assert sum(reads) > 4 * max(cost.values())  # what replaying the stream costs at batch 39
    assert [b["soma_joinid"].tolist() for b in _take(_stream(lib, resume=positions[26], **kw), 5, workers=2)] \
        == ids[27:32]


def test_a_position_from_another_configuration_is_refused(tmp_path):
    lib = write_synthetic_library(tmp_path / "lib", n_cells=32, n_shards=2, vocab_size=600, min_len=12, max_len=64)
    position = {**_positions(_take(_stream(lib), 2))[-1], "file": "stream_rank00000.json"}
    with pytest.raises(LangCellError, match=r"^stream_rank00000.json: the run's data stream has changed since "
                                            r"\(shards 2 shards -> 1 shards, batch_size 8 -> 4\); resume with"):
        CellStream([library_shards(lib)[0][0]], **{**_STREAM, "batch_size": 4, "resume": position})
