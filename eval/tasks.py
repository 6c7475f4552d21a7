"""The eval tasks. Each returns (metrics dict, report.md body) and writes its plots into `out`.

`Context` holds what every task shares (model, data, class descriptions, ontology), so the suite
loads them once.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from langcell.core.errors import LangCellError
from langcell.eval import metrics as M
from langcell.eval import report as R
from langcell.eval.data import EvalData, check_data_path, few_shot_split, load_eval_data, stratified_split
from langcell.eval.model_io import Vocab, cell_max_length, load_model
from langcell.eval.ontology import CellOntology
from langcell.eval.prompts import class_text, model_prompt
from langcell.eval.scoring import TopKScorer, fused_from_arrays, score_cells, tune_alpha
from langcell.eval.settings import EvalConfig


@dataclass
class Context:
    cfg: EvalConfig
    model: object
    vocab: Vocab
    data: EvalData
    classes: list[str]         # sorted distinct labels
    y: np.ndarray              # class index per cell
    texts: list[str]           # description per class
    text_sources: dict         # class -> "type2text" | "ontology" | "label"
    ontology: CellOntology
    novel: set[str]
    batches: np.ndarray | None


def library_dir(cfg: EvalConfig) -> Path | None:
    if cfg.library:
        return Path(cfg.library)
    guess = Path(cfg.data).resolve().parent.parent
    return guess if (guess / "type2text.json").is_file() else None


def class_descriptions(classes, type2text: dict, ontology: CellOntology, prompt: dict) -> tuple[list[str], dict]:
    """type2text first (the texts the model was trained with), else the CL description of a label
    that names a CL term, else the label itself, both in the model's class prompt."""
    texts, sources = [], {}
    for lab in classes:
        if lab in type2text:
            texts.append(type2text[lab])
            sources[lab] = "type2text"
        elif ontology.term_for(lab):
            texts.append(ontology.description(ontology.term_for(lab), prompt))
            sources[lab] = "ontology"
        else:
            texts.append(class_text(prompt, lab, ""))
            sources[lab] = "label"
    return texts, sources


def build_context(cfg: EvalConfig) -> Context:
    if not cfg.model or not cfg.data:
        raise LangCellError("eval config: 'model' and 'data' are required; pass --model and --data")
    # The data's own checks need the model's vocabulary; a wrong path need not wait for the model.
    check_data_path(cfg.data)
    model, vocab = load_model(cfg.model, cfg.device, cfg.text_tokenizer)
    data = load_eval_data(cfg.data, vocab, cfg.label_key, cfg.batch_key, cfg.min_gene_overlap,
                          cfg.max_cells, cfg.seed, cell_max_length(model))
    labels = data.obs[cfg.label_key].astype(str).to_numpy()
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise LangCellError(f"{cfg.data}: column '{cfg.label_key}' has {len(classes)} distinct value(s); "
                            "evaluation needs at least two cell types")
    lib = library_dir(cfg)
    type2text = json.loads((lib / "type2text.json").read_text()) if lib and (lib / "type2text.json").is_file() else {}
    ontology = CellOntology.load(cfg.ontology_terms)
    texts, sources = class_descriptions(classes, type2text, ontology, model_prompt(model))
    novel = set(cfg.zero_shot.novel_types or [])
    if cfg.zero_shot.novel_types is None and lib and (lib / "manifest.json").is_file():
        manifest = json.loads((lib / "manifest.json").read_text())
        novel = set((manifest.get("config") or {}).get("holdout_cell_types") or [])
    # Novel types may be named by CL id; compare on labels.
    novel = {ontology.labels.get(t, t) for t in novel}
    unknown = sorted(novel - set(classes)) if cfg.zero_shot.novel_types is not None else []
    if unknown:
        raise LangCellError(f"zero_shot.novel_types: '{unknown[0]}' is not a cell type in {cfg.data}'s "
                            f"'{cfg.label_key}'; name types of the data, e.g. {classes[0]!r}")
    index = {c: i for i, c in enumerate(classes)}
    batches = data.obs[cfg.batch_key].astype(str).to_numpy() if cfg.batch_key else None
    return Context(cfg, model, vocab, data, classes, np.array([index[v] for v in labels]), texts, sources,
                   ontology, novel, batches)


