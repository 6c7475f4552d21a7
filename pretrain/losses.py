"""The four pre-training objectives, written small and explicit (open_clip/BLIP style).

Distributed contrast: every rank gathers the embeddings of all ranks *with* gradients (the
functional all-gather where torch makes it differentiable, else a small autograd function over
the public collectives; either backward sums the gradient slices back to their owners) and scores
its own rows against the global batch. A rank's loss is the sum over its rows divided by the
global number of rows times the world size; DeepSpeed averages gradients over ranks, so the
update equals the one a single process would make on the concatenated batch (tests check value
and gradients).

Which texts describe which cells is decided by meaning, not by string: a text is true of a cell
when every identity aspect the text mentions has the same term in that cell's metadata
(`truth_matrix`). That relation is the multi-positive target of the cell-text loss, and no true
description is ever drawn as a matching negative. Cells without any identity text take part in
the cell-only objectives and never reach the text encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
# CLIP's cap on the learned inverse temperature (temperature >= 0.01).
MAX_LOG_SCALE = 4.6052


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _functional_gather_has_autograd() -> bool:
    """Whether torch's functional all-gather is differentiable. It is from torch 2.13 (and exists
    without autograd before it, where its gradient would silently stay on the local slice)."""
    try:
        import torch.distributed._functional_collectives  # noqa: F401  registers the ops
        return torch._C._dispatch_has_kernel_for_dispatch_key("_c10d_functional::all_gather_into_tensor",
                                                               "Autograd")
    except (ImportError, AttributeError, RuntimeError):
        return False


class _AllGather(torch.autograd.Function):
    """All-gather over the world group with the adjoint as backward, from public collectives only,
    so it runs on every torch `pyproject.toml` allows and every backend (gloo has no
    reduce-scatter on older torch: the backward sums the whole gradient and keeps its own slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        rows = grad.shape[0] // torch.distributed.get_world_size()
        return grad.narrow(0, torch.distributed.get_rank() * rows, rows)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    rank, world = _world()
    if world == 1:
        return x
    if not _functional_gather_has_autograd():
        return _AllGather.apply(x.contiguous())
    # The functional all-gather's backward reduce-scatters (sums) the gradient of the gathered
    # tensor back to the rank that owns each slice. (torch 2.13 deprecates
    # torch.distributed.nn.all_gather in its favour.)
    from torch.distributed._functional_collectives import all_gather_single, wait_tensor
    return wait_tensor(all_gather_single(x.contiguous(), 0, torch.distributed.group.WORLD))


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def global_sum(x: torch.Tensor) -> torch.Tensor:
    _, world = _world()
    if world == 1:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x)
    return x


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


def truth_matrix(text_codes: torch.Tensor, text_aspects: torch.Tensor, text_valid: torch.Tensor,
                 cell_codes: torch.Tensor, cell_valid: torch.Tensor) -> torch.Tensor:
    """[T, C] bool: text t is a true description of cell c.

    `*_codes` [N, A] hold a term code per identity aspect (0 = unknown), `text_aspects` [T, A]
    the aspects each text mentions. True when every mentioned aspect has the cell's term; an
    aspect unknown for the cell never agrees. Invalid texts or cells (no identity text) are
    true of nothing and nothing is true of them.
    """
    agree = (text_codes[:, None, :] == cell_codes[None, :, :]) & (cell_codes[None, :, :] != 0)
    true = (agree | ~text_aspects[:, None, :]).all(-1)
    return true & text_valid[:, None] & cell_valid[None, :]


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor, candidates: torch.Tensor):
    """Per-row soft cross-entropy against the uniform distribution over each row's positives,
    softmax over `candidates` only. Returns (loss [R], informative [R]): a row counts only when
    it has a positive and a candidate that is not one (else there is nothing to contrast)."""
    # A large finite fill, not -inf: a row without candidates must give zeros, not NaN gradients.
    log_p = F.log_softmax(logits.masked_fill(~candidates, -1e4), dim=-1).masked_fill(~candidates, 0.0)
    n_pos = positives.sum(-1)
    loss = -(log_p * positives).sum(-1) / n_pos.clamp(min=1)
    informative = (n_pos > 0) & (candidates & ~positives).any(-1)
    return loss.masked_fill(~informative, 0.0), informative


