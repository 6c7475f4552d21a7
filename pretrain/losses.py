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

from langcell.pretrain.packing import encode_packed

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


def gene_positions(input_ids: torch.Tensor, cls_id: int, first_gene_id: int = 2) -> torch.Tensor:
    """[B, L] bool: the tokens masking may pick (genes; never `<cls>`, `<pad>` or `<mask>`)."""
    return (input_ids >= first_gene_id) & (input_ids != cls_id)


def masked_gene_count(input_ids: torch.Tensor, mask_prob: float, cls_id: int) -> int:
    """How many genes of a batch the masked-gene objective picks: `mask_prob` of its genes.
    Counted where the batch is built (on the host), so the device never has to report a count."""
    return round(mask_prob * int(gene_positions(input_ids, cls_id).sum()))


def mask_genes(input_ids: torch.Tensor, n_masked: int, cls_id: int, mask_id: int = 1,
               first_gene_id: int = 2):
    """BERT masking of exactly `n_masked` gene tokens drawn uniformly without replacement over
    the batch: 80% -> <mask>, 10% -> a random gene, 10% unchanged. Uses the global RNG.

    A fixed count (rather than a coin per token) gives every tensor a shape known on the host:
    no step waits for the device to say how many tokens it picked.
    Returns (masked ids [B, L], picked flat positions [n_masked], their true ids [n_masked])."""
    flat = input_ids.reshape(-1)
    genes = gene_positions(flat, cls_id, first_gene_id)
    # Random scores, non-genes below every gene: the top n_masked scores are a uniform sample of genes.
    scores = torch.rand(flat.shape, device=flat.device).masked_fill(~genes, -1.0)
    positions = scores.topk(n_masked, sorted=False).indices
    labels = flat[positions]
    roll = torch.rand(n_masked, device=flat.device)
    random_genes = torch.randint(first_gene_id, cls_id, (n_masked,), device=flat.device)
    replaced = torch.where(roll < 0.8, torch.full_like(labels, mask_id), torch.where(roll < 0.9, random_genes, labels))
    masked = flat.scatter(0, positions, replaced).view_as(input_ids)
    return masked, positions, labels


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


