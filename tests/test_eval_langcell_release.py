"""LangCell's release layout read through the project's public zero-shot path, against the
outputs LangCell's own code computed (tests/fixtures/langcell_release_layout/, see its README)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from langcell.eval.data import prepare_cells
from langcell.eval.model_io import cell_max_length, load_model
from langcell.eval.prompts import class_text, model_prompt
from langcell.eval.scoring import TopKScorer, score_cells
from langcell.core.errors import LangCellError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "langcell_release_layout"
REF = json.loads((FIXTURE / "reference_outputs.json").read_text())
TOKENIZER = str(FIXTURE / "text_vocab")


@pytest.fixture(scope="module")
def release():
    torch.set_num_threads(1)
    model, vocab = load_model(FIXTURE / "checkpoint", text_tokenizer=TOKENIZER)
    seqs = prepare_cells(REF["cells"], vocab.token_dictionary, cell_max_length(model), "reference cells")
    return model, vocab, seqs


def test_reference_outputs_reproduced_to_1e4(release):
    model, vocab, seqs = release
    scorer = TopKScorer(model, REF["texts"], alpha=REF["alpha"])
    out = score_cells(scorer, seqs, batch_size=5, pad_id=vocab.pad_id)
    assert scorer.text_ids[:, :5].tolist() == [ids[:5] for ids in REF["text_token_ids"]]
    assert np.abs(scorer.text_embeds.numpy() - np.array(REF["text_embeddings"])).max() < 1e-4
    for ours, theirs in (("embeds", "cell_embeddings"), ("sim", "cosine"), ("match", "ctm_match_probability"),
                         ("fused", "fused")):
        assert np.abs(out[ours] - np.array(REF[theirs])).max() < 1e-4, ours
    assert out["fused"].argmax(1).tolist() == REF["predictions"]
    with torch.no_grad():
        ids, mask = torch.as_tensor(seqs[2])[None], torch.ones(1, len(seqs[2]), dtype=torch.long)
        _, hidden = model.encode_cells(ids, mask)
        t_ids, t_mask = scorer.text_ids[3:4], scorer.text_mask[3:4]
        logits = model.match_logits(hidden, mask, t_ids, t_mask)
    assert np.abs(logits[0].numpy() - np.array(REF["ctm_logits"][2][3])).max() < 1e-4


def test_cells_get_cls_and_langcell_truncation(release):
    model, vocab, seqs = release
    cls_id = REF["cls_token_id"]
    assert vocab.token_dictionary["<cls>"] == cls_id and cell_max_length(model) == 2048
    lengths = [len(c) for c in REF["cells"]]
    assert max(lengths) == 2100
    for raw, seq in zip(REF["cells"], seqs):
        assert seq[0] == cls_id and seq[1:].tolist() == raw[:2047]
    assert len(seqs[lengths.index(2100)]) == 2048
    # Already prepared cells stay as they are.
    again = prepare_cells(seqs, vocab.token_dictionary, 2048, "x")
    assert all(np.array_equal(a, b) for a, b in zip(again, seqs))
    with pytest.raises(LangCellError, match="cell 1 has token id 25427 outside the model's vocabulary of 25427"):
        prepare_cells([[5, 6], [7, 25427]], vocab.token_dictionary, 2048, "foreign.dataset")


def test_topk_changes_the_formula_and_k_at_n_classes_is_exact(release):
    model, vocab, seqs = release
    exact = score_cells(TopKScorer(model, REF["texts"]), seqs, pad_id=vocab.pad_id)["fused"]
    k_all = score_cells(TopKScorer(model, REF["texts"], top_k=len(REF["texts"])), seqs, pad_id=vocab.pad_id)["fused"]
    k2 = score_cells(TopKScorer(model, REF["texts"], top_k=2), seqs, pad_id=vocab.pad_id)["fused"]
    assert np.abs(k_all - np.array(REF["fused"])).max() < 1e-4 and np.allclose(exact, k_all, atol=1e-6)
    assert np.abs(k2 - np.array(REF["fused"])).max() > 1e-2


def test_release_uses_langcells_class_prompt(release):
    model = release[0]
    prompt = model_prompt(model)
    name, definition = "b cell", "A lymphocyte of B lineage that is capable of B cell mediated immunity."
    assert class_text(prompt, name, definition) == REF["texts"][0]
    assert class_text(prompt, "platelet", "") == REF["texts"][7]


def _copy(tmp_path):
    out = tmp_path / "release"
    shutil.copytree(FIXTURE / "checkpoint", out)
    return out


def test_strict_loading_names_file_and_key(tmp_path):
    from safetensors.torch import load_file, save_file

    out = _copy(tmp_path)
    cell = out / "cell_bert" / "model.safetensors"
    state = load_file(str(cell))
    del state["encoder.layer.1.output.dense.bias"]
    save_file(state, str(cell))
    with pytest.raises(LangCellError, match=r"model\.safetensors: tensor 'encoder\.layer\.1\.output\.dense\.bias' "
                                            "missing"):
        load_model(out, text_tokenizer=TOKENIZER)

    out = _copy(tmp_path / "b")
    text = out / "text_bert" / "pytorch_model.bin"
    state = torch.load(text, weights_only=True)
    state["embeddings.token_type_embeddings.weight"] = torch.zeros(2, 32)
    state["encoder.layer.0.extra.weight"] = torch.zeros(3)
    torch.save(state, text)
    with pytest.raises(LangCellError, match=r"pytorch_model\.bin: unexpected tensor 'encoder\.layer\.0\.extra\.weight'"):
        load_model(out, text_tokenizer=TOKENIZER)

    out = _copy(tmp_path / "c")
    torch.save({"weight": torch.zeros(2, 16), "bias": torch.zeros(2)}, out / "ctm_head.bin")
    with pytest.raises(LangCellError, match=r"ctm_head\.bin: tensor 'weight' has shape \[2, 16\] but the config gives "
                                            r"\[2, 32\]"):
        load_model(out, text_tokenizer=TOKENIZER)


def test_missing_text_tokenizer_is_one_line_error(tmp_path):
    with pytest.raises(LangCellError, match="pass --text-tokenizer") as err:
        load_model(FIXTURE / "checkpoint", text_tokenizer=str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(LangCellError, match="BiomedNLP-PubMedBERT.*is not available"):
        load_model(FIXTURE / "checkpoint")


def test_eval_zero_shot_cli_on_langcell_tokenized_cells(tmp_path):
    """`langcell eval zero-shot` on LangCell's release and a `datasets` folder tokenized as
    LangCell tokenizes (no <cls>), each cell labelled with LangCell's own prediction: accuracy 1
    exactly when every prediction matches LangCell's."""
    import datasets

    from langcell.cli import main as cli_main

    names = [t[len("cell type: "):].split(". ")[0] for t in REF["texts"]]
    lib = tmp_path / "lib"
    datasets.Dataset.from_dict({"input_ids": REF["cells"], "cell_type": [names[p] for p in REF["predictions"]],
                                "dataset_id": ["d"] * len(REF["cells"])}).save_to_disk(str(lib / "hf" / "test"))
    (lib / "type2text.json").write_text(json.dumps(dict(zip(names, REF["texts"]))))
    rc = cli_main(["eval", "zero-shot", "--model", str(FIXTURE / "checkpoint"), "--text-tokenizer", TOKENIZER,
                   "--data", str(lib / "hf" / "test"), "--out", str(tmp_path / "report"), "--config", "smoke"])
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())["zero-shot"]
    assert rc == 0 and metrics["top_k"] is None and metrics["accuracy"] == 1.0
    assert set(metrics["text_sources"].values()) == {"type2text"}
