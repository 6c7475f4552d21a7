"""Write and read a trained model in the published LangCell checkpoint layout.

    EXPORT/cell_bert/            HF BertModel.save_pretrained (loads with plain transformers)
    EXPORT/text_bert/            config.json (BertConfig + encoder_width) + model.safetensors, with
                                 exactly the tensors of LangCell's text class (pretrain/langcell_layout.py)
    EXPORT/cell_proj.bin         torch.save(nn.Linear(H_cell, 256).state_dict())
    EXPORT/text_proj.bin         torch.save(nn.Linear(H_text, 256).state_dict())
    EXPORT/ctm_head.bin          torch.save(nn.Linear(H_text, 2).state_dict())
    EXPORT/tokenizer/            the text tokenizer with [DEC]/[ENC], and the vocab.txt BertTokenizer reads
    EXPORT/vocab/                token_dictionary.json, gene_median_dictionary.json
    EXPORT/langcell_config.json  format, text max length, cell and text pooling, whether LangCell's
                                 code reads the export correctly, class prompt, zero-shot defaults

LangCell's own release has the first five (their text_bert as pytorch_model.bin, no token-type
table) but no tokenizer, vocab or config; `load_langcell` fills those from what the release
was trained with: PubMedBERT's tokenizer plus the [DEC]/[ENC] tokens they add (or the tokenizer
given as `text_tokenizer`), the Geneformer v1 vocabulary with `<cls>` appended, `<cls>` pooling
and LangCell's class prompt.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from langcell.core.errors import LangCellError
from langcell.core.files import atomic_path, atomic_write_json, read_json
from langcell.pretrain.langcell_layout import (CELL_UNUSED_KEYS, load_strict, load_text_tokenizer, save_bert_tokenizer,
                                      text_state_for_langcell, with_langcell_tokens)
from langcell.pretrain.model import LangCellModel, TextBert
from langcell.pretrain.warm_start import read_state_dict

EXPORT_FORMAT = "langcell-export/1"
LANGCELL_TEXT_TOKENIZER = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext"
GENEFORMER_V1_VOCAB = Path(__file__).resolve().parent.parent / "build_sclibrary" / "reference" / "geneformer_v1"
CLS_TOKEN = "<cls>"
# The class text of LangCell's few-shot and zero-shot code; its release records no other.
LANGCELL_CLASS_PROMPT = {"template": "cell type: {label}. {definition}; ",
                         "template_no_definition": "cell type: {label}. ", "definition_as_sentence": False}


def langcell_incompatibility(model: LangCellModel) -> str | None:
    """Why LangCell's own code would compute other numbers from this model's export, or None."""
    pooled = [side for side, p in (("cell", model.cell_pooling), ("text", model.text_pooling)) if p != "cls"]
    if pooled:
        return (f"{' and '.join(pooled)} embeddings are mean-pooled; LangCell's code pools the first token, "
                "so it would read this export with other embeddings")
    return None


def _write_text_bert(text_bert: TextBert, state: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = text_bert.config.to_dict()
    config.pop("use_token_type_embeddings", None)
    config.update(architectures=["BertModel"], add_cross_attention=True, is_decoder=False,
                  vocab_size=state["embeddings.word_embeddings.weight"].shape[0])
    atomic_write_json(folder / "config.json", config)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})


def save_langcell(model: LangCellModel, out: str | os.PathLike, *, vocab_dir: str | os.PathLike,
                  text_tokenizer=None, extra_config: dict | None = None, class_prompt: dict | None = None,
                  langcell_compatible: bool = False) -> Path:
    """Write `model` to `out` in the LangCell layout; `out` appears only once complete.

    `vocab_dir` holds the gene vocabulary the cell encoder was trained with (LIB/vocab/);
    `class_prompt` the cell-type text template of its training texts (see LANGCELL_CLASS_PROMPT;
    None = not known, and loading then assumes LangCell's).
    `langcell_compatible=True` refuses a model LangCell's code would read with other numbers.
    """
    out = Path(out)
    vocab_dir = Path(vocab_dir)
    tokenizer = text_tokenizer if text_tokenizer is not None else model.text_tokenizer
    if model.text_bert is None or tokenizer is None:
        raise LangCellError(f"{out}: the model has no text encoder or tokenizer to export; export a stage 2 run")
    incompatible = langcell_incompatibility(model)
    if incompatible and langcell_compatible:
        raise LangCellError(f"{out}: cannot write a LangCell-compatible export: {incompatible}; train with "
                            "model.cell.pooling and model.text.pooling 'cls', or export without --langcell-compatible")
    token_dictionary = read_json(vocab_dir / "token_dictionary.json", "gene token dictionary")
    if len(token_dictionary) != model.cell_bert.config.vocab_size:
        raise LangCellError(f"{vocab_dir}/token_dictionary.json: {len(token_dictionary)} tokens but the cell "
                            f"encoder has {model.cell_bert.config.vocab_size} rows; pass the run's own vocab")
    tokenizer, text_state = with_langcell_tokens(tokenizer, text_state_for_langcell(model.text_bert))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build the whole folder beside its final place and rename it once, so a crash never leaves
    # a half-written export under the final name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.cell_bert.save_pretrained(tmp / "cell_bert")
        _write_text_bert(model.text_bert, text_state, tmp / "text_bert")
        for name in ("cell_proj", "text_proj", "ctm_head"):
            with atomic_path(tmp / f"{name}.bin") as path:
                torch.save({k: v.detach().cpu() for k, v in getattr(model, name).state_dict().items()}, path)
        save_bert_tokenizer(tokenizer, tmp / "tokenizer")
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
            "langcell_compatible": incompatible is None,
            "langcell_incompatible_reason": incompatible,
            "class_prompt": class_prompt,
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


def _linear(path: Path, what: str, shape: tuple[int | None, int]) -> nn.Linear:
    """A head saved as a plain nn.Linear state dict, of shape [out, in] (out None = any)."""
    if not path.is_file():
        raise LangCellError(f"{path}: {what} missing; the folder is not a complete LangCell export")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "weight" not in state:
        raise LangCellError(f"{path}: tensor 'weight' missing; expected a Linear state dict (weight, bias)")
    out_f = shape[0] if shape[0] is not None else state["weight"].shape[0]
    layer = nn.Linear(shape[1], out_f)
    load_strict(layer, state, str(path))
    return layer


def _load_cell_bert(folder: Path):
    from transformers import BertConfig, BertModel

    config = BertConfig.from_json_file(str(folder / "config.json"))
    from langcell.pretrain.packing import PACKED_ATTENTION

    # Packed attention: inference on each cell's real tokens only (LangCellModel.cell_states).
    model = BertModel._from_config(config, attn_implementation=PACKED_ATTENTION, add_pooling_layer=False)
    name = "model.safetensors" if (folder / "model.safetensors").is_file() else "pytorch_model.bin"
    state = {k[5:] if k.startswith("bert.") else k: v for k, v in read_state_dict(folder).items()}
    load_strict(model, state, str(folder / name), CELL_UNUSED_KEYS)
    return model


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


def load_langcell(path: str | os.PathLike, device: str | torch.device = "cpu",
                  text_tokenizer: str | None = None) -> LangCellModel:
    """Our exports and LangCell's published checkpoint, as a LangCellModel in eval mode.

    `text_tokenizer` (a folder or an HF id) overrides EXPORT/tokenizer/; LangCell's release has
    none, so it defaults to PubMedBERT's. `model.class_prompt` is the template class texts take.
    """
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
        cell_bert = _load_cell_bert(path / "cell_bert")
        text_bert = TextBert.from_pretrained(path / "text_bert")
    cell_width, text_width = cell_bert.config.hidden_size, text_bert.config.hidden_size
    if text_bert.config.encoder_width != cell_width:
        raise LangCellError(f"{path}/text_bert/config.json: encoder_width {text_bert.config.encoder_width} != "
                            f"cell hidden size {cell_width}; the two encoders do not belong together")
    cell_proj = _linear(path / "cell_proj.bin", "cell projection", (None, cell_width))
    if text_tokenizer is None:
        text_tokenizer = str(path / "tokenizer") if (path / "tokenizer").is_dir() else LANGCELL_TEXT_TOKENIZER
    model = LangCellModel(
        cell_bert=cell_bert,
        cell_proj=cell_proj,
        text_bert=text_bert,
        text_proj=_linear(path / "text_proj.bin", "text projection", (cell_proj.out_features, text_width)),
        ctm_head=_linear(path / "ctm_head.bin", "cell-text matching head", (2, text_width)),
        text_tokenizer=load_text_tokenizer(text_tokenizer, text_bert.config.vocab_size, str(path)),
        token_dictionary=_load_token_dictionary(path, cell_bert.config.vocab_size),
        text_max_length=int(config.get("text_max_length", 512)),
        # LangCell's release has no config: it pools the <cls> states of both encoders.
        cell_pooling=config.get("cell_pooling", "cls"),
        text_pooling=config.get("text_pooling", "cls"),
        class_prompt=dict(config.get("class_prompt") or LANGCELL_CLASS_PROMPT),
    )
    return model.to(device).eval()
