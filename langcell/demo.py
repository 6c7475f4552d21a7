"""`langcell demo`: the whole pipeline on the embedded mini-Census, from nothing to a report.

ingest (real PBMCs + synthetic cells) -> scLibrary (Geneformer v1 vocabulary, a cell-level split
stratified by cell type) -> pre-training stage 1 and 2 (DeepSpeed on CPU, the same code path as a
GPU run) -> export -> zero-shot accuracy of every stage-2 checkpoint (the learning curve) and the
eval suite on the real PBMC cells that pre-training never saw.

Each step writes into its own folder under `out` and is skipped on a rerun once complete (every
stage is itself resumable, so a killed demo picks up where it stopped).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from langcell.core.config import from_dict, load_yaml
from langcell.core.errors import LangCellError
from langcell.core.files import atomic_write_bytes, atomic_write_json, display_path, output_lock

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "demo"
INGEST_CONFIG_DIR = CONFIG_DIR.parent / "ingest"
LOSS_KEYS = ("loss", "mlm", "cell_cell", "cell_text", "ctm")


def ctm_prior_entropy(balanced: bool) -> float:
    """The matching loss of a head that learned nothing but its label ratio: 1 match : 2 hard
    negatives (BLIP), or 1 : 1 for every text when pairs are balanced per text."""
    if balanced:
        return math.log(2)
    return -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)


@dataclass
class DemoConfig:
    synthetic_cells: int = 4000     # scale for pre-training; never evaluated
    synthetic_seed: int = 0
    # configs/ingest/<name>.yaml: cell types of their own, none shared with the real PBMCs
    synthetic_config: str = "synth_census_demo"
    split_fractions: list = field(default_factory=lambda: [0.6, 0.07, 0.33])
    max_length: int = 512           # PBMC cells in the demo carry at most 765 measured genes
    pretrain_config: str = "demo"   # configs/pretrain/<name>.yaml
    stage1_steps: int | None = None  # None: the pretrain config's max_steps
    stage2_steps: int | None = None
    eval_config: str = "demo"       # configs/eval/<name>.yaml
    seed: int = 0                   # pre-training's seed (`langcell demo --seed`); the library stays the same


def load_demo_config(name_or_path: str) -> tuple[DemoConfig, Path]:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    return from_dict(DemoConfig, load_yaml(path), str(path)), path


class _StepMemory:
    """Peak resident memory of each step this invocation runs: the process's high-water mark,
    reset as each step starts (Linux's /proc/self/clear_refs), and for pre-training, which runs
    in a process of its own, the peak that process logs. Kept in OUT/peak_memory.json across
    resumed invocations."""

    def __init__(self):
        self.current, self.peaks = None, {}

    def start(self, name: str) -> None:
        self.finish()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # not Linux: the mark then includes earlier steps (an upper bound)
            pass
        self.current = name

    def finish(self) -> None:
        if self.current is not None:
            self.record(self.current, _high_water_gb())
            self.current = None

    def record(self, name: str, gb: float | None) -> None:
        if gb is not None:
            self.peaks[name] = max(gb, self.peaks.get(name, 0.0))

    def save(self, out: Path) -> dict:
        """All steps' peaks so far, in the order the steps first ran."""
        path = out / "peak_memory.json"
        peaks = {row["step"]: row["gb"] for row in (json.loads(path.read_text()) if path.is_file() else [])}
        peaks.update(self.peaks)
        atomic_write_json(path, [{"step": name, "gb": gb} for name, gb in peaks.items()])
        return peaks


def _high_water_gb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


_memory = _StepMemory()


def _step(name: str, done: bool):
    print(f"[demo] {name}: {'done earlier, reused' if done else 'running'}", flush=True)
    if done:
        _memory.finish()
    else:
        _memory.start(name)
    return not done


def _is_complete(manifest: Path) -> bool:
    try:
        return json.loads(manifest.read_text()).get("complete") is True
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _run_cli(args: list[str]) -> None:
    """Pre-training runs as its own process, exactly as a user launches it (one CPU rank)."""
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    proc = subprocess.run([sys.executable, "-m", "langcell.cli", *args], env=env)
    if proc.returncode != 0:
        raise LangCellError(f"`langcell {' '.join(args)}` failed with status {proc.returncode}; "
                            "see its output above, then rerun `langcell demo` to resume")


def run_demo(out: str | os.PathLike, config: str = "default", seed: int | None = None) -> Path:
    """Run (or resume) the demo into `out`; returns the path of `out/report.md`."""
    cfg, _ = load_demo_config(config)
    if seed is not None:
        cfg.seed = seed
    out = Path(out)
    started = time.time()
    with output_lock(out):
        _check_same_config(out, cfg)
        stores = _make_stores(out, cfg)
        ingests = _ingest(out, stores)
        library = _build(out, ingests, cfg)
        eval_data = _held_out_real_cells(out, library)
        export = _pretrain_and_export(out, library, cfg)
        curve = _learning_curve(out, library, eval_data, cfg)
        report_dir = out / "eval"
        if _step("eval suite", (report_dir / "metrics.json").is_file()):
            from langcell.eval.suite import run_suite
            run_suite(cfg.eval_config, model=str(export), data=str(eval_data), out=str(report_dir),
                      library=str(library))
        _memory.finish()
        peaks = _memory.save(out)
        report = _write_report(out, cfg, config, library, eval_data, report_dir, curve, time.time() - started, peaks)
    print(f"[demo] report: {report}")
    return report


def _check_same_config(out: Path, cfg: DemoConfig) -> None:
    """Finished steps are reused only by a rerun of the same config (and seed)."""
    from dataclasses import asdict

    path = out / "demo_config.json"
    if path.is_file() and json.loads(path.read_text()) != asdict(cfg):
        raise LangCellError(f"{path}: this folder holds a demo run with another config or seed; "
                            "pass another --out (or delete the folder)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, asdict(cfg))


def _make_stores(out: Path, cfg: DemoConfig) -> dict[str, Path]:
    from langcell.ingest.soma_store import is_soma_store

    stores = {"real": out / "stores" / "demo-census"}
    if _step("mini-Census of real cells (scanpy pbmc68k_reduced + celltypist sample)", is_soma_store(stores["real"])):
        from langcell.ingest.demo_census import build_demo_census
        build_demo_census(stores["real"])
    if cfg.synthetic_cells <= 0:
        return stores
    stores["synthetic"] = out / "stores" / "synth-census"
    if _step(f"synthetic store ({cfg.synthetic_cells} cells)", is_soma_store(stores["synthetic"])):
        from langcell.ingest.synth_census import build_synth_census
        build_synth_census(stores["synthetic"], cfg.synthetic_cells, seed=cfg.synthetic_seed,
                           config=INGEST_CONFIG_DIR / f"{cfg.synthetic_config}.yaml")
    return stores


def _ingest(out: Path, stores: dict[str, Path]) -> list[Path]:
    from langcell.ingest.census import ingest_census
    from langcell.ingest.ontology import ingest_ontologies

    ingests = []
    for kind, store in stores.items():
        target = out / "ingest" / kind
        if _step(f"ingest {kind} cells", _is_complete(target / "manifest.json")):
            ingest_census(target, uri=str(store))
        if _step(f"ontology terms for {kind} cells", (target / "ontology" / "terms.parquet").is_file()):
            ingest_ontologies(target, source="guide")
        ingests.append(target)
    return ingests


def _build(out: Path, ingests: list[Path], cfg: DemoConfig) -> Path:
    from langcell.build_sclibrary.build import build_library
    from langcell.build_sclibrary.config import load_build_config

    library = out / "sclibrary"
    if _step("scLibrary (Geneformer v1 tokens, cell-level split)", _is_complete(library / "manifest.json")):
        build_library(ingests, library,
                      load_build_config(None, {"vocab": "geneformer-v1", "split_by": "cell",
                                               "fractions": cfg.split_fractions, "max_length": cfg.max_length}))
    return library


def _held_out_real_cells(out: Path, library: Path) -> Path:
    """The test split's real PBMC cells: labelled, real, and never seen in pre-training."""
    from datasets import load_from_disk

    from langcell.ingest.demo_census import PBMC68K_DATASET

    target = out / "eval_data" / "pbmc_test"
    if _step("held-out real PBMC cells", (target / "dataset_info.json").is_file()):
        test = load_from_disk(str(library / "hf" / "test"))
        real = test.filter(lambda row: row["dataset_id"] == PBMC68K_DATASET)
        if len(real) == 0:
            raise LangCellError(f"{library}/hf/test: no cell of dataset '{PBMC68K_DATASET}'; "
                                "rebuild the library with a test fraction above 0")
        tmp = target.with_name(target.name + ".tmp")
        real.save_to_disk(str(tmp))
        tmp.rename(target)
    return target


def _pretrain_and_export(out: Path, library: Path, cfg: DemoConfig) -> Path:
    run, export = out / "run", out / "export"
    pretrain_config = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / f"{cfg.pretrain_config}.yaml")
    for stage, steps in ((1, cfg.stage1_steps), (2, cfg.stage2_steps)):
        if _step(f"pre-training stage {stage}", (run / f"stage{stage}" / "done.json").is_file()):
            args = ["pretrain", "--config", pretrain_config, "--data", str(library), "--out", str(run),
                    "--stage", str(stage), "--seed", str(cfg.seed)]
            _run_cli(args + (["--max-steps", str(steps)] if steps else []))
            logged = [json.loads(line) for line in (run / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
            _memory.record(f"pre-training stage {stage}", max(r.get("peak_memory_gb") or 0.0 for r in logged))
    if _step("export (published LangCell layout)", (export / "langcell_config.json").is_file()):
        from langcell.pretrain.engine import export_run
        export_run(run, export)
    return export


def _learning_curve(out: Path, library: Path, eval_data: Path, cfg: DemoConfig) -> dict:
    """Zero-shot on the held-out cells at every stage-2 checkpoint, with the references; each
    point is saved as it is scored, so a killed demo resumes at the next checkpoint."""
    import shutil
    import tempfile

    from langcell.eval.learning_curve import checkpoint_zero_shot, curve_png, references
    from langcell.eval.settings import load_eval_config
    from langcell.pretrain.engine import checkpoint_tags, export_run

    path = out / "learning_curve.json"
    curve = json.loads(path.read_text()) if path.is_file() else {"points": []}
    done = {p["step"] for p in curve["points"]}
    tags = checkpoint_tags(out / "run", 2)
    if not _step("zero-shot at every stage-2 checkpoint", "references" in curve and done >= {s for s, _ in tags}):
        return curve
    settings = {"data": str(eval_data), "library": str(library), "out": str(out / "eval")}
    if "references" not in curve:
        curve["references"] = references(load_eval_config(cfg.eval_config, {**settings, "model": str(out / "export")}),
                                         library / "hf" / "train")
    for step, tag in tags:
        if step in done:
            continue
        tmp = Path(tempfile.mkdtemp(prefix=".curve-", dir=out))
        try:
            export = export_run(out / "run", tmp / "export", tag)
            point = checkpoint_zero_shot(load_eval_config(cfg.eval_config, {**settings, "model": str(export)}))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        curve["points"] = sorted(curve["points"] + [{"step": step, **point}], key=lambda p: p["step"])
        atomic_write_json(path, curve)
    curve_png(curve["points"], curve["references"], out / "learning_curve.png",
              "zero-shot on held-out real PBMCs during stage 2")
    atomic_write_json(path, curve)
    return curve


def _write_report(out: Path, cfg: DemoConfig, config: str, library: Path, eval_data: Path,
                  report_dir: Path, curve: dict, seconds: float, peaks: dict) -> Path:
    from datasets import load_from_disk

    from langcell.ingest.demo_census import CELLTYPIST_DATASET, PBMC68K_DATASET
    from langcell.pretrain.config import load_pretrain_config

    real_datasets = (PBMC68K_DATASET, CELLTYPIST_DATASET)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    test = load_from_disk(str(eval_data))
    counts = Counter(test["cell_type"])
    n_test = sum(counts.values())
    summaries = {s: json.loads((out / "run" / f"stage{s}" / "done.json").read_text()) for s in (1, 2)}
    balanced = load_pretrain_config(cfg.pretrain_config).ctm_balance_texts
    prior = ctm_prior_entropy(balanced)
    ratio = "1 : 1 for every text" if balanced else "1 match : 2 non-matches"
    per_split = {split: Counter(load_from_disk(str(library / "hf" / split))["dataset_id"])
                 for split in ("train", "val", "test")}
    datasets = sorted(set().union(*per_split.values()))
    lines = [
        "# LangCell demo report",
        "",
        f"Config `{display_path(config)}`, pre-training seed {cfg.seed}; this invocation took {seconds / 60:.1f} min. "
        "Every number below is read from the files the pipeline wrote; none is typed by hand.",
        "",
        "## Cells per split and dataset: which are real, which are synthetic",
        "",
        "| dataset | kind | " + " | ".join(per_split) + " |",
        "|---|---|" + "---|" * len(per_split),
    ]
    for dataset in datasets:
        kind = "real" if dataset in real_datasets else "synthetic"
        lines.append(f"| {dataset} | {kind} | " + " | ".join(str(per_split[s].get(dataset, 0)) for s in per_split) + " |")
    lines += [
        "",
        "Real cells come from data shipped in PyPI packages: scanpy's pbmc68k_reduced (700 PBMCs, 10 "
        "FACS-sorted types) and celltypist's sample (559 unlabelled cells). Synthetic cells "
        "(`langcell ingest synth-census`) only give pre-training more cells; they are never evaluated.",
        "",
        "## Pre-training",
        "",
        "| stage | steps | last losses | cells/s |",
        "|---|---|---|---|",
    ]
    for stage, summary in summaries.items():
        losses = ", ".join(f"{k} {summary[k]:.3f}" for k in LOSS_KEYS if summary.get(k) is not None)
        lines.append(f"| {stage} | {summary.get('step')} | {losses} | {summary.get('cells_per_s', 0):.1f} |")
    zs = metrics.get("zero-shot", {})
    refs = curve["references"]
    final = curve["points"][-1] if curve["points"] else {}
    majority = max(counts.values()) / n_test
    lines += [
        "",
        f"The matching loss (ctm) starts at {prior:.3f}, the entropy of its labels ({ratio}); "
        "below it, the matching head tells true descriptions from hard negatives.",
        "",
        f"## Zero-shot annotation of {n_test} held-out real PBMC cells ({len(counts)} types)",
        "",
        "| | accuracy | macro-F1 |",
        "|---|---|---|",
        f"| LangCell (this demo model) | {zs.get('accuracy', float('nan')):.3f} | {zs.get('macro_f1', float('nan')):.3f} |",
        f"| LangCell, similarity only (no matching head) | {final.get('similarity_only_accuracy', float('nan')):.3f} "
        f"| {final.get('similarity_only_macro_f1', float('nan')):.3f} |",
        f"| logistic regression on the {refs['logreg_train_cells']} labelled PBMCs pre-training saw "
        f"| {refs['logreg_accuracy']:.3f} | {refs['logreg_macro_f1']:.3f} |",
        f"| chance (uniform over {len(counts)} types) | {1 / len(counts):.3f} | |",
        f"| majority class ({counts.most_common(1)[0][0]}) | {majority:.3f} | |",
        "",
        "### During stage 2",
        "",
        "![zero-shot accuracy at every stage-2 checkpoint](learning_curve.png)",
        "",
        "| step | accuracy | macro-F1 | similarity-only accuracy | similarity-only macro-F1 |",
        "|---|---|---|---|---|",
        *(f"| {p['step']} | {p['accuracy']:.3f} | {p['macro_f1']:.3f} | {p['similarity_only_accuracy']:.3f} "
          f"| {p['similarity_only_macro_f1']:.3f} |" for p in curve["points"]),
        "",
        "## Peak memory per step",
        "",
        "Resident memory at its highest during each step (the process's high-water mark, reset as the "
        "step starts; pre-training runs in its own process and logs its own). Steps reused from an "
        "earlier invocation keep the figure that invocation measured.",
        "",
        "| step | peak RSS (GB) |",
        "|---|---|",
        *(f"| {name} | {gb:.2f} |" for name, gb in peaks.items()),
        "",
        f"The full evaluation (few-shot against logistic regression and kNN, retrieval, integration, "
        f"plots) is in [{report_dir.name}/report.md]({report_dir.name}/report.md).",
        "",
    ]
    report = out / "report.md"
    atomic_write_bytes(report, "\n".join(lines).encode())
    atomic_write_json(out / "demo_summary.json", {
        "zero_shot": zs, "similarity_only": {k: final.get(f"similarity_only_{k}") for k in ("accuracy", "macro_f1")},
        "logreg": {k: refs[f"logreg_{k}"] for k in ("accuracy", "macro_f1")}, "chance": 1 / len(counts),
        "majority": majority, "n_test": n_test, "seed": cfg.seed, "stage2": summaries[2],
        "ctm_prior_entropy": prior, "seconds": seconds,
        "peak_memory_gb": [{"step": name, "gb": gb} for name, gb in peaks.items()]})
    return report
