"""Model, objectives and export/load, single process (no DeepSpeed)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from langcell.pretrain.config import ModelConfig, load_model_config
from langcell.pretrain.export import load_langcell, save_langcell
from langcell.pretrain.losses import mask_genes, masked_gene_count, mlm_loss
from langcell.pretrain.model import LangCellPretrainModel, MLMHead, load_text_tokenizer, resolve_text_model_path
from langcell.core.config import from_dict
from langcell.core.errors import LangCellError
from tests.pretrain_helpers import MODEL, VOCAB, cell_type_batch


def _tiny_model(seed=0, pooling="cls") -> LangCellPretrainModel:
    torch.manual_seed(seed)
    cfg = from_dict(ModelConfig, {**MODEL, "cell": {**MODEL["cell"], "pooling": pooling}}, "test")
    model = LangCellPretrainModel(cfg).eval()
    model.text_tokenizer = load_text_tokenizer(cfg.text)
    return model


def _cells(b=4, length=20, vocab=VOCAB):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, vocab - 1, (b, length), generator=g)
    ids[:, 0] = vocab - 1
    mask = torch.ones_like(ids)
    ids[1, 12:] = 0
    mask[1, 12:] = 0
    return ids, mask


def _vocab_dir(tmp_path, vocab=VOCAB):
    d = tmp_path / "vocab"
    d.mkdir()
    td = {"<pad>": 0, "<mask>": 1, **{f"ENSG{i:011d}": i for i in range(2, vocab - 1)}, "<cls>": vocab - 1}
    (d / "token_dictionary.json").write_text(json.dumps(td))
    return d


def test_export_then_load_gives_identical_outputs(tmp_path):
    from transformers import BertModel
    model = _tiny_model()
    ids, mask = _cells()
    texts = ["A T cell. Found in the blood.", "A B cell.", "A monocyte.", "A platelet from the lung."]
    with torch.no_grad():
        emb, hidden = model.encode_cells(ids, mask)
        t_ids, t_mask = model.tokenize_texts(texts)
        temb = model.encode_texts(t_ids, t_mask)
        logits = model.match_logits(hidden, mask, t_ids, t_mask)
    out = save_langcell(model, tmp_path / "export", vocab_dir=_vocab_dir(tmp_path))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cell_bert", "text_bert", "cell_proj.bin", "text_proj.bin", "ctm_head.bin", "tokenizer", "vocab",
         "langcell_config.json"])
    loaded = load_langcell(out)
    with torch.no_grad():
        emb2, hidden2 = loaded.encode_cells(ids, mask)
        t_ids2, t_mask2 = loaded.tokenize_texts(texts)
        temb2 = loaded.encode_texts(t_ids2, t_mask2)
        logits2 = loaded.match_logits(hidden2, mask, t_ids2, t_mask2)
    assert emb.shape == (4, 256)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(t_ids, t_ids2)
    assert torch.allclose(emb, emb2, atol=1e-6) and torch.allclose(temb, temb2, atol=1e-6)
    assert torch.allclose(logits, logits2, atol=1e-6) and logits.shape == (4, 2)
    assert len(loaded.token_dictionary) == VOCAB and loaded.token_dictionary["<cls>"] == VOCAB - 1
    # The exported cell encoder is a plain HF BertModel.
    plain = BertModel.from_pretrained(str(out / "cell_bert"), add_pooling_layer=False).eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()],
                              hidden[mask.bool()], atol=1e-5)


def test_mean_pooling_skips_padding_and_survives_export(tmp_path):
    model = _tiny_model(pooling="mean")
    ids, mask = _cells()
    with torch.no_grad():
        emb, hidden = model.encode_cells(ids, mask)
        padded = ids.clone()
        padded[1, 12:] = 5  # what sits under the padding must not matter
        emb_other, _ = model.encode_cells(padded, mask)
    expected = torch.nn.functional.normalize(model.cell_proj(hidden[1, :12].mean(dim=0)), dim=-1)
    assert torch.allclose(emb[1], expected, atol=1e-6) and torch.allclose(emb, emb_other, atol=1e-6)
    assert not torch.allclose(emb, torch.nn.functional.normalize(model.cell_proj(hidden[:, 0]), dim=-1), atol=1e-3)
    loaded = load_langcell(save_langcell(model, tmp_path / "export", vocab_dir=_vocab_dir(tmp_path)))
    assert loaded.cell_pooling == "mean"
    with torch.no_grad():
        assert torch.allclose(loaded.encode_cells(ids, mask)[0], emb, atol=1e-6)
    with pytest.raises(LangCellError, match="cell pooling 'max'"):
        _tiny_model(pooling="max")


def test_text_encoder_matches_hf_bert_in_text_mode():
    from transformers import AutoModel, AutoTokenizer

    from langcell.pretrain.config import TextEncoderConfig
    from langcell.pretrain.model import build_text_encoder
    path = resolve_text_model_path("all-MiniLM-L6-v2")
    hf = AutoModel.from_pretrained(path).eval()
    enc = AutoTokenizer.from_pretrained(path)(["a CD4 T cell in blood", "an erythrocyte"], padding=True,
                                              return_tensors="pt")
    ours = build_text_encoder(TextEncoderConfig(), encoder_width=32).eval()
    with torch.no_grad():
        a = hf(**enc).last_hidden_state
        b = ours(enc["input_ids"], enc["attention_mask"])
    m = enc["attention_mask"].bool()
    assert (a - b)[m].abs().max() < 1e-4
    assert ours.encoder.layer[0].crossattention.self.key.in_features == 32


def test_mask_genes_is_bert_style_and_spares_cls_and_pad():
    torch.manual_seed(0)
    vocab, cls = 1000, 999
    ids = torch.randint(2, cls, (64, 200))
    ids[:, 0] = cls
    ids[:, 150:] = 0
    genes = 64 * 149
    n = masked_gene_count(ids, 0.15, cls_id=cls)
    assert n == round(0.15 * genes)
    masked, positions, labels = mask_genes(ids, n, cls_id=cls)
    picked = torch.zeros(ids.numel(), dtype=torch.bool)
    picked[positions] = True
    picked = picked.view_as(ids)
    # Exactly n distinct genes, never <cls> or padding, and the labels are their true ids.
    assert picked.sum().item() == n == len(positions)
    assert not picked[:, 0].any() and not picked[:, 150:].any()
    assert torch.equal(labels, ids.reshape(-1)[positions])
    to_mask = (masked[picked] == 1).float().mean().item()
    unchanged = (masked[picked] == ids[picked]).float().mean().item()
    assert abs(to_mask - 0.8) < 0.03 and abs(unchanged - 0.1 - 0.001) < 0.03
    assert torch.equal(masked[~picked], ids[~picked])
    assert ((masked[picked] >= 2) & (masked[picked] < cls) | (masked[picked] == 1)).all()
    # Uniform over genes: every column of genes is picked about equally often.
    per_column = picked[:, 1:150].float().mean(0)
    assert per_column.std().item() < 0.05


def test_masked_gene_loss_equals_a_loop_reference():
    """The head scores exactly the picked positions: compared with a per-token loop."""
    torch.manual_seed(1)
    head = MLMHead(8, 50, "relu", 1e-12)
    hidden = torch.randn(3, 7, 8)
    positions = torch.tensor([2, 9, 20])
    labels = torch.tensor([5, 6, 7])
    ref = sum(F.cross_entropy(head(hidden[p // 7, p % 7])[None], labels[i:i + 1])
              for i, p in enumerate(positions.tolist())) / 3
    assert abs(mlm_loss(head, hidden, positions, labels).item() - ref.item()) < 1e-6


def test_missing_text_model_is_one_line_error():
    with pytest.raises(LangCellError, match="does not exist"):
        resolve_text_model_path("/nonexistent/bert-model")


def test_shipped_configs_load():
    from langcell.pretrain.config import load_pretrain_config
    assert load_model_config("base").cell.hidden_size == 512
    assert load_model_config("base").cell.num_hidden_layers == 12
    assert load_model_config("tiny").cell.vocab_size == 25427
    # MiniLM was trained as a mean-pooled sentence encoder; LangCell's BERT pools [CLS].
    assert load_model_config("minilm").text.pooling == "mean" and load_model_config("base").text.pooling == "cls"
    for name in ("tiny", "demo", "base"):
        cfg = load_pretrain_config(name)
        assert load_model_config(cfg.model).cell.vocab_size == 25427
        assert cfg.stage1.losses.cell_text == 0.0 and cfg.stage2.losses.ctm > 0


def test_activation_checkpointing_gives_the_same_gradients():
    from langcell.pretrain.config import LossWeights
    from langcell.pretrain.losses import pretrain_losses
    ids, mask = _cells(b=6, length=24)
    texts = ["A T cell.", "A T cell.", "A B cell.", "A monocyte.", "A platelet.", "A B cell."]
    grads = []
    for checkpointing in (False, True):
        model = _tiny_model().train()
        if checkpointing:
            model.enable_activation_checkpointing()
        batch = cell_type_batch(model, ids, mask, texts)
        torch.manual_seed(5)
        total, _ = pretrain_losses(model, batch, 2, LossWeights(), 0.15, 0.05)
        total.backward()
        grads.append((total.item(), model.cell_bert.encoder.layer[0].attention.self.query.weight.grad.clone(),
                      model.text_bert.encoder.layer[0].crossattention.self.value.weight.grad.clone()))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5) and torch.allclose(grads[0][2], grads[1][2], atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_simcse_from_random_weights_collapses_with_cls_pooling_only(pooling):
    """Why the shipped configs pool by mean: from random weights every cell's <cls> state is the
    same vector, SimCSE cannot tell two views of one cell from two cells, and training leaves the
    loss at ln(batch); mean-pooled cells start apart and the loss falls."""
    from langcell.pretrain.losses import cell_cell_contrastive

    model = _tiny_model(pooling=pooling).train()
    ids, mask = _cells(b=16, length=40)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(25):
        views = [torch.nn.functional.normalize(model.cell_proj(model.pool_cells(
            model.cell_bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask)), dim=-1) for _ in (0, 1)]
        loss = cell_cell_contrastive(*views, 0.05)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        emb = model.eval().encode_cells(ids, mask)[0]
    off_diagonal = ((emb @ emb.t()).sum() - 16) / (16 * 15)
    if pooling == "cls":
        assert off_diagonal > 0.99 and abs(loss.item() - math.log(16)) < 0.1
    else:
        assert off_diagonal < 0.7 and loss.item() < 0.5


def test_matching_pairs_by_cell_index_equal_copied_cells():
    """Pairs that share cells (as the matching loss and zero-shot scoring make them) read each
    cell's keys and values by index; the logits and every gradient equal those of the pairs
    built by copying the cells."""
    model = _tiny_model().eval()
    ids, mask = _cells()
    t_ids, t_mask = model.tokenize_texts(["A T cell.", "A B cell from the blood.", "A monocyte."])
    cells = torch.tensor([0, 0, 1, 3, 3, 3, 2])
    texts = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    results = []
    for by_index in (False, True):
        model.zero_grad()
        _, hidden = model.encode_cells(ids, mask)
        if by_index:
            logits = model.match_logits(hidden, mask, t_ids[texts], t_mask[texts], cell_index=cells)
        else:
            logits = model.match_logits(hidden[cells], mask[cells], t_ids[texts], t_mask[texts])
        (logits * torch.linspace(-1, 1, 14).view(7, 2)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (copied, g_copied), (indexed, g_indexed) = results
    assert torch.allclose(copied, indexed, atol=1e-5) and copied.shape == (7, 2)
    assert g_copied.keys() == g_indexed.keys() and "cell_bert.embeddings.word_embeddings.weight" in g_copied
    for name in g_copied:
        assert torch.allclose(g_copied[name], g_indexed[name], atol=1e-5), name


def test_matching_gradients_are_the_same_every_time_on_cpu_threads():
    """A seed gives one run: the matching pass's gather of each pair's cell states backpropagates
    in a fixed order (advanced indexing's backward on a CPU accumulates in the order its threads
    finish, and runs of one seed drifted apart from the first steps of stage 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _tiny_model().eval()
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(32, 128, 32, generator=g, requires_grad=True)
        mask = torch.ones(32, 128, dtype=torch.long)
        t_ids, t_mask = model.tokenize_texts(["A T cell.", "A B cell from the blood.", "A monocyte."] * 32)
        cells = torch.randint(0, 32, (96,), generator=g)
        upstream = torch.randn(96, 2, generator=g)
        grads = []
        for _ in range(8):
            hidden.grad = None
            (model.match_logits(hidden, mask, t_ids, t_mask, cell_index=cells) * upstream).sum().backward()
            grads.append(hidden.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], other) for other in grads[1:])
