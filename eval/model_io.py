"""Loading an exported model for evaluation, with the gene vocabulary its cells must use."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from langcell.core.errors import LangCellError

# What LangCell's published layout needs at minimum; our exports add tokenizer/, vocab/ and
# langcell_config.json, which the pretrain loader handles (and falls back on for LangCell's).
REQUIRED_MODULES = ("cell_bert", "text_bert", "cell_proj.bin", "text_proj.bin", "ctm_head.bin")
REFERENCE_VOCAB = Path(__file__).resolve().parent.parent / "build_sclibrary" / "reference" / "geneformer_v1"


@dataclass
class Vocab:
    token_dictionary: dict
    gene_medians: dict

    @property
    def pad_id(self) -> int:
        return int(self.token_dictionary.get("<pad>", 0))


def check_export(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise LangCellError(f"{path}: model folder not found; pass the folder `langcell export` wrote")
    missing = [m for m in REQUIRED_MODULES if not (path / m).exists()]
    if missing:
        raise LangCellError(f"{path}: model folder lacks {', '.join(missing)}; re-export it with "
                            "`langcell export --run RUN --out EXPORT`")
    return path


def load_vocab(path: Path, token_dictionary: dict | None) -> Vocab:
    medians_file = path / "vocab" / "gene_median_dictionary.json"
    if not medians_file.is_file():
        # LangCell's published checkpoint ships no vocabulary: it uses Geneformer v1's.
        medians_file = REFERENCE_VOCAB / "gene_median_dictionary.json"
    medians = json.loads(medians_file.read_text())
    if token_dictionary is None:
        token_dictionary = json.loads((REFERENCE_VOCAB / "token_dictionary.json").read_text())
    return Vocab(dict(token_dictionary), medians)


def cell_max_length(model, default: int = 2048) -> int:
    """Tokens per cell the cell encoder accepts (its position table), at most LangCell's 2,048."""
    config = getattr(getattr(model, "cell_bert", None), "config", None)
    return int(min(default, getattr(config, "max_position_embeddings", default)))


def load_model(path: str | Path, device: str = "cpu", text_tokenizer: str | None = None):
    """(LangCellModel in eval mode, Vocab) for an export folder; a missing module is a LangCellError.
    `text_tokenizer` (folder or HF id) replaces the export's tokenizer (LangCell's release has none)."""
    from langcell.pretrain.export import load_langcell

    path = check_export(path)
    model = load_langcell(str(path), device=device, text_tokenizer=text_tokenizer)
    model.eval()
    return model, load_vocab(path, getattr(model, "token_dictionary", None))
