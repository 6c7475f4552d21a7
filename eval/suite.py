"""Run one eval task, or the whole suite from one config, into a report folder."""

from __future__ import annotations

import datetime
from pathlib import Path

from langcell.core.errors import LangCellError
from langcell.core.files import display_path, output_lock
from langcell.eval import report as R
from langcell.eval import tasks as T
from langcell.eval.settings import TASKS, EvalConfig, load_eval_config

_RUNNERS = {"zero-shot": T.zero_shot, "few-shot": T.few_shot, "finetune": T.finetune,
            "retrieval": T.retrieval, "integration": T.integration}
# These three read the same zero-shot scores; the suite computes them once.
_SHARE_SCORES = ("zero-shot", "retrieval", "integration")


def run_tasks(cfg: EvalConfig, tasks: list[str]) -> dict:
    """Run `tasks` with `cfg` into cfg.out; writes metrics.json and one combined report.md."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise LangCellError(f"eval config: unknown task '{(unknown or ['(none)'])[0]}'; choose from {', '.join(TASKS)}")
    if not cfg.out:
        raise LangCellError("eval config: 'out' is required; pass --out REPORT")
    out = Path(cfg.out)
    # Model and data are checked before the report folder exists: bad input leaves nothing behind.
    ctx = T.build_context(cfg)
    with output_lock(out):
        scores = T.zero_shot_scores(ctx) if any(t in _SHARE_SCORES for t in tasks) else None
        all_metrics, bodies = {}, []
        for task in tasks:
            runner = _RUNNERS[task]
            metrics, body = runner(ctx, out, scores) if task in _SHARE_SCORES else runner(ctx, out)
            all_metrics[task] = metrics
            bodies.append(body)
        model, data = display_path(cfg.model), display_path(cfg.data)
        header = {"model": model, "data": data, "n_cells": len(ctx.data),
                  "label_key": cfg.label_key, "batch_key": cfg.batch_key, "classes": ctx.classes,
                  "expression": ctx.data.expression_kind,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        intro = (f"Model `{model}`, data `{data}` ({len(ctx.data)} cells, {len(ctx.classes)} types in "
                 f"`{cfg.label_key}`), run {header['date']}.")
        R.write_report(out, "LangCell evaluation", {"run": header, **all_metrics}, intro + "\n\n" + "\n\n".join(bodies))
    return all_metrics


def headline(metrics: dict) -> dict:
    """The few numbers per task worth printing on a terminal (metrics.json has the rest)."""
    out = {}
    for task, m in metrics.items():
        if task == "zero-shot":
            out[task] = {k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1")}
            out[task]["ontology_accuracy"] = m["ontology"]["ontology_accuracy"]
        elif task == "retrieval":
            out[task] = {k: v for k, v in m["similarity"].items() if "@" in k}
        elif task == "integration":
            out[task] = {emb: {k: v for k, v in r.items() if k in ("silhouette_label", "silhouette_batch",
                                                                    "leiden_nmi", "knn_batch_mixing")}
                         for emb, r in m.items()}
        elif task == "few-shot":
            out[task] = {f"{n}-shot": {meth: r["accuracy_mean"] for meth, r in by.items()}
                         for n, by in m["results"].items()}
        elif task == "finetune":
            out[task] = {meth: r["accuracy_mean"] for meth, r in m["results"].items()}
    return out


def run_task(task: str, model: str, data: str, out: str, label_key: str = "cell_type",
             batch_key: str | None = "dataset_id", config: str | Path | None = None, **overrides) -> dict:
    """One task (`zero-shot`, `few-shot`, `finetune`, `retrieval`, `integration`) into `out`."""
    cfg = load_eval_config(config, {"model": str(model), "data": str(data), "out": str(out),
                                    "label_key": label_key, "batch_key": batch_key, **overrides})
    return run_tasks(cfg, [task])


def run_suite(config: str | Path | None = None, model: str | None = None, data: str | None = None,
              out: str | None = None, **overrides) -> dict:
    """Every task listed in the config's `tasks`, one combined report.md and metrics.json in `out`.

    `config` is a YAML path or a name in configs/eval/ (default `default`); `model`, `data`, `out`
    and any top-level config key given here override the file.
    """
    given = {k: str(v) for k, v in (("model", model), ("data", data), ("out", out)) if v is not None}
    cfg = load_eval_config(config, {**given, **overrides})
    return run_tasks(cfg, list(cfg.tasks))