def _term_ids(ctx: Context, idx: np.ndarray) -> list[str]:
    obs = ctx.data.obs
    if "cell_type_ontology_term_id" in obs.columns and ctx.cfg.label_key == "cell_type":
        return obs["cell_type_ontology_term_id"].astype(str).to_numpy()[idx].tolist()
    return [ctx.ontology.term_for(ctx.classes[c]) or ctx.classes[c] for c in ctx.y[idx]]


def _embedding_plot(ctx: Context, emb: np.ndarray, colourings: dict, path: Path, title: str) -> str:
    xy = R.embed_2d(emb, ctx.cfg.embedding_plot, ctx.cfg.seed)
    R.embedding_png(xy, colourings, path, title)
    return path.name


# ----------------------------------------------------------------------------- zero-shot
def zero_shot(ctx: Context, out: Path, scores: dict | None = None) -> tuple[dict, str]:
    zcfg = ctx.cfg.zero_shot
    if scores is None:
        scores = zero_shot_scores(ctx)
    alpha, alpha_grid = zcfg.alpha, None
    test_idx = np.arange(len(ctx.y))
    if zcfg.tune_alpha:
        test_idx, val_idx = stratified_split(ctx.y, zcfg.val_fraction, ctx.cfg.seed)
        alpha, alpha_grid = tune_alpha(scores["sim"][val_idx], scores["match"][val_idx], ctx.y[val_idx])
    fused = fused_from_arrays(scores["sim"][test_idx], scores["match"][test_idx], alpha)
    pred = fused.argmax(1)
    names = np.asarray(ctx.classes)
    y_true, y_pred = names[ctx.y[test_idx]], names[pred]
    cls = M.classification_metrics(y_true, y_pred, ctx.classes)
    true_terms = _term_ids(ctx, test_idx)
    pred_terms = [ctx.ontology.term_for(p) or p for p in y_pred]
    onto = M.ontology_aware(true_terms, pred_terms, ctx.ontology.ancestor_map())
    out_metrics = {
        "alpha": alpha, "alpha_grid": alpha_grid, "top_k": ctx.cfg.zero_shot.top_k, "n_classes": len(ctx.classes),
        **{k: cls[k] for k in ("n_cells", "accuracy", "macro_f1", "weighted_f1")},
        "similarity_only_accuracy": float((scores["sim"][test_idx].argmax(1) == ctx.y[test_idx]).mean()),
        "ontology": onto, "per_class": cls["per_class"], "confusion": cls["confusion"], "labels": cls["labels"],
        "text_sources": ctx.text_sources,
    }
    groups = {}
    if ctx.novel:
        is_novel = np.isin(y_true, list(ctx.novel))
        for name, sel in (("seen", ~is_novel), ("novel", is_novel)):
            if sel.any():
                sub = M.classification_metrics(y_true[sel], y_pred[sel], ctx.classes)
                groups[name] = {k: sub[k] for k in ("n_cells", "accuracy", "macro_f1", "weighted_f1")}
                groups[name]["macro_f1"] = float(np.mean([sub["per_class"][c]["f1"] for c in set(y_true[sel])]))
        out_metrics["novel_types"] = sorted(ctx.novel)
    out_metrics["seen_vs_novel"] = groups
    R.confusion_png(cls["confusion"], ctx.classes, out / "zero_shot_confusion.png", "zero-shot")
    colourings = {"label": y_true, "prediction": y_pred}
    if ctx.batches is not None:
        colourings["dataset"] = ctx.batches[test_idx]
    plot = _embedding_plot(ctx, scores["embeds"][test_idx], colourings, out / "zero_shot_embedding.png",
                           f"cell embeddings ({ctx.cfg.embedding_plot})")
    body = [
        "## Zero-shot cell type annotation",
        f"{cls['n_cells']} cells, {len(ctx.classes)} candidate types; score = alpha * softmax(sim / 0.05) + "
        f"(1 - alpha) * softmax over classes of the matching probability, alpha = {alpha:g}"
        + (" (tuned on a validation share)" if alpha_grid else "")
        + ("; LangCell's exact formula over every class." if zcfg.top_k is None else
           f"; matching head on each cell's top-{zcfg.top_k} classes by similarity only (0 elsewhere)."),
        "",
        R.table([{"metric": k, "value": out_metrics[k]} for k in
                 ("accuracy", "macro_f1", "weighted_f1", "similarity_only_accuracy")], ["metric", "value"]),
        "",
        "Ontology-aware (a prediction that is an ancestor = coarser, or a descendant = finer CL term of the "
        "true type is counted apart from an exact hit):",
        "",
        R.table([{"exact": onto["exact_share"], "ancestor": onto["ancestor_share"],
                  "descendant": onto["descendant_share"], "other": onto["other_share"],
                  "ontology_accuracy": onto["ontology_accuracy"]}],
                ["exact", "ancestor", "descendant", "other", "ontology_accuracy"]),
    ]
    if groups:
        body += ["", "Seen vs novel cell types (novel = held out of pre-training):", "",
                 R.table([{"group": g, **v} for g, v in groups.items()],
                         ["group", "n_cells", "accuracy", "macro_f1", "weighted_f1"])]
    body += ["", "Per class:", "", R.per_class_table(cls["per_class"]), "",
             "![confusion](zero_shot_confusion.png)", "", f"![embedding]({plot})"]
    return out_metrics, "\n".join(body)


