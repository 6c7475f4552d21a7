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


def resolve_model(spec: str | Path) -> Path:
    """An export folder for `spec`: a local folder, or an HF id `owner/name[@revision][/subfolder]`
    fetched whole (from the cache only under HF_HUB_OFFLINE)."""
    folder = Path(spec).expanduser()
    if folder.is_dir() or str(spec).startswith((".", "/", "~")) or str(spec).count("/") == 0:
        return check_export(folder)
    from langcell.pretrain.warm_start import download_snapshot

    return check_export(download_snapshot(str(spec), "model", ("*",)))


class LoadedModel:
    """A model with its gene vocabulary, for notebooks: `langcell.load_model(...)` returns one.

    Cells go through the same reader (`open_user_anndata`: symbols or Ensembl ids, raw counts,
    an AnnData in memory, backed, or an .h5ad path) and the same tokenizer as `langcell tokenize`
    and `langcell annotate`.
    """

    def __init__(self, net, vocab: Vocab, source: str):
        self.net, self.vocab, self.source = net, vocab, source

    def __repr__(self) -> str:
        return f"LoadedModel({self.source!r}, cell_pooling={self.net.cell_pooling!r})"

    @property
    def device(self):
        return next(self.net.parameters()).device

    def to(self, device) -> "LoadedModel":
        self.net.to(device)
        return self

    def tokenizer(self):
        from langcell.eval.data import make_tokenizer

        return make_tokenizer(self.vocab, cell_max_length(self.net))

    def cell_chunks(self, user, chunk_size: int, batch_size: int, desc: str):
        """(start, stop, batches) for each `chunk_size` rows of a `UserAnnData`, `batches` yielding
        (offset in the chunk, input_ids, attention_mask) of at most `batch_size` cells: how every
        in-process consumer of a user's cells (embed_cells, annotate) reads and tokenizes them."""
        from tqdm import tqdm

        from langcell.eval.scoring import pad_cells

        tokenizer, n_counts = self.tokenizer(), user.n_counts

        def batches(seqs, bar):
            for b in range(0, len(seqs), batch_size):
                ids, mask = pad_cells(seqs[b:b + batch_size], self.vocab.pad_id)
                yield b, ids, mask
                bar.update(len(ids))

        with tqdm(total=user.n_obs, desc=desc, unit="cell") as bar:
            for start in range(0, user.n_obs, chunk_size):
                stop = min(user.n_obs, start + chunk_size)
                seqs = tokenizer.tokenize_csr(user.rows(start, stop), user.genes.gene_ids,
                                              None if n_counts is None else n_counts[start:stop])
                yield start, stop, batches(seqs, bar)

    def embed_cells(self, adata, batch_size: int = 32, device=None, *, chunk_size: int = 4096,
                    layer: str | None = None, gene_column: str | None = None,
                    min_gene_match: float = 0.25):
        """Cell embeddings (numpy float32, cells x projection width, L2-normalised), one row per
        cell of `adata` in its order. `device` moves the model there first."""
        import numpy as np
        import torch

        from langcell.build_sclibrary.user_anndata import open_user_anndata

        if device is not None:
            self.to(device)
        out = []
        with open_user_anndata(adata, self.vocab.token_dictionary, layer=layer, gene_column=gene_column,
                               min_gene_match=min_gene_match) as user, torch.no_grad():
            for _, _, batches in self.cell_chunks(user, chunk_size, batch_size, "embed"):
                for _, ids, mask in batches:
                    embeds, _ = self.net.encode_cells(ids.to(self.device), mask.to(self.device))
                    out.append(embeds.float().cpu().numpy())
        return np.concatenate(out)

    def embed_texts(self, texts: list[str], batch_size: int = 64):
        """Text embeddings (numpy float32, texts x projection width, L2-normalised)."""
        import numpy as np
        import torch

        from langcell.eval.scoring import tokenize_texts

        if isinstance(texts, str) or not len(texts):
            raise LangCellError("embed_texts: pass a non-empty list of strings")
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                ids, mask = tokenize_texts(self.net, list(texts[start:start + batch_size]))
                out.append(self.net.encode_texts(ids, mask).float().cpu().numpy())
        return np.concatenate(out)


def open_model(path_or_id: str | Path, device: str = "cpu", text_tokenizer: str | None = None) -> LoadedModel:
    """`load_model` as one object: an export folder of ours, LangCell's released checkpoint
    (`text_tokenizer` then names its tokenizer, default PubMedBERT's), or an HF id of either."""
    path = resolve_model(path_or_id)
    net, vocab = load_model(path, device, text_tokenizer)
    return LoadedModel(net, vocab, str(path_or_id))
