"""Eval configuration (`configs/eval/*.yaml`), one dataclass per task plus the suite around them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from langcell.core.config import load_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "eval"
# `langcell annotate` without --top-k scores every candidate exactly up to AUTO_TOP_K_ABOVE of
# them; an ontology root can give thousands, where the matching head on all of them costs
# minutes per thousand cells, so above that it takes each cell's AUTO_TOP_K most similar.
AUTO_TOP_K_ABOVE = 200
AUTO_TOP_K = 10


@dataclass
class ZeroShotConfig:
    alpha: float = 0.1
    # null = LangCell's formula over every class (exact); k = matching head only for each cell's
    # k most similar classes, 0 elsewhere (faster, may change predictions: BENCHMARKS.md).
    top_k: int | None = None
    # Pick alpha on a stratified validation share of the cells and report on the rest.
    tune_alpha: bool = False
    val_fraction: float = 0.2
    batch_size: int = 32
    pair_batch: int = 256
    # Cell types held out of pre-training, reported separately; null = read the library manifest.
    novel_types: list[str] | None = None


@dataclass
class FewShotConfig:
    shots: list[int] = field(default_factory=lambda: [1, 5, 10])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 10
    lr: float = 1e-5
    batch_size: int = 12


@dataclass
class FinetuneConfig:
    test_size: float = 1 / 3
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 16
    # AdamW's weight decay and the share of steps with a linear warm-up (then linear decay to 0).
    weight_decay: float = 0.001
    warmup_ratio: float = 0.1
    # L-BFGS iterations of the linear probe that starts the head before fine-tuning (0 = a fresh
    # head), and its L2 penalty per unit of mean cross-entropy on standardised pooled states.
    probe_steps: int = 100
    probe_l2: float = 0.03


@dataclass
class RetrievalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])


@dataclass
class IntegrationConfig:
    knn: int = 15
    leiden_resolution: float = 1.0


@dataclass
class EvalConfig:
    """Everything one eval run needs; CLI flags override `model`, `data`, `out` and the keys."""
    model: str | None = None
    data: str | None = None
    out: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["zero-shot", "retrieval", "integration", "few-shot",
                                                       "finetune"])
    label_key: str = "cell_type"
    batch_key: str | None = "dataset_id"
    # LIB folder for type2text.json and the manifest (novel types); null = two levels above DATA.
    library: str | None = None
    # INGEST/ontology/terms.parquet; null = cellxgene-ontology-guide's CL.
    ontology_terms: str | None = None
    max_cells: int | None = None
    min_gene_overlap: float = 0.25
    seed: int = 0
    device: str = "cpu"
    # Text tokenizer (folder or HF id) instead of MODEL/tokenizer/; LangCell's release ships none
    # and defaults to PubMedBERT's.
    text_tokenizer: str | None = None
    # "umap" (umap-learn) or "pca" (fast, for smoke runs) for the embedding plots.
    embedding_plot: str = "umap"
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    few_shot: FewShotConfig = field(default_factory=FewShotConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    integration: IntegrationConfig = field(default_factory=IntegrationConfig)


TASKS = ("zero-shot", "few-shot", "finetune", "retrieval", "integration")


def load_eval_config(name_or_path: str | Path | None = None, overrides: dict | None = None) -> EvalConfig:
    """A config by path or by name in configs/eval/ (default: `default`)."""
    path = Path(name_or_path) if name_or_path else CONFIG_DIR / "default.yaml"
    if not path.exists() and (CONFIG_DIR / f"{name_or_path}.yaml").is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    return load_config(EvalConfig, path, overrides)