def mlm_loss(mlm_head, hidden: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked-gene head at the picked flat `positions` of `hidden` [B, L, H]."""
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    if len(positions) == 0:
        # Keep the graph connected (ZeRO needs every rank to backward through the head).
        return mlm_head(hidden[:, :1]).sum() * 0.0
    return F.cross_entropy(mlm_head(picked), labels)


def sample_hard_negatives(sim: torch.Tensor, candidates: torch.Tensor, logit_scale: torch.Tensor,
                          uniform: float = 0.0):
    """BLIP's hard negatives: for each row of `sim` [R, N] draw one column among its `candidates`
    (never a true match) with probability softmax(sim * logit_scale) over those candidates, mixed
    with a `uniform` share of the uniform distribution over them.
    Returns (index [R], valid [R]); rows without any candidate are not valid."""
    valid = candidates.any(dim=1)
    logits = (sim.float() * logit_scale.float()).masked_fill(~candidates, float("-inf"))
    logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))
    probs = F.softmax(logits, dim=1)
    if uniform:
        flat = candidates.float() / candidates.sum(1, keepdim=True).clamp(min=1)
        probs = (1 - uniform) * probs + uniform * torch.where(valid[:, None], flat, probs)
    return torch.multinomial(probs, 1).squeeze(1), valid


def balance_per_text(pair_texts: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, n_texts: int):
    """Pair weights rescaled so that each text's non-matches weigh as much in total as its
    matches. BLIP's draws make a text that is often a hard negative (one of several T-cell
    subtypes) a non-match far more often than a distinctive one; the head then learns from the
    text alone that some descriptions rarely match, and zero-shot scoring, which compares texts
    for one cell, inherits that bias. Balanced, no text carries a prior of its own."""
    pos = labels.to(weights.dtype)
    pos_w = torch.zeros(n_texts, dtype=weights.dtype, device=weights.device).index_add(0, pair_texts, weights * pos)
    neg_w = torch.zeros_like(pos_w).index_add(0, pair_texts, weights * (1 - pos))
    ratio = torch.where(neg_w > 0, pos_w / neg_w.clamp(min=1e-12), torch.zeros_like(neg_w))
    return torch.where(pos > 0, weights, weights * ratio[pair_texts])


def cell_text_matching(model, cell_hidden, cell_mask, text_ids, text_mask, text_index, text_rows, true,
                       sim_c2t, logit_scale, uniform_negatives: float = 0.0, balance_texts: bool = False):
    """Binary matching loss over the batch's (cell, own text) pairs, one hard negative text per
    cell and one hard negative cell per text (BLIP's 1:2), drawn from the local batch; with
    `balance_texts`, weighted so each distinct text is as often a non-match as a match.

    `true` [B, B] is the truth matrix of the local texts (rows) and cells (columns); text row b
    is `text_ids[text_index[b]]`. Only the cells `text_rows` (those with identity text, listed
    on the host) take part. Every cell with text gets both negatives; one without any candidate
    (every text of the batch is true of it) weighs zero, so shapes never depend on the device."""
    has_text = torch.zeros(len(true), dtype=torch.bool, device=true.device).index_fill(0, text_rows, True)
    if len(text_rows) == 0:
        # No cell with text: one pair weighted zero, so every rank backpropagates through the
        # same parameters (ZeRO needs it).
        logits = model.match_logits(cell_hidden[:1], cell_mask[:1], text_ids[:1], text_mask[:1])
        return logits.sum() * 0.0
    with torch.no_grad():
        neg_text, valid_c = sample_hard_negatives(sim_c2t, ~true.t() & has_text[None, :], logit_scale,
                                                  uniform_negatives)
        neg_cell, valid_t = sample_hard_negatives(sim_c2t.t(), ~true & has_text[None, :], logit_scale,
                                                  uniform_negatives)
        cells = torch.cat([text_rows, text_rows, neg_cell[text_rows]])
        texts = text_index[torch.cat([text_rows, neg_text[text_rows], text_rows])]
        n = len(text_rows)
        labels = torch.zeros(3 * n, dtype=torch.long, device=cell_hidden.device)
        labels[:n] = 1
        weights = torch.cat([torch.ones(n, device=cell_hidden.device), valid_c[text_rows].float(),
                             valid_t[text_rows].float()])
        if balance_texts:
            weights = balance_per_text(texts, labels, weights, len(text_ids))
        # Without any negative the head would only learn to say "match": such a batch counts zero.
        weights = weights * (weights[n:].sum() > 0)
    logits = model.match_logits(cell_hidden, cell_mask, text_ids[texts], text_mask[texts], cell_index=cells)
    loss = F.cross_entropy(logits, labels, reduction="none")
    return (loss * weights).sum() / weights.sum().clamp(min=1.0)


def encode_cell_views(model, ids, mask, views: int, lengths: list[int] | None = None):
    """Hidden states of `views` dropout views of the same cells, in one encoder pass; with the
    cells' `lengths` (from the host), packed: no layer computes anything for the padding."""
    if lengths is not None:
        hidden = encode_packed(model.cell_bert, ids.repeat(views, 1), lengths * views)
    else:
        hidden = model.cell_bert(input_ids=ids.repeat(views, 1), attention_mask=mask.repeat(views, 1)).last_hidden_state
    return hidden.chunk(views)


def pretrain_losses(model, batch: dict, stage: int, weights, mask_prob: float, simcse_temperature: float,
                    n_masked: int | None = None, ctm_uniform_negatives: float = 0.0,
                    ctm_balance_texts: bool = False, cell_lengths: list[int] | None = None
                    ) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the stage's objectives and each objective's detached value (on the
    device: reading it is the caller's choice, since it waits for the device).

    `n_masked` (genes to mask, `masked_gene_count` of the batch on the host) and the batch's
    `text_rows` are what would otherwise make the step wait for the device; the trainer passes
    both, tests may leave them out. With `cell_lengths` (the real tokens of each cell, counted on
    the host) the cell encoder runs packed. An objective with weight 0 is not computed at all."""
    ids, mask = batch["cell_ids"], batch["cell_mask"]
    vocab = model.cell_bert.config.vocab_size
    if n_masked is None:
        n_masked = masked_gene_count(ids, mask_prob, cls_id=vocab - 1)
    masked, positions, labels = mask_genes(ids, n_masked, cls_id=vocab - 1)
    # The SimCSE views are two dropout passes over the same masked cells (the masking doubles as
    # augmentation, so no third, unmasked pass is needed); both run as one batch.
    views = encode_cell_views(model, masked, mask, 2 if weights.cell_cell else 1, cell_lengths)
    h1 = views[0]
    z1 = F.normalize(model.cell_proj(model.pool_cells(h1, mask)), dim=-1)
    parts = {}
    if weights.mlm:
        parts["mlm"] = sum(mlm_loss(model.mlm_head, h, positions, labels) for h in views) / len(views)
    if weights.cell_cell:
        z2 = F.normalize(model.cell_proj(model.pool_cells(views[1], mask)), dim=-1)
        parts["cell_cell"] = cell_cell_contrastive(z1, z2, simcse_temperature)
    if stage == 2 and (weights.cell_text or weights.ctm):
        has_text, index = batch["has_text"], batch["text_index"]
        # index_select: its backward is deterministic on a CPU (advanced indexing's is not)
        text_emb = model.encode_texts(batch["text_ids"], batch["text_mask"]).index_select(0, index)
        scale = model.logit_scale.clamp(max=MAX_LOG_SCALE).exp()
        codes, aspects = batch["term_codes"], batch["text_aspects"]
        if weights.cell_text:
            parts["cell_text"] = cell_text_contrastive(z1, text_emb, codes, aspects, has_text, scale)
        if weights.ctm:
            true = truth_matrix(codes, aspects, has_text, codes, has_text)
            rows = batch["text_rows"] if "text_rows" in batch else has_text.nonzero().squeeze(1)
            parts["ctm"] = cell_text_matching(model, h1, mask, batch["text_ids"], batch["text_mask"], index,
                                              rows, true, (z1 @ text_emb.t()).detach(), scale.detach(),
                                              ctm_uniform_negatives, ctm_balance_texts)
    total = sum(getattr(weights, name) * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}
