"""Model FLOPs of a training step, counted from the model's shapes and the batch's real lengths.

MFU is useful work over peak: padding is not work, so every count here uses each sequence's
real length. Counted from the config, not from parameter tensors, so a ZeRO-3 run (whose
parameters are partitioned to size 0 outside their forward) reports the same as ZeRO-1.

Matrix products only (2 FLOPs per multiply-add), as PaLM's and Megatron's MFU count: per layer
the Q/K/V/output projections, the feed-forward pair, and attention scores and their weighted sum
(2·2·Lq·Lk·h, the part that a 6·N rule leaves out, as large as the rest at 2,048 tokens).
Backward costs twice the forward, so training is 3x forward.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAIN_FACTOR = 3  # forward + backward (2x forward: gradients of inputs and of weights)


def cross_kv_flops(kv_len: int, kv_width: int, hidden: int) -> int:
    """Keys and values of `kv_len` cell states of width `kv_width` for one cross-attention layer."""
    return 2 * kv_len * kv_width * hidden * 2


def layer_forward_flops(lq: int, hidden: int, intermediate: int, kv_len: int | None = None,
                        kv_width: int | None = None, kv_projections: bool = True) -> int:
    """Forward FLOPs of one BERT layer over a sequence of `lq` tokens; with `kv_len`, the layer
    also cross-attends to `kv_len` states of width `kv_width` (BLIP's multimodal text layer),
    projecting those states to keys and values itself unless `kv_projections` is False (the
    matching pass projects each cell once for all its pairs)."""
    flops = 2 * lq * hidden * hidden * 4          # self-attention Q, K, V, output
    flops += 2 * 2 * lq * lq * hidden             # scores Q·K^T and their weighted sum of V
    flops += 2 * 2 * lq * hidden * intermediate   # feed-forward up and down
    if kv_len is not None:
        flops += 2 * lq * hidden * hidden * 2     # cross-attention Q and output on the text
        flops += cross_kv_flops(kv_len, kv_width, hidden) if kv_projections else 0
        flops += 2 * 2 * lq * kv_len * hidden
    return flops


@dataclass
class StepShapes:
    """What a step processed: real lengths of its cells and texts, and what the objectives ran."""
    cell_lengths: list[int]
    cell_views: int = 1                 # dropout views per cell (2 with the SimCSE objective)
    masked_tokens: int = 0              # positions the masked-gene head scores (0: objective off)
    text_lengths: list[int] | None = None   # texts encoded once (stage 2)
    match_pairs: list[tuple[int, int]] | None = None  # (text length, cell length) per matching pair
    match_cells: list[int] | None = None  # lengths of the cells the pairs share (keys and values once each)


def step_flops(cell, text, proj: int, shapes: StepShapes) -> int:
    """Training FLOPs of one micro-batch of the LangCell model: `cell` and `text` are the two
    encoders' BERT configs (the text one may be None for stage 1), `proj` the shared width."""
    fwd = 0
    for length in shapes.cell_lengths:
        fwd += shapes.cell_views * cell.num_hidden_layers * layer_forward_flops(
            length, cell.hidden_size, cell.intermediate_size)
        fwd += 2 * cell.hidden_size * proj
    # The masked-gene head: a dense transform and the decoder over every gene of the vocabulary.
    fwd += shapes.cell_views * shapes.masked_tokens * 2 * cell.hidden_size * (cell.hidden_size + cell.vocab_size)
    if text is None:
        return TRAIN_FACTOR * fwd
    text_width, text_inter = text.hidden_size, text.intermediate_size
    for length in shapes.text_lengths or []:
        fwd += text.num_hidden_layers * layer_forward_flops(length, text_width, text_inter) + 2 * text_width * proj
    for lt, lc in shapes.match_pairs or []:
        fwd += text.num_hidden_layers * layer_forward_flops(lt, text_width, text_inter, lc, cell.hidden_size,
                                                            kv_projections=False)
        fwd += 2 * text_width * 2
    for lc in shapes.match_cells or []:
        fwd += text.num_hidden_layers * cross_kv_flops(lc, cell.hidden_size, text_width)
    return TRAIN_FACTOR * fwd


def batch_shapes(batch: dict, stage: int, weights, n_masked: int) -> StepShapes:
    """The shapes of a collated batch (host tensors, before they move to the device) as the
    stage's objectives use them; matching counts BLIP's three pairs per cell with a text (its
    own text, one hard negative text, and as the negative cell of one other text) and the keys
    and values of every cell of the batch once (the pass projects them all); `n_masked`
    is the number of genes the masked-gene objective picks (`losses.masked_gene_count`)."""
    lengths = batch["cell_mask"].sum(1).tolist()
    shapes = StepShapes(cell_lengths=lengths, cell_views=2 if weights.cell_cell else 1,
                        masked_tokens=n_masked if weights.mlm else 0)
    if stage == 2 and (weights.cell_text or weights.ctm):
        text_lengths = batch["text_mask"].sum(1).tolist()
        shapes.text_lengths = text_lengths
        if weights.ctm:
            own = [(text_lengths[t], length) for t, length, has in
                   zip(batch["text_index"].tolist(), lengths, batch["has_text"].tolist()) if has]
            shapes.match_pairs = own * 3
            shapes.match_cells = lengths
    return shapes
