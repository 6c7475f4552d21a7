"""Fine-tuning loops used by eval: LangCell's few-shot loss and the LangCell-CE classifier.

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

from eval.scoring import TEMPERATURE, pad_cells, tokenize_texts
from pretrain.model import LangCellModel


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
    logits = model.match_logits(hidden[cells], attention_mask[cells], text_ids[classes], text_mask[classes])
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
         seed: int, pad_id: int, desc: str) -> list[float]:
    """Shuffled mini-batch epochs over `seqs`; `loss_fn(ids, mask, y)` gives each batch's loss."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = next(module.parameters()).device
    module.train()
    losses = []
    steps = epochs * ((len(seqs) + batch_size - 1) // batch_size)
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for _ in range(epochs):
            for idx in _batches(len(seqs), batch_size, rng):
                ids, mask = pad_cells([seqs[i] for i in idx], pad_id)
                y = torch.as_tensor(labels[idx], dtype=torch.long, device=device)
                loss = loss_fn(ids.to(device), mask.to(device), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
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

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder.cell_bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(self.encoder.pool_cells(hidden, attention_mask))


def train_classifier(clf: CellClassifier, seqs, labels: np.ndarray, epochs: int, lr: float, batch_size: int,
                     seed: int, pad_id: int = 0, desc: str = "finetune") -> list[float]:
    return _fit(clf, torch.optim.AdamW(clf.parameters(), lr=lr), seqs, labels,
                lambda ids, mask, y: F.cross_entropy(clf(ids, mask), y), epochs, batch_size, seed, pad_id, desc)


@torch.no_grad()
def predict_classifier(clf: CellClassifier, seqs, batch_size: int = 64, pad_id: int = 0) -> np.ndarray:
    device = next(clf.parameters()).device
    out = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_cells(seqs[start:start + batch_size], pad_id)
        out.append(clf(ids.to(device), mask.to(device)).argmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, int)
