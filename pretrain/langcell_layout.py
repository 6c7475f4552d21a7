"""LangCell's release layout, tensor by tensor: what its classes define, strict loading against
that, and our text encoder and tokenizer converted to what LangCell's code reads.

LangCell (commit 69e41ef, transformers 4.39) builds `cell_bert` as `BertModel` and `text_bert`
as its BLIP-style `BertModel(add_pooling_layer=True)` whose embeddings are word + position only.
Both classes define tensors that LangCell never reads when it computes embeddings or matching
scores; those are the only keys a file may have or lack beyond ours (`*_UNUSED_KEYS`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from langcell.core.errors import LangCellError

# The cell encoder's pooler: LangCell's BertModel has one, its release has none, nothing reads
# it (cell embeddings come from the <cls> state). Position/token-type ids are buffers.
CELL_UNUSED_KEYS = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids",
                    "embeddings.token_type_ids")
# The text encoder's pooler is trained by nothing and read by nothing (text embeddings and the
# matching head take the first token's last hidden state); position_ids is a buffer.
TEXT_UNUSED_KEYS = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")
# LangCell adds these to PubMedBERT's tokenizer before building the text encoder.
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"


def load_strict(module: nn.Module, state: dict, source: str, unused_keys=()) -> None:
    """Load every tensor of `module` from `state`; any missing, unexpected or mis-shaped tensor
    (other than `unused_keys`) is a one-line LangCellError naming `source` and the key."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k not in unused_keys or k in own}
    for key in own:
        if key not in state and key not in unused_keys:
            raise LangCellError(f"{source}: tensor '{key}' missing; the file is not a complete checkpoint of this "
                                "model (re-export it, or pass LangCell's released folder unchanged)")
    for key, value in state.items():
        if key not in own:
            raise LangCellError(f"{source}: unexpected tensor '{key}'; LangCell's classes do not define it "
                                "and loading it would be silently ignored, so remove it or re-export")
        if tuple(value.shape) != tuple(own[key].shape):
            raise LangCellError(f"{source}: tensor '{key}' has shape {list(value.shape)} but the config "
                                f"gives {list(own[key].shape)}; the weights and config.json do not belong together")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def text_state_for_langcell(text_bert) -> dict[str, torch.Tensor]:
    """Our text encoder's tensors under exactly LangCell's text-class keys.

    A token-type table (HF BERTs have one; our texts always use type 0) is folded into the
    position table: LangCell's embeddings have none, and position + type-0 row is what ours adds.
    The pooler LangCell's class defines is written as identity weights: it is never read.
    """
    state = {k: v.detach().cpu().clone() for k, v in text_bert.state_dict().items()}
    token_types = state.pop("embeddings.token_type_embeddings.weight", None)
    if token_types is not None:
        state["embeddings.position_embeddings.weight"] += token_types[0]
    positions, hidden = state["embeddings.position_embeddings.weight"].shape
    state["embeddings.position_ids"] = torch.arange(positions, dtype=torch.long)[None]
    state["pooler.dense.weight"] = torch.eye(hidden)
    state["pooler.dense.bias"] = torch.zeros(hidden)
    return state


def with_langcell_tokens(tokenizer, text_state: dict) -> tuple[object, dict]:
    """(tokenizer with [DEC]/[ENC], text state with their rows): LangCell's notebooks add both
    tokens to the tokenizer, so the word table must have their rows for ids to line up. The new
    rows are the mean word row; our scoring never emits either token."""
    import copy

    vocab = tokenizer.get_vocab()
    if DEC_TOKEN in vocab and ENC_TOKEN in vocab:
        return tokenizer, text_state
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN]})
    words = text_state["embeddings.word_embeddings.weight"]
    extra = len(tokenizer) - words.shape[0]
    if extra < 0:
        raise LangCellError(f"text tokenizer: {len(tokenizer)} tokens but the text encoder has {words.shape[0]} "
                            "rows; export with the tokenizer the run was trained with")
    text_state = dict(text_state)
    text_state["embeddings.word_embeddings.weight"] = torch.cat([words, words.mean(0, keepdim=True).expand(extra, -1)])
    return tokenizer, text_state


def save_bert_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer as transformers saves it, plus the files transformers 4.x's `BertTokenizer`
    reads (LangCell's): vocab.txt in id order, added_tokens.json and special_tokens_map.json."""
    tokenizer.save_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    added = {DEC_TOKEN: vocab[DEC_TOKEN], ENC_TOKEN: vocab[ENC_TOKEN]}
    base = sorted((i, t) for t, i in vocab.items() if t not in added)
    if [i for i, _ in base] != list(range(len(base))) or min(added.values()) != len(base):
        raise LangCellError(f"{folder}: the text tokenizer's ids are not a WordPiece vocabulary followed by "
                            f"{DEC_TOKEN}/{ENC_TOKEN}; train with a BERT tokenizer")
    (folder / "vocab.txt").write_text("".join(t + "\n" for _, t in base))
    (folder / "added_tokens.json").write_text(json.dumps(added))
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]", "bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.update(special, tokenizer_class="BertTokenizer",
                  added_tokens_decoder={str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                 "normalized": False, "single_word": False}
                                        for t, i in added.items()})
    config_path.write_text(json.dumps(config, indent=1))


def load_text_tokenizer(source: str, text_vocab_size: int, where: str):
    """A folder (a saved tokenizer, or just a vocab.txt) or an HF id, with [DEC]/[ENC] added as
    LangCell adds them when the text encoder has their two rows."""
    from transformers import AutoTokenizer, BertTokenizer

    folder = Path(source)
    try:
        if folder.is_dir() and not (folder / "tokenizer.json").is_file() and \
                not (folder / "tokenizer_config.json").is_file():
            if not (folder / "vocab.txt").is_file():
                raise LangCellError(f"{folder}: no tokenizer files (tokenizer.json or vocab.txt); pass "
                                    "--text-tokenizer with a tokenizer folder or an HF id")
            tokenizer = BertTokenizer.from_pretrained(str(folder))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
    except LangCellError:
        raise
    except Exception:  # hub and parsing errors vary; all mean "no usable tokenizer here"
        raise LangCellError(f"{where}: text tokenizer '{source}' is not available (offline and not cached, "
                            "or not a tokenizer); pass --text-tokenizer with a local folder holding its "
                            "vocab.txt") from None
    if text_vocab_size == len(tokenizer) + 2:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN]})
    if len(tokenizer) != text_vocab_size:
        raise LangCellError(f"{where}: text tokenizer '{source}' has {len(tokenizer)} tokens but text_bert has "
                            f"{text_vocab_size} rows; pass the tokenizer the model was trained with (--text-tokenizer)")
    return tokenizer
