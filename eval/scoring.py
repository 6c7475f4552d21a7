"""Zero-shot scoring: similarity + cell-text matching, fused as in LangCell, optionally over top-k.

LangCell scores a cell against C class descriptions as
    alpha * softmax_c(cell . text_c / 0.05) + (1 - alpha) * softmax_c(p_match(cell, text_c))
where p_match is softmax(ctm_head(...))[1] of the text encoder run in multimodal mode over the
cell's hidden states. By default `TopKScorer` computes exactly that as LangCell's notebook does:
the matching head once per class over the cell batch (C passes of B pairs), which on CPU beat
packing all B*C pairs into passes (0.6-0.7x the loop's speed, BENCHMARKS.md).

Asked for top-k, it runs the matching head only for each cell's k most similar classes (all B*k
pairs of a batch packed into passes of `pair_batch`): classes
outside them get match probability 0 (treated as "does not match") and still enter the softmax
over classes. That changes LangCell's formula (a predicted class can differ from the exact one;
BENCHMARKS.md measures how often); with k >= C it is the exact formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from langcell.core.errors import LangCellError

TEMPERATURE = 0.05


def pad_cells(seqs, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences into (input_ids [B, L] long, attention_mask [B, L] long)."""
    if len(seqs) == 0:
        raise LangCellError("cells: empty batch; pass at least one cell")
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.as_tensor(np.asarray(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def tokenize_texts(model, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    if not texts:
        raise LangCellError("candidate cell types: the list is empty; pass at least two cell types")
    max_length = int(getattr(model, "text_max_length", 512))
    enc = model.text_tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
    device = next(model.parameters()).device
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def fuse(sim: torch.Tensor, match_prob: torch.Tensor, alpha: float) -> torch.Tensor:
    """LangCell's fused score from raw similarities [B, C] and match probabilities [B, C]."""
    return alpha * F.softmax(sim / TEMPERATURE, dim=-1) + (1 - alpha) * F.softmax(match_prob, dim=-1)


def match_prob_pairs(model, cell_hidden, cell_mask, cell_index, text_ids, text_mask, class_index,
                     pair_batch: int) -> torch.Tensor:
    """p_match for the pairs (cell_index[i], class_index[i]), run `pair_batch` pairs per pass."""
    out = torch.empty(len(cell_index), dtype=torch.float32)
    for start in range(0, len(cell_index), pair_batch):
        ci = cell_index[start:start + pair_batch]
        ti = class_index[start:start + pair_batch]
        tm = text_mask[ti]
        # Texts of one class list are padded to the longest one; trimming to the longest in this
        # pass saves the cross-attention work on pad positions.
        width = int(tm.sum(dim=1).max())
        # Each cell of the pass is projected to cross-attention keys and values once, however
        # many of its classes the pass scores.
        cells, pair_cell = torch.unique(ci, return_inverse=True)
        logits = model.match_logits(cell_hidden[cells], cell_mask[cells], text_ids[ti][:, :width], tm[:, :width],
                                    cell_index=pair_cell)
        out[start:start + len(ci)] = F.softmax(logits.float(), dim=-1)[:, 1].cpu()
    return out


def match_prob_topk(model, cell_hidden, cell_mask, sim, text_ids, text_mask, k: int,
                    pair_batch: int) -> torch.Tensor:
    """[B, C] match probabilities, filled for each cell's top-k classes by similarity, 0 elsewhere."""
    batch, n_classes = sim.shape
    k = min(k, n_classes)
    top = sim.topk(k, dim=1).indices  # [B, k]
    cell_index = torch.arange(batch, device=sim.device).repeat_interleave(k)
    class_index = top.reshape(-1)
    probs = match_prob_pairs(model, cell_hidden, cell_mask, cell_index, text_ids, text_mask,
                             class_index, pair_batch)
    match = torch.zeros((batch, n_classes), dtype=torch.float32)
    match[cell_index.cpu(), class_index.cpu()] = probs
    return match


def match_prob_per_class_loop(model, cell_hidden, cell_mask, text_ids, text_mask) -> torch.Tensor:
    """LangCell's notebook: for each class, one matching pass over the whole cell batch."""
    batch = cell_hidden.shape[0]
    match = torch.zeros((batch, text_ids.shape[0]), dtype=torch.float32)
    for c in range(text_ids.shape[0]):
        width = int(text_mask[c].sum())
        ids = text_ids[c, :width].unsqueeze(0).expand(batch, -1)
        mask = text_mask[c, :width].unsqueeze(0).expand(batch, -1)
        logits = model.match_logits(cell_hidden, cell_mask, ids, mask)
        match[:, c] = F.softmax(logits.float(), dim=-1)[:, 1].cpu()
    return match


@dataclass
class BatchScores:
    embeds: torch.Tensor  # [B, 256]
    sim: torch.Tensor     # [B, C] raw cosine similarities
    match: torch.Tensor   # [B, C] match probabilities (0 outside the scored classes)
    fused: torch.Tensor   # [B, C]


class TopKScorer:
    """Scores cell batches against a fixed list of class descriptions.

    `top_k=None` (or k >= the classes) scores every class with LangCell's per-class loop (the exact
    fusion); a smaller k packs each cell's top-k pairs. `method="loop"` forces the loop.
    """

    def __init__(self, model, class_texts: list[str], alpha: float = 0.1, top_k: int | None = None,
                 pair_batch: int = 256, method: str = "topk"):
        if method not in ("topk", "loop"):
            raise LangCellError(f"zero-shot config: method '{method}' unknown; use topk or loop")
        if not 0.0 <= alpha <= 1.0:
            raise LangCellError(f"zero-shot config: alpha={alpha} outside [0, 1]; pick a value in [0, 1]")
        self.model = model
        self.alpha = alpha
        self.method = method
        self.pair_batch = pair_batch
        self.text_ids, self.text_mask = tokenize_texts(model, class_texts)
        self.top_k = len(class_texts) if top_k is None else max(1, min(int(top_k), len(class_texts)))
        with torch.no_grad():
            embeds = []
            for start in range(0, len(class_texts), 64):
                embeds.append(model.encode_texts(self.text_ids[start:start + 64],
                                                 self.text_mask[start:start + 64]).float())
            self.text_embeds = torch.cat(embeds)  # [C, 256], on the model's device

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> BatchScores:
        device = self.text_embeds.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        embeds, hidden = self.model.encode_cells(input_ids, attention_mask)
        embeds = embeds.float()
        sim = embeds @ self.text_embeds.T
        if self.method == "loop" or self.top_k >= self.text_ids.shape[0]:
            match = match_prob_per_class_loop(self.model, hidden, attention_mask, self.text_ids, self.text_mask)
        else:
            match = match_prob_topk(self.model, hidden, attention_mask, sim, self.text_ids, self.text_mask,
                                    self.top_k, self.pair_batch)
        sim = sim.cpu()
        return BatchScores(embeds=embeds.cpu(), sim=sim, match=match, fused=fuse(sim, match, self.alpha))


def score_cells(scorer: TopKScorer, seqs, batch_size: int = 32, desc: str = "zero-shot",
                pad_id: int = 0) -> dict[str, np.ndarray]:
    """Score every cell; returns embeds, sim, match and fused as numpy arrays, in input order.

    Cells are scored in order of length so that a batch pads to similar lengths; the results are
    put back in input order.
    """
    from tqdm import tqdm

    order = np.argsort([len(s) for s in seqs], kind="stable")
    n, c = len(seqs), scorer.text_embeds.shape[0]
    out = {"embeds": np.zeros((n, scorer.text_embeds.shape[1]), np.float32),
           "sim": np.zeros((n, c), np.float32), "match": np.zeros((n, c), np.float32),
           "fused": np.zeros((n, c), np.float32)}
    with tqdm(total=n, desc=desc, unit="cell") as bar:
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad_cells([seqs[i] for i in idx], pad_id)
            res = scorer.score(ids, mask)
            for key in out:
                out[key][idx] = getattr(res, key).numpy()
            bar.update(len(idx))
    return out


def fused_from_arrays(sim: np.ndarray, match: np.ndarray, alpha: float) -> np.ndarray:
    """Re-fuse stored similarity and match arrays with another alpha (for tuning alpha)."""
    return fuse(torch.from_numpy(sim), torch.from_numpy(match), alpha).numpy()


def tune_alpha(sim: np.ndarray, match: np.ndarray, labels: np.ndarray,
               grid=(0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)) -> tuple[float, dict]:
    """Pick alpha by accuracy on a validation split (ties go to the value nearest LangCell's 0.1)."""
    accs = {float(a): float((fused_from_arrays(sim, match, a).argmax(1) == labels).mean()) for a in grid}
    best = max(accs, key=lambda a: (accs[a], -abs(a - 0.1)))
    return best, accs
