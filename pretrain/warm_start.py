"""Warm starts: encoder weights from pretrained checkpoints instead of random ones.

LangCell starts its cell encoder from Geneformer and its text encoder from PubMedBERT. This
module finds a checkpoint (`init_from`: a local folder or an HF id), reads its weight file, and
loads a Geneformer `BertForMaskedLM` into our cell BERT and masked-gene head
(`model.cell.init_from`). The text side (`model.text.init_from`) resolves and reads its
checkpoint here too; `pretrain.model.build_text_encoder` maps the names.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from langcell.core.errors import LangCellError
from langcell.pretrain.config import CellEncoderConfig

log = logging.getLogger(__name__)

# Only the files a model load reads: a repo such as ctheodoris/Geneformer holds several models
# of a few GB, and a wildcard would fetch every one of them.
CELL_CHECKPOINT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")

# Geneformer's vocabulary: <pad>=0, <mask>=1, genes from 2. Ours is the same plus <cls> last.
FIRST_GENE_ID = 2

# Checkpoint keys that carry nothing our model needs: buffers older transformers saved, and the
# pooler, which our cell encoder does not have (LangCell pools the last hidden states itself).
_IGNORED_PREFIXES = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids", "bert.pooler.")

# Fields of the model yaml that fix the encoder's shape; the checkpoint's config.json must agree.
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "hidden_act", "layer_norm_eps")


def resolve_pretrained(spec: str, field: str, files: tuple[str, ...]) -> Path:
    """A local folder for `spec`: an existing folder, or an HF id `owner/name[@revision][/subfolder]`
    (the path syntax of huggingface_hub's HfFileSystem) whose `files` (glob patterns) are fetched
    with snapshot_download, from the local cache only when HF_HUB_OFFLINE is set."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        if spec.startswith((".", "/", "~")):
            raise LangCellError(f"{field} '{spec}': folder does not exist; give an existing local folder or an HF id")
        folder = download_snapshot(spec, field, files)
    if not (folder / "config.json").is_file():
        raise LangCellError(f"{field} '{spec}': no config.json in {folder}; name the folder that holds the model "
                            "(owner/name[@revision]/subfolder)")
    return folder


def download_snapshot(spec: str, field: str, files: tuple[str, ...]) -> Path:
    """The local snapshot folder of HF id `spec` (`owner/name[@revision][/subfolder]`), its `files`
    (glob patterns) fetched, from the local cache only when HF_HUB_OFFLINE is set."""
    repo, revision, subfolder = _parse_hub_id(spec)
    try:
        from huggingface_hub import snapshot_download
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        root = snapshot_download(repo, revision=revision, local_files_only=offline,
                                 allow_patterns=[f"{subfolder}/{f}" if subfolder else f for f in files])
    except Exception as exc:  # the hub raises many types; all mean "not available here"
        command = " ".join(["hf download", repo, *(["--revision", revision] if revision else []),
                            *(["--include", f"{subfolder}/*"] if subfolder else [])])
        raise LangCellError(f"{field} '{spec}': not a local folder and not available from the HF hub "
                            f"({type(exc).__name__}); download it first ({command}) or give a local folder") from None
    return Path(root) / subfolder


def _parse_hub_id(spec: str) -> tuple[str, str | None, str]:
    """(repo id, revision or None, subfolder or '') of `owner/name[@revision][/subfolder]`."""
    owner, _, rest = spec.partition("/")
    name_rev, _, subfolder = rest.partition("/")
    name, _, revision = name_rev.partition("@")
    return (f"{owner}/{name}" if name else owner), (revision or None), subfolder.strip("/")


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise LangCellError(f"{folder}: no model.safetensors or pytorch_model.bin; re-export the checkpoint")


# ----------------------------------------------------------------------------- cell encoder
def warm_start_cell(cell_bert: nn.Module, mlm_head: nn.Module, cfg: CellEncoderConfig) -> None:
    """Load a Geneformer `BertForMaskedLM` checkpoint into the cell BERT and the masked-gene head.

    Every parameter of both comes from the checkpoint, except the one row of `<cls>` (our last
    token id, which Geneformer lacks) in the word embeddings and the decoder. Shapes are checked,
    not taken: the model yaml must state the checkpoint's shape, so run.json, resumes and exports
    describe the model that actually trains.
    """
    folder, tie_word_embeddings = check_cell_checkpoint(cfg)
    source = _source(cfg, folder)
    state = dict(read_state_dict(folder))
    # BertLMPredictionHead ties decoder.bias to predictions.bias, so files hold either name or both.
    alias = state.pop("cls.predictions.decoder.bias", None)
    if alias is not None:
        state.setdefault("cls.predictions.bias", alias)
    # A tied decoder is the word-embedding matrix, which newer transformers leave out of the file.
    word = "bert.embeddings.word_embeddings.weight"
    if tie_word_embeddings and "cls.predictions.decoder.weight" not in state and word in state:
        state["cls.predictions.decoder.weight"] = state[word]

    targets = {f"bert.{name}": p for name, p in cell_bert.named_parameters()}
    targets.update({f"cls.predictions.transform.{name}": p for name, p in mlm_head.named_parameters()
                    if not name.startswith("decoder.")})
    targets["cls.predictions.decoder.weight"] = mlm_head.decoder.weight
    targets["cls.predictions.bias"] = mlm_head.decoder.bias
    missing = [k for k in targets if k not in state]
    unexpected = sorted(k for k in state if k not in targets and not k.startswith(_IGNORED_PREFIXES))
    if missing or unexpected:
        raise LangCellError(f"{source}: not a Geneformer BertForMaskedLM checkpoint of this shape: "
                            f"{len(missing)} missing {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}; "
                            "give a folder with bert.* and cls.predictions.* weights")
    vocab_rows = {"bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight", "cls.predictions.bias"}
    with torch.no_grad():
        for key, param in targets.items():
            tensor = state[key]
            expected = (param.shape[0] - 1, *param.shape[1:]) if key in vocab_rows else tuple(param.shape)
            if tuple(tensor.shape) != expected:
                raise LangCellError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model needs {expected}; "
                                    "the checkpoint's config.json does not describe its weights")
            if key in vocab_rows:
                param[:-1].copy_(tensor)
                # <cls> starts as the mean gene row: it lies among the inputs (and predictions) the
                # pretrained layers know, where a random row points anywhere; and it draws no random
                # numbers, so the rest of the model's random initialisation is the same either way.
                param[-1].copy_(tensor[FIRST_GENE_ID:].float().mean(dim=0))
            else:
                param.copy_(tensor)
    n_cell = sum(k.startswith("bert.") for k in targets)
    log.info("%s: loaded %d tensors (%d into the cell encoder, %d into the masked-gene head); <cls> (id %d) "
             "starts as the mean gene row", source, len(targets), n_cell, len(targets) - n_cell, cfg.vocab_size - 1)


