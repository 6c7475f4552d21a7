"""The build's stats report: `stats.md` and `stats.png` (token lengths, text lengths, cells per
split, cell type, tissue and disease)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from langcell.core.files import atomic_path

TOP = 20


def _merge_hist(records: list[dict], key: str) -> dict[int, int]:
    total: Counter = Counter()
    for record in records:
        total.update({int(k): v for k, v in record[key].items()})
    return dict(sorted(total.items()))


def _quantiles(hist: dict[int, int], scale: int = 1) -> dict:
    if not hist:
        return {"mean": 0.0, "median": 0.0, "min": 0, "max": 0}
    values = np.array(list(hist.keys()), dtype=np.float64) * scale
    weights = np.array(list(hist.values()), dtype=np.float64)
    cumulative = np.cumsum(weights)
    median = values[int(np.searchsorted(cumulative, cumulative[-1] / 2))]
    return {"mean": round(float((values * weights).sum() / weights.sum()), 2), "median": float(median),
            "min": float(values.min()), "max": float(values.max())}


def write_stats(out: Path, records: list[dict], splits: dict, split_names, text_bin: int) -> dict:
    lengths = _merge_hist(records, "lengths")
    text_lengths = _merge_hist(records, "text_lengths")
    by = {name: Counter() for name in ("cell_type", "tissue", "disease")}
    per_split = {name: {s: Counter() for s in split_names} for name in by}
    for record in records:
        for name, counts in record["counts"].items():
            for key, n in counts.items():
                split, label = key.split("\t", 1)
                by[name][label] += n
                per_split[name][split][label] += n
    summary = {"token_length": _quantiles(lengths), "text_length_chars": _quantiles(text_lengths, text_bin),
               "n_cell_types": len(by["cell_type"]), "n_tissues": len(by["tissue"]),
               "n_diseases": len(by["disease"]),
               "cells_per_split": {s: splits[s]["n_cells"] for s in split_names},
               "shards_per_split": {s: len(splits[s]["shards"]) for s in split_names}}
    lines = ["# scLibrary build stats", "",
             "| split | cells | shards |", "| --- | ---: | ---: |"]
    lines += [f"| {s} | {splits[s]['n_cells']:,} | {len(splits[s]['shards'])} |" for s in split_names]
    skipped = sum(r["n_skipped_no_vocab_gene"] for r in records)
    lines += ["", f"Cells read: {sum(r['n_cells_in'] for r in records):,}; skipped (no expressed vocabulary gene): "
              f"{skipped:,}.", "",
              f"Token length (with <cls>): mean {summary['token_length']['mean']}, median "
              f"{summary['token_length']['median']:.0f}, range {summary['token_length']['min']:.0f}.."
              f"{summary['token_length']['max']:.0f}.",
              f"Text length (all aspects, characters, {text_bin}-character bins): mean "
              f"{summary['text_length_chars']['mean']}, median {summary['text_length_chars']['median']:.0f}.", ""]
    for name, counter in by.items():
        lines += [f"## Cells per {name.replace('_', ' ')} (top {TOP} of {len(counter)})", "",
                  "| " + name + " | " + " | ".join(split_names) + " | total |",
                  "| --- |" + " ---: |" * (len(split_names) + 1)]
        for label, n in counter.most_common(TOP):
            lines.append(f"| {label} | " + " | ".join(str(per_split[name][s][label]) for s in split_names)
                         + f" | {n} |")
        lines.append("")
    lines.append("![stats](stats.png)")
    with atomic_path(out / "stats.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    _plot(out / "stats.png", lengths, text_lengths, text_bin, splits, split_names, by)
    return summary


def _plot(path: Path, lengths: dict, text_lengths: dict, text_bin: int, splits: dict, split_names, by: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ax = axes[0, 0]
    ax.bar(list(lengths.keys()), list(lengths.values()), width=max(1, max(lengths or {1: 0}) / 100))
    ax.set(title="tokens per cell (with <cls>)", xlabel="tokens", ylabel="cells")
    ax = axes[0, 1]
    ax.bar([k * text_bin for k in text_lengths], list(text_lengths.values()), width=text_bin)
    ax.set(title="text length per cell (all aspects)", xlabel="characters", ylabel="cells")
    ax = axes[0, 2]
    ax.bar(list(split_names), [splits[s]["n_cells"] for s in split_names])
    ax.set(title="cells per split", ylabel="cells")
    for ax, name in zip(axes[1], ("cell_type", "tissue", "disease")):
        top = by[name].most_common(15)[::-1]
        ax.barh([label[:40] for label, _ in top], [n for _, n in top])
        ax.set(title=f"cells per {name.replace('_', ' ')} (top 15)", xlabel="cells")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