def zero_shot_scores(ctx: Context, model=None, y_subset=None, seqs=None) -> dict:
    zcfg = ctx.cfg.zero_shot
    scorer = TopKScorer(model or ctx.model, ctx.texts, alpha=zcfg.alpha, top_k=zcfg.top_k,
                        pair_batch=zcfg.pair_batch)
    return score_cells(scorer, seqs if seqs is not None else ctx.data.input_ids, zcfg.batch_size,
                       pad_id=ctx.vocab.pad_id)


# ----------------------------------------------------------------------------- baselines
def baselines(x_train, y_train, x_test, y_test, seed: int) -> dict:
    """Logistic regression and kNN on the expression matrix (see eval.data for what it holds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    out = {}
    logreg = LogisticRegression(max_iter=1000, random_state=seed).fit(x_train, y_train)
    out["logreg"] = M.classification_metrics(y_test, logreg.predict(x_test))
    # k never exceeds the smallest class's training cells: at 1 shot a 5-NN vote would be
    # decided by other classes.
    k = int(max(1, min(5, np.bincount(np.unique(y_train, return_inverse=True)[1]).min())))
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(x_train, y_train)
    out["knn"] = M.classification_metrics(y_test, knn.predict(x_test))
    return out


def _summary(runs: list[dict]) -> dict:
    out = {}
    for key in ("accuracy", "macro_f1"):
        vals = np.array([r[key] for r in runs])
        out[f"{key}_mean"] = float(vals.mean())
        out[f"{key}_std"] = float(vals.std())
    return out


# ----------------------------------------------------------------------------- few-shot
def few_shot(ctx: Context, out: Path) -> tuple[dict, str]:
    from langcell.eval.train import train_fewshot

    fcfg = ctx.cfg.few_shot
    results, rows = {}, []
    for n in fcfg.shots:
        per_method = {"langcell": [], "logreg": [], "knn": []}
        for seed in fcfg.seeds:
            train, test = few_shot_split(ctx.y, n, seed)
            if len(test) == 0:
                raise LangCellError(f"{ctx.cfg.data}: no class has more than {n} cells; lower few_shot.shots")
            classes_kept = sorted(set(ctx.y[train]))
            remap = {c: i for i, c in enumerate(classes_kept)}
            texts = [ctx.texts[c] for c in classes_kept]
            y_train = np.array([remap[c] for c in ctx.y[train]])
            y_test = np.array([remap[c] for c in ctx.y[test]])
            model = copy.deepcopy(ctx.model)
            train_fewshot(model, [ctx.data.input_ids[i] for i in train], y_train, texts, fcfg.epochs, fcfg.lr,
                          fcfg.batch_size, seed, ctx.vocab.pad_id, desc=f"few-shot n={n} seed={seed}")
            scorer = TopKScorer(model, texts, alpha=ctx.cfg.zero_shot.alpha, top_k=ctx.cfg.zero_shot.top_k,
                                pair_batch=ctx.cfg.zero_shot.pair_batch)
            res = score_cells(scorer, [ctx.data.input_ids[i] for i in test], ctx.cfg.zero_shot.batch_size,
                              desc="few-shot eval", pad_id=ctx.vocab.pad_id)
            per_method["langcell"].append(M.classification_metrics(y_test, res["fused"].argmax(1)))
            base = baselines(ctx.data.expression[train], y_train, ctx.data.expression[test], y_test, seed)
            per_method["logreg"].append(base["logreg"])
            per_method["knn"].append(base["knn"])
            del model
        results[str(n)] = {m: {**_summary(runs), "runs": [{k: r[k] for k in ("accuracy", "macro_f1", "n_cells")}
                                                          for r in runs]} for m, runs in per_method.items()}
        for m in per_method:
            s = results[str(n)][m]
            rows.append({"n per class": n, "method": m,
                         "accuracy": f"{s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f}",
                         "macro F1": f"{s['macro_f1_mean']:.4f} ± {s['macro_f1_std']:.4f}"})
    metrics = {"shots": fcfg.shots, "seeds": fcfg.seeds, "expression": ctx.data.expression_kind, "results": results}
    body = ["## Few-shot", f"n labelled cells per class, seeds {fcfg.seeds}; LangCell fine-tunes both encoders "
            "with its few-shot loss (CE over similarities / 0.05 + CE over matching probabilities), baselines on "
            f"the same splits see `{ctx.data.expression_kind}` expression. Mean ± std over seeds.", "",
            R.table(rows, ["n per class", "method", "accuracy", "macro F1"])]
    return metrics, "\n".join(body)


# ----------------------------------------------------------------------------- finetune (LangCell-CE)
def finetune(ctx: Context, out: Path) -> tuple[dict, str]:
    from langcell.eval.train import CellClassifier, predict_classifier, train_classifier

    fcfg = ctx.cfg.finetune
    per_method = {"langcell_ce": [], "logreg": [], "knn": []}
    for seed in fcfg.seeds:
        train, test = stratified_split(ctx.y, fcfg.test_size, seed)
        clf = CellClassifier(ctx.model, len(ctx.classes)).to(ctx.cfg.device)
        train_classifier(clf, [ctx.data.input_ids[i] for i in train], ctx.y[train], fcfg.epochs, fcfg.lr,
                         fcfg.batch_size, seed, ctx.vocab.pad_id, desc=f"finetune seed={seed}",
                         warmup_ratio=fcfg.warmup_ratio, weight_decay=fcfg.weight_decay,
                         probe_steps=fcfg.probe_steps, probe_l2=fcfg.probe_l2)
        pred = predict_classifier(clf, [ctx.data.input_ids[i] for i in test], pad_id=ctx.vocab.pad_id)
        per_method["langcell_ce"].append(M.classification_metrics(ctx.y[test], pred))
        base = baselines(ctx.data.expression[train], ctx.y[train], ctx.data.expression[test], ctx.y[test], seed)
        per_method["logreg"].append(base["logreg"])
        per_method["knn"].append(base["knn"])
    results = {m: {**_summary(r), "runs": [{k: x[k] for k in ("accuracy", "macro_f1", "n_cells")} for x in r]}
               for m, r in per_method.items()}
    rows = [{"method": m, "accuracy": f"{s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f}",
             "macro F1": f"{s['macro_f1_mean']:.4f} ± {s['macro_f1_std']:.4f}"} for m, s in results.items()]
    probe = (f"the head first fitted alone on the frozen encoder's standardised pooled states ({fcfg.probe_steps} "
             f"L-BFGS steps, L2 {fcfg.probe_l2:g}), then " if fcfg.probe_steps > 0 else "")
    body = ["## Fine-tuning (LangCell-CE)", f"Cell encoder + linear head on the pooled cell state "
            f"(`{ctx.model.cell_pooling}` pooling, as the model records it), cross-entropy; {probe}every weight "
            f"trained {fcfg.epochs} epochs with AdamW (lr {fcfg.lr:g}, {fcfg.warmup_ratio:.0%} linear warm-up, "
            f"linear decay). Stratified {1 - fcfg.test_size:.2f}:{fcfg.test_size:.2f} train/test split, seeds "
            f"{fcfg.seeds}; baselines on the same splits (`{ctx.data.expression_kind}` expression).", "",
            R.table(rows, ["method", "accuracy", "macro F1"])]
    return {"test_size": fcfg.test_size, "seeds": fcfg.seeds, "results": results}, "\n".join(body)


# ----------------------------------------------------------------------------- retrieval
def retrieval(ctx: Context, out: Path, scores: dict | None = None) -> tuple[dict, str]:
    if scores is None:
        scores = zero_shot_scores(ctx)
    ks = ctx.cfg.retrieval.ks
    by_sim = M.retrieval_recall(scores["sim"], ctx.y, ks)
    by_fused = M.retrieval_recall(scores["fused"], ctx.y, ks)
    metrics = {"similarity": by_sim, "fused_cell_to_text": {k: v for k, v in by_fused.items() if k.startswith("cell")}}
    rows = [{"direction": "cell->text (similarity)", **{f"R@{k}": by_sim[f"cell_to_text_R@{k}"] for k in ks}},
            {"direction": "cell->text (fused score)", **{f"R@{k}": by_fused[f"cell_to_text_R@{k}"] for k in ks}},
            {"direction": "text->cell (similarity)", **{f"R@{k}": by_sim[f"text_to_cell_R@{k}"] for k in ks}},
            {"direction": "text->cell precision", **{f"R@{k}": by_sim[f"text_to_cell_P@{k}"] for k in ks}}]
    body = ["## Cell-text retrieval",
            f"{by_sim['n_cells']} held-out cells, {by_sim['n_texts']} texts (a text is a cell type's description; "
            "several cells share one). cell->text R@k: share of cells whose own type's text ranks in the top k. "
            "text->cell R@k: share of texts with at least one cell of that type among the k best cells; "
            "the precision row gives the mean share of right cells among those k.", "",
            R.table(rows, ["direction", *[f"R@{k}" for k in ks]])]
    return metrics, "\n".join(body)


# ----------------------------------------------------------------------------- integration
def integration(ctx: Context, out: Path, scores: dict | None = None) -> tuple[dict, str]:
    from sklearn.decomposition import TruncatedSVD

    if scores is None:
        scores = zero_shot_scores(ctx)
    icfg = ctx.cfg.integration
    labels = ctx.y
    embeddings = {"langcell": scores["embeds"]}
    # Baseline: the usual 50-component PCA (SVD of the sparse matrix) of the expression matrix.
    n_comp = int(min(50, ctx.data.expression.shape[1] - 1, len(labels) - 1))
    embeddings[f"pca_{ctx.data.expression_kind}"] = TruncatedSVD(n_comp, random_state=ctx.cfg.seed).fit_transform(
        ctx.data.expression)
    results = {}
    for name, emb in embeddings.items():
        res = {"silhouette_label": M.silhouette_label(emb, labels)}
        res.update(M.cluster_agreement(emb, labels, ctx.cfg.seed, icfg.leiden_resolution))
        if ctx.batches is not None:
            res["silhouette_batch"] = M.silhouette_batch(emb, labels, ctx.batches)
            res["knn_batch_mixing"] = M.knn_batch_mixing(emb, ctx.batches, icfg.knn)
        results[name] = res
    colourings = {"label": np.asarray(ctx.classes)[labels]}
    if ctx.batches is not None:
        colourings["dataset"] = ctx.batches
    plot = _embedding_plot(ctx, scores["embeds"], colourings, out / "integration_embedding.png",
                           f"LangCell embeddings ({ctx.cfg.embedding_plot})")
    cols = ["embedding", "silhouette_label", "silhouette_batch", "knn_batch_mixing", "kmeans_nmi", "kmeans_ari",
            "leiden_nmi", "leiden_ari"]
    body = ["## Batch integration",
            "Silhouettes as scIB defines them (label ASW rescaled to [0, 1]; batch ASW = 1 - |silhouette by batch| "
            "within each label), NMI/ARI of k-means (k = number of types) and Leiden clusters against the labels, "
            "kNN batch mixing = neighbourhood batch entropy / global batch entropy. Computed with scikit-learn, "
            "igraph and leidenalg: `scib-metrics` pulls in jax, which this CPU environment does not carry.", "",
            R.table([{"embedding": k, **v} for k, v in results.items()], cols), "", f"![embedding]({plot})"]
    return results, "\n".join(body)
