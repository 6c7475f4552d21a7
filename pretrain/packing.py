"""Packed cells: the cell encoder runs on the real tokens of a batch only, not on its padding.

A padded batch of cells [B, L] becomes one row of its T real tokens back to back [1, T], with
positions restarting at 0 for every cell; every linear layer then works on T tokens instead of
B x L, and attention runs once per cell over that cell's tokens (`PACKED_ATTENTION`, registered
with transformers' attention interface): one SDPA call per cell without a mask, which is the
fused flash kernel on a GPU and pays nothing for padding anywhere. The hidden states come back
in the padded layout, so pooling, the masked-gene head and the matching head read them as before.

Cell lengths come from the host (the collate knows them), so packing never waits for the device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_ATTENTION = "langcell_packed"


@dataclass
class PackedCells:
    input_ids: torch.Tensor      # [1, T] the real tokens of every cell, back to back
    position_ids: torch.Tensor   # [1, T] each token's position within its cell
    offsets: list[int]           # [B + 1] where each cell starts in the packed row (host)
    flat_index: torch.Tensor     # [T] each packed token's place in the padded [B * L] layout
    shape: tuple[int, int]       # (B, L) of the padded batch


def pack_cells(input_ids: torch.Tensor, lengths: list[int]) -> PackedCells:
    """Pack a right-padded [B, L] batch whose cell b has `lengths[b]` real tokens."""
    b, length = input_ids.shape
    if len(lengths) != b or max(lengths, default=0) > length or min(lengths, default=1) < 1:
        raise ValueError(f"cell lengths {lengths} do not fit a batch of shape {tuple(input_ids.shape)}")
    lens = torch.tensor(lengths)
    offsets = list(itertools.accumulate(lengths, initial=0))
    starts = torch.repeat_interleave(torch.tensor(offsets[:-1]), lens)
    within = torch.arange(offsets[-1]) - starts
    rows = torch.repeat_interleave(torch.arange(b), lens)
    flat_index = (rows * length + within).to(input_ids.device, non_blocking=True)
    return PackedCells(input_ids=input_ids.reshape(-1)[flat_index][None],
                       position_ids=within.to(input_ids.device, non_blocking=True)[None],
                       offsets=offsets, flat_index=flat_index, shape=(b, length))


def unpack(hidden: torch.Tensor, packed: PackedCells) -> torch.Tensor:
    """[1, T, H] packed states -> [B, L, H], zeros at the padding."""
    b, length = packed.shape
    out = hidden.new_zeros(b * length, hidden.shape[-1])
    return out.index_copy(0, packed.flat_index, hidden[0]).view(b, length, -1)


def right_padded_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """Each cell's real tokens when every row is real tokens then padding (as every collate here
    writes them) and none is empty; else None. Reads the device: for inference, not training."""
    lengths = attention_mask.sum(1)
    prefix = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None] < lengths[:, None]
    if not bool(((prefix == attention_mask.bool()).all() & (lengths > 0).all()).item()):
        return None
    return lengths.tolist()


def encode_packed(cell_bert, input_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Last hidden states [B, L, H] of a padded batch, computed on its real tokens only."""
    if cell_bert.config._attn_implementation != PACKED_ATTENTION:
        raise ValueError(f"the cell encoder uses {cell_bert.config._attn_implementation!r} attention; packed "
                         f"cells need {PACKED_ATTENTION!r} (build it with pretrain.model.build_cell_encoder)")
    packed = pack_cells(input_ids, lengths)
    hidden = cell_bert(input_ids=packed.input_ids, position_ids=packed.position_ids,
                       cell_offsets=packed.offsets).last_hidden_state
    return unpack(hidden, packed)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     cell_offsets: list[int] | None = None, **kwargs):
    """Attention within each cell of a packed row ([1, heads, T, d] in, [1, T, heads, d] out);
    a padded batch (no `cell_offsets`) goes to transformers' SDPA path unchanged."""
    if cell_offsets is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # split (not slicing): its backward concatenates the cells' gradients once instead of
    # adding one full-size zero-padded gradient per cell.
    sizes = [e - s for s, e in zip(cell_offsets[:-1], cell_offsets[1:])]
    parts = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
             for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
# Padded calls build their masks as the SDPA path does.
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
