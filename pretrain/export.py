"""Write and read a trained model in the published LangCell checkpoint layout.

    EXPORT/cell_bert/            HF BertModel.save_pretrained (loads with plain transformers)
    EXPORT/text_bert/            config.json (BertConfig + encoder_width) + model.safetensors
    EXPORT/cell_proj.bin         torch.save(nn.Linear(H_cell, 256).state_dict())
    EXPORT/text_proj.bin         torch.save(nn.Linear(H_text, 256).state_dict())
    EXPORT/ctm_head.bin          torch.save(nn.Linear(H_text, 2).state_dict())
    EXPORT/tokenizer/            the text tokenizer
    EXPORT/vocab/                token_dictionary.json, gene_median_dictionary.json
    EXPORT/langcell_config.json  format, text max length, cell and text pooling, zero-shot defaults

LangCell's own release has the first five (their text_bert as pytorch_model.bin, no token-type
table) but no tokenizer, vocab or config; `load_langcell` fills those from what the release
was trained with: PubMedBERT's tokenizer plus the [DEC]/[ENC] tokens they add, and the
Geneformer v1 vocabulary with `<cls>` appended.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from langcell.errors import LangCellError
from langcell.files import atomic_path, atomic_write_json, read_json
from pretrain.model import LangCellModel, TextBert

EXPORT_FORMAT = "langcell-export/1"
LANGCELL_TEXT_TOKENIZER = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext"
GENEFORMER_V1_VOCAB = Path(__file__).resolve().parent.parent / "build_sclibrary" / "reference" / "geneformer_v1"
CLS_TOKEN = "<cls>"


def save_langcell(model: LangCellModel, out: str | os.PathLike, *, vocab_dir: str | os.PathLike,
                  text_tokenizer=None, extra_config: dict | None = None) -> Path:
    """Write `model` to `out` in the LangCell layout; `out` appears only once complete.

    `vocab_dir` holds the gene vocabulary the cell encoder was trained with (LIB/vocab/).
    """
    out = Path(out)
    vocab_dir = Path(vocab_dir)
    tokenizer = text_tokenizer if text_tokenizer is not None else model.text_tokenizer
    if model.text_bert is None or tokenizer is None:
        raise LangCellError(f"{out}: the model has no text encoder or tokenizer to export; export a stage 2 run")
    token_dictionary = read_json(vocab_dir / "token_dictionary.json", "gene token dictionary")
    if len(token_dictionary) != model.cell_bert.config.vocab_size:
        raise LangCellError(f"{vocab_dir}/token_dictionary.json: {len(token_dictionary)} tokens but the cell "
                            f"encoder has {model.cell_bert.config.vocab_size} rows; pass the run's own vocab")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build the whole folder beside its final place and rename it once, so a crash never leaves
    # a half-written export under the final name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.cell_bert.save_pretrained(tmp / "cell_bert")
        model.text_bert.save_pretrained(tmp / "text_bert")
        for name in ("cell_proj", "text_proj", "ctm_head"):
            with atomic_path(tmp / f"{name}.bin") as path:
                torch.save({k: v.detach().cpu() for k, v in getattr(model, name).state_dict().items()}, path)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "vocab").mkdir()
        for name in ("token_dictionary.json", "gene_median_dictionary.json"):
            if (vocab_dir / name).is_file():
                shutil.copyfile(vocab_dir / name, tmp / "vocab" / name)
        atomic_write_json(tmp / "langcell_config.json", {
            "format": EXPORT_FORMAT,
            "proj_dim": model.cell_proj.out_features,
            "cell_vocab_size": model.cell_bert.config.vocab_size,
            "text_max_length": model.text_max_length,
            "cell_pooling": model.cell_pooling,
            "text_pooling": model.text_pooling,
            "zero_shot": {"temperature": 0.05, "alpha": 0.1},
            **(extra_config or {}),
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _linear(path: Path, what: str) -> nn.Linear:
    if not path.is_file():
        raise LangCellError(f"{path}: {what} missing; the folder is not a complete LangCell export")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # LangCell saved the projections from a Pooler wrapper in places; accept "proj.weight" too.
    state = {k.split(".")[-1]: v for k, v in state.items()}
    if set(state) != {"weight", "bias"}:
        raise LangCellError(f"{path}: expected a Linear state dict (weight, bias), got keys {sorted(state)}")
    out_f, in_f = state["weight"].shape
    layer = nn.Linear(in_f, out_f)
    layer.load_state_dict(state)
    return layer


def _load_text_tokenizer(path: Path, text_vocab_size: int):
    from transformers import AutoTokenizer
    if (path / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(LANGCELL_TEXT_TOKENIZER)
    except Exception:  # hub errors vary; all mean "not in the local cache"
        raise LangCellError(f"{path}: no tokenizer/ folder and {LANGCELL_TEXT_TOKENIZER} is not available "
                            "offline; save that tokenizer into EXPORT/tokenizer/") from None
    # LangCell added [DEC] and [ENC] to PubMedBERT's vocabulary before training; add them when the
    # text encoder has their two rows (text encoding itself never emits them).
    if text_vocab_size == len(tokenizer) + 2:
        tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != text_vocab_size:
        raise LangCellError(f"{path}: tokenizer has {len(tokenizer)} tokens but text_bert has {text_vocab_size}; "
                            "save the matching tokenizer into EXPORT/tokenizer/")
    return tokenizer


def _load_token_dictionary(path: Path, vocab_size: int) -> dict:
    if (path / "vocab" / "token_dictionary.json").is_file():
        token_dictionary = read_json(path / "vocab" / "token_dictionary.json", "gene token dictionary")
    else:
        token_dictionary = read_json(GENEFORMER_V1_VOCAB / "token_dictionary.json", "Geneformer v1 vocabulary")
        token_dictionary[CLS_TOKEN] = len(token_dictionary)
    if len(token_dictionary) != vocab_size:
        raise LangCellError(f"{path}: gene vocabulary has {len(token_dictionary)} tokens but cell_bert has "
                            f"{vocab_size} rows; put the training vocabulary into EXPORT/vocab/")
    return token_dictionary


@contextlib.contextmanager
def _no_progress_bars():
    """transformers draws a bar per local load; on stderr it would precede (and break up) the one
    line a command prints when the user's data is then refused."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_langcell(path: str | os.PathLike, device: str | torch.device = "cpu") -> LangCellModel:
    """Our exports and LangCell's published checkpoint, as a LangCellModel in eval mode."""
    from transformers import BertModel
    path = Path(path)
    if not (path / "cell_bert" / "config.json").is_file():
        raise LangCellError(f"{path}: no cell_bert/config.json; give a folder written by `langcell export` "
                            "or LangCell's released checkpoint")
    config = {}
    if (path / "langcell_config.json").is_file():
        config = read_json(path / "langcell_config.json", "export config")
        if config.get("format") != EXPORT_FORMAT:
            raise LangCellError(f"{path}/langcell_config.json: format {config.get('format')!r}, expected "
                                f"{EXPORT_FORMAT!r}; re-export with this version")
    with _no_progress_bars():
        cell_bert = BertModel.from_pretrained(str(path / "cell_bert"), attn_implementation="sdpa",
                                              add_pooling_layer=False)
        text_bert = TextBert.from_pretrained(path / "text_bert")
    if text_bert.config.encoder_width != cell_bert.config.hidden_size:
        raise LangCellError(f"{path}/text_bert/config.json: encoder_width {text_bert.config.encoder_width} != "
                            f"cell hidden size {cell_bert.config.hidden_size}; the two encoders do not belong together")
    model = LangCellModel(
        cell_bert=cell_bert,
        cell_proj=_linear(path / "cell_proj.bin", "cell projection"),
        text_bert=text_bert,
        text_proj=_linear(path / "text_proj.bin", "text projection"),
        ctm_head=_linear(path / "ctm_head.bin", "cell-text matching head"),
        text_tokenizer=_load_text_tokenizer(path, text_bert.config.vocab_size),
        token_dictionary=_load_token_dictionary(path, cell_bert.config.vocab_size),
        text_max_length=int(config.get("text_max_length", 512)),
        # LangCell's release has no config: it pools the <cls> states of both encoders.
        cell_pooling=config.get("cell_pooling", "cls"),
        text_pooling=config.get("text_pooling", "cls"),
    )
    return model.to(device).eval()