def cell_text_contrastive(cell_emb: torch.Tensor, text_emb: torch.Tensor, codes: torch.Tensor,
                          aspects: torch.Tensor, has_text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch; row b of `text_emb` describes cell b.

    Positives are every pair the truth matrix marks; cells without identity text are neither
    rows nor candidates. Rows with nothing to contrast are left out, so a batch with fewer than
    two distinct descriptions contributes zero (with its graph intact: every rank still
    backpropagates through the same parameters, as ZeRO requires)."""
    _, world = _world()
    all_cells, all_texts = gather_with_grad(cell_emb), gather_with_grad(text_emb)
    all_codes, all_aspects, all_valid = gather_no_grad(codes), gather_no_grad(aspects), gather_no_grad(has_text)
    text_true = truth_matrix(codes, aspects, has_text, all_codes, all_valid)        # local texts x all cells
    cell_true = truth_matrix(all_codes, all_aspects, all_valid, codes, has_text).t()  # local cells x all texts
    c2t, c2t_rows = _multi_positive_ce(logit_scale * cell_emb @ all_texts.t(), cell_true,
                                       all_valid[None, :] & has_text[:, None])
    t2c, t2c_rows = _multi_positive_ce(logit_scale * text_emb @ all_cells.t(), text_true,
                                       all_valid[None, :] & has_text[:, None])
    rows = global_sum(torch.stack([c2t_rows.sum(), t2c_rows.sum()]).to(cell_emb.dtype)).clamp(min=1)
    return 0.5 * world * (c2t.sum() / rows[0] + t2c.sum() / rows[1])


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


def sample_hard_negatives(sim: torch.Tensor, candidates: torch.Tensor, logit_scale: torch.Tensor):
    """BLIP's hard negatives: for each row of `sim` [R, N] draw one column among its `candidates`
    (never a true match) with probability softmax(sim * logit_scale) over those candidates.
    Returns (index [R], valid [R]); rows without any candidate are not valid."""
    valid = candidates.any(dim=1)
    logits = (sim.float() * logit_scale.float()).masked_fill(~candidates, float("-inf"))
    logits[~valid] = 0.0
    return torch.multinomial(F.softmax(logits, dim=1), 1).squeeze(1), valid


def cell_text_matching(model, cell_hidden, cell_mask, text_ids, text_mask, text_index, has_text, true,
                       sim_c2t, logit_scale):
    """Binary matching loss over the batch's (cell, own text) pairs, one hard negative text per
    cell and one hard negative cell per text (BLIP's 1:2), drawn from the local batch.

    `true` [B, B] is the truth matrix of the local texts (rows) and cells (columns); text row b
    is `text_ids[text_index[b]]`. Only cells with identity text take part."""
    with torch.no_grad():
        neg_text, valid_c = sample_hard_negatives(sim_c2t, ~true.t() & has_text[None, :], logit_scale)
        neg_cell, valid_t = sample_hard_negatives(sim_c2t.t(), ~true & has_text[None, :], logit_scale)
        valid_c &= has_text
        valid_t &= has_text
        own = has_text.nonzero().squeeze(1)
        c_rows = valid_c.nonzero().squeeze(1)
        t_rows = valid_t.nonzero().squeeze(1)
        cells = torch.cat([own, c_rows, neg_cell[t_rows]])
        texts = text_index[torch.cat([own, neg_text[c_rows], t_rows])]
        labels = torch.zeros(len(cells), dtype=torch.long, device=cell_hidden.device)
        labels[: len(own)] = 1
        # Without a negative the head would only learn to say "match": such a batch counts zero,
        # but still runs one pair so that every rank backpropagates through the same parameters.
        counts = len(c_rows) + len(t_rows) > 0
        if not counts:
            cells, texts, labels = cells[:0].new_zeros(1), texts[:0].new_zeros(1), labels[:0].new_zeros(1)
    logits = model.match_logits(cell_hidden[cells], cell_mask[cells], text_ids[texts], text_mask[texts])
    return F.cross_entropy(logits, labels) * float(counts)


def encode_cell_views(model, ids, mask, views: int):
    """Hidden states of `views` dropout views of the same cells, in one encoder pass."""
    hidden = model.cell_bert(input_ids=ids.repeat(views, 1), attention_mask=mask.repeat(views, 1)).last_hidden_state
    return hidden.chunk(views)


def pretrain_losses(model, batch: dict, stage: int, weights, mask_prob: float,
                    simcse_temperature: float) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the stage's objectives and each objective's detached value (on the
    device: reading it is the caller's choice, since it waits for the device).

    An objective with weight 0 is not computed at all (no forward, no cost)."""
    ids, mask = batch["cell_ids"], batch["cell_mask"]
    vocab = model.cell_bert.config.vocab_size
    masked, labels = mask_genes(ids, mask, mask_prob, vocab, cls_id=vocab - 1)
    # The SimCSE views are two dropout passes over the same masked cells (the masking doubles as
    # augmentation, so no third, unmasked pass is needed); both run as one batch.
    views = encode_cell_views(model, masked, mask, 2 if weights.cell_cell else 1)
    h1 = views[0]
    z1 = F.normalize(model.cell_proj(model.pool_cells(h1, mask)), dim=-1)
    parts = {}
    if weights.mlm:
        parts["mlm"] = sum(mlm_loss(model.mlm_head, h, labels) for h in views) / len(views)
    if weights.cell_cell:
        z2 = F.normalize(model.cell_proj(model.pool_cells(views[1], mask)), dim=-1)
        parts["cell_cell"] = cell_cell_contrastive(z1, z2, simcse_temperature)
    if stage == 2 and (weights.cell_text or weights.ctm):
        has_text, index = batch["has_text"], batch["text_index"]
        text_emb = model.encode_texts(batch["text_ids"], batch["text_mask"])[index]
        scale = model.logit_scale.clamp(max=MAX_LOG_SCALE).exp()
        codes, aspects = batch["term_codes"], batch["text_aspects"]
        if weights.cell_text:
            parts["cell_text"] = cell_text_contrastive(z1, text_emb, codes, aspects, has_text, scale)
        if weights.ctm:
            true = truth_matrix(codes, aspects, has_text, codes, has_text)
            parts["ctm"] = cell_text_matching(model, h1, mask, batch["text_ids"], batch["text_mask"], index,
                                              has_text, true, (z1 @ text_emb.t()).detach(), scale.detach())
    total = sum(getattr(weights, name) * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}
