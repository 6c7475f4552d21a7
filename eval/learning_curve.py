"""Does pre-training teach? Zero-shot accuracy of a run's checkpoints on held-out cells, beside
chance, the majority class and logistic regression trained on the labels pre-training saw.

Each point is one exported checkpoint scored exactly as `langcell eval zero-shot` scores it (the
same context, class texts and fusion), plus the similarity-only accuracy, so the curve shows
both the contrastive alignment and what the matching head adds on top.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from langcell.eval import metrics as M
from langcell.eval.data import load_eval_data
from langcell.eval.report import save_figure
from langcell.eval.scoring import fused_from_arrays
from langcell.eval.settings import EvalConfig
from langcell.eval.tasks import build_context, zero_shot_scores


def checkpoint_zero_shot(cfg: EvalConfig) -> dict:
    """Fused and similarity-only accuracy and macro-F1 of `cfg.model` on `cfg.data`."""
    ctx = build_context(cfg)
    scores = zero_shot_scores(ctx)
    names = np.asarray(ctx.classes)
    y_true = names[ctx.y]
    out = {}
    for key, pred in (("", fused_from_arrays(scores["sim"], scores["match"], cfg.zero_shot.alpha).argmax(1)),
                      ("similarity_only_", scores["sim"].argmax(1))):
        m = M.classification_metrics(y_true, names[pred], ctx.classes)
        out[f"{key}accuracy"], out[f"{key}macro_f1"] = m["accuracy"], m["macro_f1"]
    return out


def references(cfg: EvalConfig, train_data: str | Path, seed: int = 0) -> dict:
    """Chance, majority class, and logistic regression fitted on the cells of `train_data` whose
    label is one of the held-out cells' classes (the labels pre-training trained on), tested on
    `cfg.data`; both sides as the eval suite's baselines see cells (see eval/data.py)."""
    from sklearn.linear_model import LogisticRegression

    ctx = build_context(cfg)
    train = load_eval_data(str(train_data), ctx.vocab, cfg.label_key, None, cfg.min_gene_overlap, None, seed)
    labels = train.obs[cfg.label_key].astype(str).to_numpy()
    keep = np.isin(labels, ctx.classes)
    names = np.asarray(ctx.classes)
    logreg = LogisticRegression(max_iter=2000, random_state=seed).fit(train.expression[keep], labels[keep])
    m = M.classification_metrics(names[ctx.y], logreg.predict(ctx.data.expression), ctx.classes)
    counts = np.bincount(ctx.y, minlength=len(names))
    return {"chance": 1 / len(names), "majority": float(counts.max() / counts.sum()),
            "majority_class": str(names[counts.argmax()]), "logreg_accuracy": m["accuracy"],
            "logreg_macro_f1": m["macro_f1"], "logreg_train_cells": int(keep.sum())}


def curve_png(points: list[dict], refs: dict, path: Path, title: str) -> Path:
    """Accuracy per step (fused and similarity-only) with the references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(steps, [p["accuracy"] for p in points], "o-", label="zero-shot (fused)")
    ax.plot(steps, [p["similarity_only_accuracy"] for p in points], "s--", label="zero-shot (similarity only)")
    for key, style, label in (("logreg_accuracy", "g:", "logistic regression (same labels)"),
                              ("majority", "k-.", "majority class"), ("chance", "k:", "chance")):
        ax.axhline(refs[key], color=style[0], linestyle=style[1:], label=f"{label} {refs[key]:.2f}")
    ax.set_xlabel("stage-2 step")
    ax.set_ylabel("accuracy on held-out cells")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)
    return path
