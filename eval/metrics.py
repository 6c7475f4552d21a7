"""Classification, ontology-aware, retrieval and integration metrics.

Classification metrics are computed from one confusion matrix (so accuracy, the F1 scores and
the per-class report always agree with each other); tests pin them to scikit-learn's numbers.
"""

from __future__ import annotations

import numpy as np


def confusion(y_true, y_pred, labels) -> np.ndarray:
    """Counts [n_labels, n_labels]; rows = true label, columns = prediction, in `labels` order."""
    index = {lab: i for i, lab in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        if t in index and p in index:
            cm[index[t], index[p]] += 1
    return cm


def classification_metrics(y_true, y_pred, labels=None) -> dict:
    """accuracy, macro/weighted F1 and a per-class report, as scikit-learn defines them.

    F1 of a class with no true and no predicted cell is 0 (scikit-learn's zero_division=0); classes
    are the union of true and predicted labels unless `labels` is given.
    """
    y_true = [str(v) for v in y_true]
    y_pred = [str(v) for v in y_pred]
    if labels is None:
        labels = sorted(set(y_true) | set(y_pred))
    labels = [str(v) for v in labels]
    cm = confusion(y_true, y_pred, labels)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    n = len(y_true)
    total_support = support.sum()
    return {
        "n_cells": n,
        "accuracy": float(sum(t == p for t, p in zip(y_true, y_pred)) / n) if n else 0.0,
        "macro_f1": float(f1.mean()) if len(labels) else 0.0,
        "weighted_f1": float((f1 * support).sum() / total_support) if total_support else 0.0,
        "per_class": {lab: {"precision": float(precision[i]), "recall": float(recall[i]),
                            "f1": float(f1[i]), "support": int(support[i])}
                      for i, lab in enumerate(labels)},
        "labels": labels,
        "confusion": cm.tolist(),
    }


def ontology_aware(true_ids, pred_ids, ancestors: dict[str, set[str]]) -> dict:
    """Shares of exact hits, predictions that are an ancestor (coarser) or a descendant (finer)
    of the true CL term, and everything else. `ontology_accuracy` counts the first three.

    Cells whose true or predicted term is unknown to the ontology can only be exact or other.
    """
    counts = {"exact": 0, "ancestor": 0, "descendant": 0, "other": 0}
    for t, p in zip(true_ids, pred_ids):
        if t == p:
            counts["exact"] += 1
        elif p in ancestors.get(t, ()):
            counts["ancestor"] += 1
        elif t in ancestors.get(p, ()):
            counts["descendant"] += 1
        else:
            counts["other"] += 1
    n = max(1, len(true_ids))
    out = {f"{k}_share": v / n for k, v in counts.items()}
    out["ontology_accuracy"] = (counts["exact"] + counts["ancestor"] + counts["descendant"]) / n
    out["n_cells"] = len(true_ids)
    return out


def retrieval_recall(scores: np.ndarray, cell_class: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Recall@k both ways for a [n_cells, n_texts] score matrix where text j describes class j.

    Several cells share one text, so the two directions are defined differently:
    - cell->text: each cell is one query with exactly one right text (its class's);
      R@k = share of cells whose text ranks in the top k.
    - text->cell: each distinct text is one query with many right cells; R@k = share of texts
      with at least one right cell in the top k (the usual one-to-many convention, as for an image
      with five captions), and P@k = mean share of right cells among the top k, which stays
      informative when R@k saturates. Texts with no cell are skipped.
    """
    n_cells, n_texts = scores.shape
    out: dict = {}
    rank_of_true = (scores > scores[np.arange(n_cells), cell_class][:, None]).sum(axis=1)
    for k in ks:
        out[f"cell_to_text_R@{k}"] = float((rank_of_true < k).mean())
    present = [j for j in range(n_texts) if (cell_class == j).any()]
    order = np.argsort(-scores[:, present], axis=0, kind="stable")  # [n_cells, n_present]
    for k in ks:
        top = order[:k]
        right = cell_class[top] == np.asarray(present)[None, :]
        out[f"text_to_cell_R@{k}"] = float(right.any(axis=0).mean())
        out[f"text_to_cell_P@{k}"] = float(right.mean(axis=0).mean())
    out["n_cells"] = int(n_cells)
    out["n_texts"] = len(present)
    return out


def silhouette_label(emb: np.ndarray, labels) -> float:
    """scIB's cell-type ASW: cosine silhouette by label, rescaled from [-1, 1] to [0, 1]."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    if len(set(labels)) < 2:
        return float("nan")
    # float64: cosine distances of float32 embeddings that lie close together (an untrained or
    # collapsed model) keep few digits, and the score then moves with the BLAS's rounding.
    return float((silhouette_score(np.asarray(emb, dtype=np.float64), labels, metric="cosine") + 1) / 2)


def silhouette_batch(emb: np.ndarray, labels, batches) -> float:
    """scIB's batch ASW: within each label, 1 - |silhouette by batch|, averaged over cells of all
    labels that have at least two batches; 1 = batches fully mixed."""
    from sklearn.metrics import silhouette_samples

    labels, batches, emb = np.asarray(labels), np.asarray(batches), np.asarray(emb, dtype=np.float64)
    scores = []
    for lab in np.unique(labels):
        sel = labels == lab
        if len(np.unique(batches[sel])) < 2 or sel.sum() <= len(np.unique(batches[sel])):
            continue
        scores.append(1 - np.abs(silhouette_samples(emb[sel], batches[sel], metric="cosine")))
    return float(np.concatenate(scores).mean()) if scores else float("nan")


def knn_batch_mixing(emb: np.ndarray, batches, k: int = 15) -> float:
    """Mean entropy of the batch mix among each cell's k nearest neighbours (cosine), divided by
    the entropy of the global batch mix: 1 = neighbourhoods as mixed as the data, 0 = one batch."""
    from sklearn.neighbors import NearestNeighbors

    batches = np.asarray(batches)
    names, codes = np.unique(batches, return_inverse=True)
    if len(names) < 2:
        return float("nan")
    k = min(k, len(batches) - 1)
    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(emb)
    neigh = nn.kneighbors(emb, return_distance=False)[:, 1:]
    onehot = np.eye(len(names))[codes[neigh]].mean(axis=1)  # [n, n_batches]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(onehot > 0, onehot * np.log(onehot), 0.0), axis=1)
    glob = np.bincount(codes) / len(codes)
    glob_ent = -np.sum(glob[glob > 0] * np.log(glob[glob > 0]))
    return float(ent.mean() / glob_ent) if glob_ent > 0 else float("nan")


def cluster_agreement(emb: np.ndarray, labels, seed: int = 0, leiden_resolution: float = 1.0) -> dict:
    """NMI and ARI of k-means (k = number of labels) and Leiden clusters against the labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = np.asarray(labels)
    out = {}
    km = KMeans(n_clusters=len(np.unique(labels)), n_init=10, random_state=seed).fit_predict(emb)
    out["kmeans_nmi"] = float(normalized_mutual_info_score(labels, km))
    out["kmeans_ari"] = float(adjusted_rand_score(labels, km))
    clusters = leiden_clusters(emb, seed=seed, resolution=leiden_resolution)
    out["leiden_nmi"] = float(normalized_mutual_info_score(labels, clusters))
    out["leiden_ari"] = float(adjusted_rand_score(labels, clusters))
    out["leiden_n_clusters"] = int(len(np.unique(clusters)))
    return out


def leiden_clusters(emb: np.ndarray, seed: int = 0, resolution: float = 1.0, k: int = 15) -> np.ndarray:
    import igraph
    import leidenalg
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(emb) - 1)
    neigh = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(emb).kneighbors(emb, return_distance=False)
    edges = {(min(i, j), max(i, j)) for i, row in enumerate(neigh) for j in row[1:] if i != j}
    graph = igraph.Graph(n=len(emb), edges=sorted(edges))
    part = leidenalg.find_partition(graph, leidenalg.RBConfigurationVertexPartition,
                                    resolution_parameter=resolution, seed=seed)
    return np.asarray(part.membership)
