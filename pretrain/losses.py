"""The four pre-training objectives, written small and explicit (open_clip/BLIP style).

Distributed contrast: every rank gathers the embeddings of all ranks *with* gradients
(torch.distributed.nn.functional.all_gather, whose backward sums the gradient slices back to
their owners) and scores its own rows against the global batch. Each rank's loss is the mean
over its rows; DeepSpeed averages gradients over ranks, so the update equals the one a single
process would make on the concatenated batch (tests check value and gradients).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

IGNORE = -100


def text_key(text: str) -> int:
    """A stable 63-bit id of a text: equal texts are positives of each other, never negatives."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    rank, world = _world()
    if world == 1:
        return x
    # The functional all-gather is differentiable: its backward reduce-scatters (sums) the
    # gradient of the gathered tensor back to the rank that owns each slice. (torch 2.13
    # deprecates torch.distributed.nn.all_gather in its favour.)
    from torch.distributed._functional_collectives import all_gather_single, wait_tensor
    return wait_tensor(all_gather_single(x.contiguous(), 0, torch.distributed.group.WORLD))


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def mask_genes(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_prob: float, vocab_size: int,
               cls_id: int, mask_id: int = 1, first_gene_id: int = 2):
    """BERT masking of gene tokens: pick `mask_prob` of them; 80% -> <mask>, 10% -> a random
    gene, 10% unchanged. `<cls>`, `<pad>` and `<mask>` are never picked. Uses the global RNG."""
    is_gene = attention_mask.bool() & (input_ids >= first_gene_id) & (input_ids != cls_id)
    picked = is_gene & (torch.rand(input_ids.shape, device=input_ids.device) < mask_prob)
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, device=input_ids.device)
    masked = input_ids.clone()
    masked[picked & (roll < 0.8)] = mask_id
    to_random = picked & (roll >= 0.8) & (roll < 0.9)
    # Random replacements are drawn from gene tokens only (ids 2 .. cls_id-1).
    random_genes = torch.randint(first_gene_id, cls_id, input_ids.shape, device=input_ids.device)
    masked[to_random] = random_genes[to_random]
    return masked, labels


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def cell_text_contrastive(cell_emb: torch.Tensor, text_emb: torch.Tensor, keys: torch.Tensor,
                          logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch with multi-positive targets (identical texts)."""
    all_cells = gather_with_grad(cell_emb)
    all_texts = gather_with_grad(text_emb)
    all_keys = gather_no_grad(keys)
    positives = (keys[:, None] == all_keys[None, :]).float()
    targets = positives / positives.sum(-1, keepdim=True)
    c2t = logit_scale * cell_emb @ all_texts.t()
    t2c = logit_scale * text_emb @ all_cells.t()
    return 0.5 * (_soft_cross_entropy(c2t, targets) + _soft_cross_entropy(t2c, targets))


def cell_cell_contrastive(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCSE: two dropout views of a cell are positives; every other cell in the global batch a negative."""
    rank, _ = _world()
    all_z2 = gather_with_grad(z2)
    all_z1 = gather_with_grad(z1)
    labels = torch.arange(z1.shape[0], device=z1.device) + rank * z1.shape[0]
    return 0.5 * (F.cross_entropy(z1 @ all_z2.t() / temperature, labels)
                  + F.cross_entropy(z2 @ all_z1.t() / temperature, labels))


def mlm_loss(mlm_head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    picked = labels != IGNORE
    if not bool(picked.any()):
        # Keep the graph connected (ZeRO needs every rank to backward through the head).
        return hidden.sum() * 0.0 + sum(p.sum() for p in mlm_head.parameters()) * 0.0
    return F.cross_entropy(mlm_head(hidden[picked]), labels[picked])


def sample_hard_negatives(sim: torch.Tensor, keys: torch.Tensor):
    """For each row of `sim` [B,B] (row i = query i, column j = candidate j) draw one negative
    column with probability softmax(sim) (BLIP's recipe); columns whose text equals the row's
    text are true matches and are never drawn. Returns (index [B], valid [B]): rows with no
    candidate (every text in the batch equal) are not valid and must be left out of the loss."""
    same = keys[:, None] == keys[None, :]
    # The small floor keeps every non-matching candidate drawable when softmax underflows.
    weights = (F.softmax(sim.float(), dim=1) + 1e-4).masked_fill(same, 0.0)
    valid = weights.sum(1) > 0
    weights[~valid] = 1.0
    return torch.multinomial(weights, 1).squeeze(1), valid


def cell_text_matching(model, cell_hidden, cell_mask, text_ids, text_mask, keys, sim_c2t):
    """Binary matching loss over positives, one hard negative text per cell and one hard
    negative cell per text, all drawn from the local batch's contrastive similarities."""
    with torch.no_grad():
        neg_text, valid_c = sample_hard_negatives(sim_c2t, keys)
        neg_cell, valid_t = sample_hard_negatives(sim_c2t.t(), keys)
    b = cell_hidden.shape[0]
    cells = torch.cat([cell_hidden, cell_hidden[valid_c], cell_hidden[neg_cell[valid_t]]])
    cmask = torch.cat([cell_mask, cell_mask[valid_c], cell_mask[neg_cell[valid_t]]])
    tids = torch.cat([text_ids, text_ids[neg_text[valid_c]], text_ids[valid_t]])
    tmask = torch.cat([text_mask, text_mask[neg_text[valid_c]], text_mask[valid_t]])
    logits = model.match_logits(cells, cmask, tids, tmask)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:b] = 1
    return F.cross_entropy(logits, labels)


def pretrain_losses(model, batch: dict, stage: int, weights, mask_prob: float,
                    simcse_temperature: float) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the stage's objectives and each objective's detached value."""
    ids, mask = batch["cell_ids"], batch["cell_mask"]
    vocab = model.cell_bert.config.vocab_size
    masked, labels = mask_genes(ids, mask, mask_prob, vocab, cls_id=vocab - 1)
    # Two passes over the same masked cells: the dropout difference makes SimCSE's two views,
    # and the masking doubles as augmentation, so no third (unmasked) pass is needed.
    h1 = model.cell_bert(input_ids=masked, attention_mask=mask).last_hidden_state
    h2 = model.cell_bert(input_ids=masked, attention_mask=mask).last_hidden_state
    z1 = F.normalize(model.cell_proj(model.pool_cells(h1, mask)), dim=-1)
    z2 = F.normalize(model.cell_proj(model.pool_cells(h2, mask)), dim=-1)
    parts = {
        "mlm": 0.5 * (mlm_loss(model.mlm_head, h1, labels) + mlm_loss(model.mlm_head, h2, labels)),
        "cell_cell": cell_cell_contrastive(z1, z2, simcse_temperature),
    }
    if stage == 2:
        text_emb = model.encode_texts(batch["text_ids"], batch["text_mask"])
        scale = model.logit_scale.clamp(max=4.6052).exp()  # temperature >= 0.01, as in CLIP
        parts["cell_text"] = cell_text_contrastive(z1, text_emb, batch["text_keys"], scale)
        parts["ctm"] = cell_text_matching(model, h1, mask, batch["text_ids"], batch["text_mask"],
                                          batch["text_keys"], (z1 @ text_emb.t()).detach())
    total = sum(getattr(weights, name) * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}
