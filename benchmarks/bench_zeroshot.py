"""Zero-shot scoring speed: batched top-k matching vs LangCell's per-class loop.

Both paths share the model, the cells, the cell encoding and the similarity step; they differ
only in how the matching head is run:
- `loop` (LangCell's zero-shot notebook): for each candidate class, one matching pass over the
  whole cell batch (class text repeated B times), then softmax over classes of the probabilities;
  texts are tokenised once up front, which is generous to the loop (the notebook re-tokenises
  every class for every batch);
- `topk` (eval.scoring): each cell's k most similar classes only, all B*k pairs of the batch packed
  into passes of `pair_batch` pairs.
Reported: cells/s of the whole scoring (cell encoding included) and accuracy of both.

Without --model/--data it trains a tiny model on a synthetic 100-type task (real CL types and
descriptions, signature genes) and measures on held-out cells of it; 10 candidates = the cells
of 10 of those types scored against those 10 types.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _args(argv):
    p = argparse.ArgumentParser(prog="bench_zeroshot", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="export folder (default: train a tiny synthetic model)")
    p.add_argument("--data", help=".h5ad or LIB/hf/<split> with --label-key (default: synthetic cells)")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    p.add_argument("--cells", type=int, default=600, help="cells scored per setting")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pair-batch", type=int, default=512)
    p.add_argument("--train-steps", type=int, default=300, help="steps of the synthetic model's training")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def _synthetic(root: Path, n_types: int, cells: int, steps: int):
    from eval import synthetic

    types = synthetic.many_types(n_types, seed=0)
    n_genes = 8 * n_types + 60
    synthetic.write_vocab(root / "vocab", n_genes)
    per_class = max(2, -(-cells // n_types))
    kw = dict(n_genes=n_genes, n_signature=8, types=types, background=0.05)
    train = synthetic.make_adata(n_per_class=12, seed=1, **kw)
    test = synthetic.make_adata(n_per_class=per_class, seed=2, **kw)
    test.write_h5ad(root / "test.h5ad")
    export = synthetic.train_tiny_export(root / "export", train, root / "vocab", steps=steps, lr=2e-3,
                                         batch_size=32, match_negatives=4)
    return export, root / "test.h5ad"


def _run(scorer_kwargs, model, texts, seqs, y, batch_size, pad_id):
    import torch

    from eval.scoring import TopKScorer, score_cells

    torch.manual_seed(0)
    scorer = TopKScorer(model, texts, **scorer_kwargs)
    start = time.perf_counter()
    res = score_cells(scorer, seqs, batch_size, desc=scorer_kwargs.get("method", "topk"), pad_id=pad_id)
    seconds = time.perf_counter() - start
    return {"cells_per_s": len(seqs) / seconds, "seconds": seconds,
            "accuracy": float((res["fused"].argmax(1) == y).mean())}


def main(argv=None) -> dict:
    import torch

    from eval.data import load_eval_data
    from eval.model_io import cell_max_length, load_model
    from eval.ontology import CellOntology
    from eval.tasks import class_descriptions

    args = _args(argv if argv is not None else [])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        if args.model and args.data:
            export, data_path = args.model, args.data
        else:
            export, data_path = _synthetic(Path(tmp), max(args.classes), args.cells, args.train_steps)
        model, vocab = load_model(export)
        data = load_eval_data(data_path, vocab, args.label_key, None, max_length=cell_max_length(model))
    labels = data.obs[args.label_key].astype(str).to_numpy()
    all_classes = sorted(set(labels))
    ontology = CellOntology.load()
    rows = []
    for n_classes in args.classes:
        if n_classes > len(all_classes):
            raise SystemExit(f"--classes {n_classes}: the data has only {len(all_classes)} types")
        classes = all_classes[:n_classes] if n_classes < len(all_classes) else all_classes
        keep = np.flatnonzero(np.isin(labels, classes))
        keep = np.random.default_rng(0).permutation(keep)[: args.cells]
        seqs = [data.input_ids[i] for i in keep]
        y = np.array([classes.index(labels[i]) for i in keep])
        texts, _ = class_descriptions(classes, {}, ontology)
        loop = _run({"method": "loop"}, model, texts, seqs, y, args.batch_size, vocab.pad_id)
        topk = _run({"top_k": args.top_k, "pair_batch": args.pair_batch}, model, texts, seqs, y,
                    args.batch_size, vocab.pad_id)
        rows.append({"classes": n_classes, "cells": len(seqs), "loop_cells_per_s": loop["cells_per_s"],
                     "topk_cells_per_s": topk["cells_per_s"], "speedup": topk["cells_per_s"] / loop["cells_per_s"],
                     "loop_accuracy": loop["accuracy"], "topk_accuracy": topk["accuracy"]})
    result = {"top_k": args.top_k, "batch_size": args.batch_size, "pair_batch": args.pair_batch,
              "model": args.model or "synthetic tiny (2+2 layers, hidden 32)", "threads": torch.get_num_threads(),
              "machine": platform.machine(), "rows": rows}
    print(f"| candidates | cells | LangCell loop cells/s | top-{args.top_k} batched cells/s | speed-up | "
          "loop accuracy | top-k accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['classes']} | {r['cells']} | {r['loop_cells_per_s']:.1f} | {r['topk_cells_per_s']:.1f} | "
              f"{r['speedup']:.1f}x | {r['loop_accuracy']:.4f} | {r['topk_accuracy']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(__import__("sys").argv[1:])