def check_cell_checkpoint(cfg: CellEncoderConfig) -> tuple[Path, bool]:
    """(folder, tie_word_embeddings) of `cfg.init_from`, refused when missing or when its shape
    differs from the model yaml. Reads config.json only, so a run can check before it starts."""
    from transformers import BertConfig
    folder = resolve_pretrained(cfg.init_from, "model.cell.init_from", CELL_CHECKPOINT_FILES)
    source = _source(cfg, folder)
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type", "bert") != "bert":
        raise LangCellError(f"{source}: model_type is {raw['model_type']}, not bert; give a Geneformer checkpoint")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise LangCellError(f"{source}: position_embedding_type is {raw['position_embedding_type']}; "
                            "the cell encoder has absolute position embeddings")
    ckpt = BertConfig.from_json_file(str(folder / "config.json"))
    if ckpt.vocab_size + 1 != cfg.vocab_size:
        raise LangCellError(f"{source}: the checkpoint has {ckpt.vocab_size} tokens and model.cell.vocab_size is "
                            f"{cfg.vocab_size}; the cell vocabulary is the checkpoint's plus <cls>: set vocab_size "
                            f"to {ckpt.vocab_size + 1} and build the library with that vocabulary "
                            "(--vocab geneformer-v1 for Geneformer V1)")
    for name in SHAPE_FIELDS:
        ours, theirs = getattr(cfg, name), getattr(ckpt, name)
        if ours != theirs:
            raise LangCellError(f"{source}: model.cell.{name} is {ours!r} but the checkpoint's config.json says "
                                f"{theirs!r}; set model.cell.{name}: {theirs} in the model yaml")
    return folder, ckpt.tie_word_embeddings


def _source(cfg: CellEncoderConfig, folder: Path) -> str:
    return f"model.cell.init_from '{cfg.init_from}'" + ("" if str(folder) == cfg.init_from else f" ({folder})")
