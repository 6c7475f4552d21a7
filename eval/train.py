"""Fine-tuning loops used by eval: LangCell's few-shot loss and the LangCell-CE classifier.

LangCell-CE (LangCell-CE-annotation/finetune.py): the cell encoder plus a linear head, every
weight trained with cross-entropy, AdamW with linear warm-up and decay. Here the head starts from
a linear probe on the frozen encoder (see `probe_head`): on the demo's 156 labelled cells a
fresh head predicted the majority class for every cell.

Few-shot (LangCell-annotation-fewshot): for a batch of labelled cells and the C class
descriptions, cross-entropy over similarities / 0.05 plus cross-entropy over the C matching
probabilities, both encoders trained. LangCell runs the matching head once per class; here
all B x C pairs go through in one pass, which computes the same loss.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from langcell.eval.scoring import TEMPERATURE, pad_cells, tokenize_texts
from langcell.pretrain.model import LangCellModel


def fewshot_loss(model, input_ids, attention_mask, labels, text_ids, text_mask,
                 match_on_margin: bool = False, match_negatives: int | None = None) -> torch.Tensor:
    """LangCell's loss. Two options serve only the synthetic tiny model, never the few-shot
    benchmark: `match_on_margin` feeds the matching logit margin (logit1 - logit0) to the
    cross-entropy instead of the probability, a much stronger signal for a head trained from
    scratch; `match_negatives` scores the true class and only that many most similar wrong
    classes (hard negatives, as in pre-training), so training on 100 classes stays cheap."""
    embeds, hidden = model.encode_cells(input_ids, attention_mask)
    text_embeds = model.encode_texts(text_ids, text_mask)
    sim = embeds @ text_embeds.T / TEMPERATURE
    batch, n_classes = sim.shape
    if match_negatives is not None and match_negatives + 1 < n_classes:
        wrong = sim.detach().scatter(1, labels[:, None], float("-inf"))
        cand = torch.cat([labels[:, None], wrong.topk(match_negatives, dim=1).indices], dim=1)
        target = torch.zeros(batch, dtype=torch.long, device=sim.device)
    else:
        cand = torch.arange(n_classes, device=sim.device).repeat(batch, 1)
        target = labels
    cells = torch.arange(batch, device=sim.device).repeat_interleave(cand.shape[1])
    classes = cand.reshape(-1)
    logits = model.match_logits(hidden, attention_mask, text_ids[classes], text_mask[classes], cell_index=cells)
    if match_on_margin:
        match = (logits[:, 1] - logits[:, 0]).view(batch, -1)
    else:
        match = F.softmax(logits, dim=-1)[:, 1].view(batch, -1)
    return F.cross_entropy(sim, labels) + F.cross_entropy(match, target)


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def _fit(module: nn.Module, optimizer, seqs, labels: np.ndarray, loss_fn, epochs: int, batch_size: int,
         seed: int, pad_id: int, desc: str, schedule=None) -> list[float]:
    """Shuffled mini-batch epochs over `seqs`; `loss_fn(ids, mask, y)` gives each batch's loss.

    `schedule(total_steps)`, if given, returns the optimizer's learning-rate scheduler."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = next(module.parameters()).device
    module.train()
    losses = []
    steps = epochs * ((len(seqs) + batch_size - 1) // batch_size)
    scheduler = schedule(steps) if schedule is not None else None
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for _ in range(epochs):
            for idx in _batches(len(seqs), batch_size, rng):
                ids, mask = pad_cells([seqs[i] for i in idx], pad_id)
                y = torch.as_tensor(labels[idx], dtype=torch.long, device=device)
                loss = loss_fn(ids.to(device), mask.to(device), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
    module.eval()
    return losses


def train_fewshot(model, seqs, labels: np.ndarray, class_texts: list[str], epochs: int, lr: float,
                  batch_size: int, seed: int, pad_id: int = 0, desc: str = "few-shot",
                  match_on_margin: bool = False, match_negatives: int | None = None) -> list[float]:
    """Fine-tune `model` in place with LangCell's few-shot loss; returns the per-step losses."""
    text_ids, text_mask = tokenize_texts(model, class_texts)

    def loss_fn(ids, mask, y):
        return fewshot_loss(model, ids, mask, y, text_ids, text_mask, match_on_margin, match_negatives)

    return _fit(model, torch.optim.Adam(model.parameters(), lr=lr), seqs, labels, loss_fn, epochs, batch_size,
                seed, pad_id, desc)


class CellClassifier(nn.Module):
    """LangCell-CE: the cell encoder's pooled state, pooled as the model records it, through a linear head.

    Holds its own copy of the cell encoder, so fine-tuning leaves `model` as it was; the copy is
    wrapped in a cell-only LangCellModel that carries `model.cell_pooling`, and pooling goes
    through its `pool_cells`, the one pooling every eval path uses.
    """

    def __init__(self, model, n_classes: int):
        super().__init__()
        self.encoder = LangCellModel(copy.deepcopy(model.cell_bert), cell_proj=None,
                                     cell_pooling=model.cell_pooling)
        self.head = nn.Linear(model.cell_bert.config.hidden_size, n_classes)

    def pooled(self, input_ids, attention_mask):
        """[B, H] cell states: the encoder's hidden states through the model's own pooling."""
        return self.encoder.cell_states(input_ids, attention_mask)[0]

    def forward(self, input_ids, attention_mask):
        return self.head(self.pooled(input_ids, attention_mask))


@torch.no_grad()
def pooled_states(clf: CellClassifier, seqs, batch_size: int = 64, pad_id: int = 0) -> torch.Tensor:
    """[N, H] pooled cell states of the classifier's encoder (eval mode), in input order."""
    clf.eval()
    device = next(clf.parameters()).device
    out = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_cells(seqs[start:start + batch_size], pad_id)
        out.append(clf.pooled(ids.to(device), mask.to(device)).float())
    return torch.cat(out)


def probe_head(clf: CellClassifier, seqs, labels: np.ndarray, steps: int, l2: float, pad_id: int = 0) -> None:
    """Fit the head alone on the frozen encoder's pooled states (a linear probe).

    Pooled states share a large component across cells and differ by a small one (in the demo
    model the shared part is 4x the spread across cells under mean pooling, 80x under <cls>).
    A fresh head trained with the encoder moves every cell's logits alike through that shared
    part, so it first learns the class prior, and in the few steps a small labelled set gives it
    predicted the majority class for every cell. Here the head is fitted to convergence (full
    batch, L-BFGS) on the states standardised per dimension, and the standardisation is folded
    into its weights: fine-tuning starts from a head that already separates the classes (LP-FT,
    Kumar et al. 2022), and the classifier is still the encoder plus one linear layer.
    """
    x = pooled_states(clf, seqs, pad_id=pad_id)
    mean, std = x.mean(0), x.std(0, correction=0).clamp(min=1e-6)
    z = (x - mean) / std
    y = torch.as_tensor(labels, dtype=torch.long, device=z.device)
    probe = nn.Linear(z.shape[1], clf.head.out_features).to(z.device)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(z), y) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        weight = probe.weight / std
        clf.head.weight.copy_(weight)
        clf.head.bias.copy_(probe.bias - weight @ mean)


def train_classifier(clf: CellClassifier, seqs, labels: np.ndarray, epochs: int, lr: float, batch_size: int,
                     seed: int, pad_id: int = 0, desc: str = "finetune", warmup_ratio: float = 0.0,
                     weight_decay: float = 0.0, probe_steps: int = 0, probe_l2: float = 0.0) -> list[float]:
    """LangCell-CE: optionally a linear probe for the head (`probe_steps` > 0), then every weight
    trained with cross-entropy, AdamW, linear warm-up over `warmup_ratio` of the steps and linear
    decay to 0 (LangCell's schedule)."""
    torch.manual_seed(seed)
    if probe_steps > 0:
        probe_head(clf, seqs, labels, probe_steps, probe_l2, pad_id)
    optimizer = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)

    def schedule(total: int):
        warmup = int(round(warmup_ratio * total))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (step + 1) / warmup if step < warmup else (total - step) / max(1, total - warmup))

    return _fit(clf, optimizer, seqs, labels, lambda ids, mask, y: F.cross_entropy(clf(ids, mask), y), epochs,
                batch_size, seed, pad_id, desc, schedule)


@torch.no_grad()
def predict_classifier(clf: CellClassifier, seqs, batch_size: int = 64, pad_id: int = 0) -> np.ndarray:
    device = next(clf.parameters()).device
    out = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_cells(seqs[start:start + batch_size], pad_id)
        out.append(clf(ids.to(device), mask.to(device)).argmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, int)
