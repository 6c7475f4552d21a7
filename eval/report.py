"""Report folder: metrics.json, report.md and PNG plots, each written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from langcell.core.files import atomic_path, atomic_write_bytes, atomic_write_json


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def confusion_png(cm, labels, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (row-normalised)")
    if len(labels) <= 20:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    save_figure(fig, path)
    return path


def embed_2d(emb: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    if method == "umap" and len(emb) > 15:
        import umap

        return umap.UMAP(n_neighbors=min(15, len(emb) - 1), random_state=seed, metric="cosine").fit_transform(emb)
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(emb)


def embedding_png(xy: np.ndarray, colourings: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """One scatter panel per colouring (label, prediction, dataset...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(colourings), figsize=(5 * len(colourings), 4.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], colourings.items()):
        values = np.asarray(values).astype(str)
        cats = sorted(set(values))
        cmap = plt.get_cmap("tab20", max(len(cats), 1))
        for i, cat in enumerate(cats):
            sel = values == cat
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(i), label=cat, rasterized=True)
        ax.set_title(f"{title}: {name}")
        ax.set_xticks([])
        ax.set_yticks([])
        if len(cats) <= 20:
            ax.legend(fontsize=6, markerscale=2, loc="best", frameon=False)
    save_figure(fig, path)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def per_class_table(per_class: dict) -> str:
    rows = [{"class": k, **v} for k, v in per_class.items()]
    return table(rows, ["class", "precision", "recall", "f1", "support"])


def write_report(out: Path, title: str, metrics: dict, body: str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", _jsonable(metrics))
    atomic_write_bytes(out / "report.md", f"# {title}\n\n{body.strip()}\n".encode())


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj
