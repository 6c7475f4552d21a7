"""`langcell ingest synth-census`: a synthetic Census-schema SOMA store of any size, for scale tests.

Cells carry real CL/UBERON/MONDO/EFO/HsapDv/PATO/HANCESTRO ids and labels (looked up in the
ontology guide) and real Ensembl ids (a subset of the Geneformer v1 vocabulary). Expression:
- a shared log-normal gene baseline;
- a gene program per cell type, added to the programs of all its ancestors among the configured
  types (the nearest ancestor in CL), so a subtype looks like its parent plus something;
- negative binomial noise as a Gamma mixture: each type has `states_per_type` expression states
  whose gene rates are the type profile times Gamma(nb_shape) noise, and a cell samples one;
- a batch effect per dataset: `batch_strength` of every cell's UMIs come from its dataset's profile;
- depth set per cell so that the expected number of detected genes hits a target drawn in
  `genes_detected`.

Sampling is O(UMIs): each profile is a quantised lookup table of 2**17 slots (gene g holds
round(p_g * 2**17) of them), so one UMI is one random slot. The store is written chunk by chunk;
memory stays flat in the number of cells. Same seed and config -> the same store.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from langcell.core.errors import LangCellError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ingest" / "synth_census.yaml"
GENEFORMER_DIR = Path(__file__).resolve().parents[1] / "build_sclibrary" / "reference" / "geneformer_v1"
TABLE_BITS = 17
_DEPTH_GRID = np.geomspace(50, 400_000, 96)


@dataclass
class SynthConfig:
    n_genes: int = 8000
    genes_detected: list = field(default_factory=lambda: [1000, 5000])
    n_datasets: int = 12
    donors_per_dataset: int = 4
    batch_strength: float = 0.15
    program_genes: int = 120
    program_log_fold: float = 1.6
    baseline_log_sd: float = 1.2
    nb_shape: float = 4.0
    states_per_type: int = 8
    chunk_cells: int = 1024
    tissues: list = field(default_factory=list)
    diseases: dict = field(default_factory=dict)
    assays: list = field(default_factory=list)
    development_stages: list = field(default_factory=list)
    sexes: list = field(default_factory=list)
    self_reported_ethnicities: list = field(default_factory=list)

    def __post_init__(self):
        lo, hi = (self.genes_detected + [0, 0])[:2] if isinstance(self.genes_detected, list) else (0, 0)
        if not (isinstance(self.genes_detected, list) and len(self.genes_detected) == 2 and 0 < lo < hi):
            raise ValueError(f"genes_detected must be [low, high] with 0 < low < high, got {self.genes_detected}")
        if not 2 <= self.n_genes <= 25424:
            raise ValueError(f"n_genes must be in 2..25424 (the Geneformer v1 vocabulary), got {self.n_genes}")
        if hi > 0.8 * self.n_genes:
            raise ValueError(f"genes_detected high ({hi}) must be at most 80% of n_genes ({self.n_genes}); "
                             "raise n_genes or lower genes_detected")
        for name in ("n_datasets", "donors_per_dataset", "program_genes", "states_per_type", "chunk_cells"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.batch_strength < 1:
            raise ValueError(f"batch_strength must be in [0, 1), got {self.batch_strength}")
        if self.nb_shape <= 0:
            raise ValueError(f"nb_shape must be > 0, got {self.nb_shape}")
        if not self.tissues:
            raise ValueError("tissues must list at least one {tissue, tissue_general, cell_types}")
        for item in self.tissues:
            if not isinstance(item, dict) or set(item) != {"tissue", "tissue_general", "cell_types"} \
                    or not item["cell_types"]:
                raise ValueError(f"each tissues entry needs tissue, tissue_general and cell_types, got {item}")
        for name in ("assays", "development_stages", "sexes", "self_reported_ethnicities"):
            if not getattr(self, name):
                raise ValueError(f"{name} must list at least one term id")


def load_synth_config(path: str | os.PathLike | None = None, **overrides) -> SynthConfig:
    from langcell.core.config import load_config

    return load_config(SynthConfig, path or DEFAULT_CONFIG, {k: v for k, v in overrides.items() if v is not None})


@dataclass
class SynthSummary:
    out: Path
    n_cells: int
    n_genes: int
    n_datasets: int
    n_donors: int
    nnz: int
    seconds: float
    parents: dict = field(default_factory=dict)

    @property
    def cells_per_s(self) -> float:
        return self.n_cells / max(self.seconds, 1e-9)


def _load_genes(n_genes: int, rng: np.random.Generator) -> pd.DataFrame:
    import json

    try:
        tokens = json.loads((GENEFORMER_DIR / "token_dictionary.json").read_text())
        symbols = json.loads((GENEFORMER_DIR / "gene_symbol_to_ensembl.json").read_text())
    except OSError as exc:
        raise LangCellError(f"{GENEFORMER_DIR}: Geneformer v1 vocabulary missing ({exc.strerror}); "
                            "restore build_sclibrary/reference/geneformer_v1 from git") from None
    ensembl = [g for g in tokens if g.startswith("ENS")]
    pick = np.sort(rng.choice(len(ensembl), size=n_genes, replace=False))
    name_of: dict[str, str] = {}
    for symbol, gene in sorted(symbols.items()):
        name_of.setdefault(gene, symbol)
    ids = [ensembl[i] for i in pick]
    # Length and biotype are not in the Geneformer vocabulary; 0 / 'unknown' say so honestly.
    return pd.DataFrame({"feature_id": ids, "feature_name": [name_of.get(g, g) for g in ids],
                         "feature_length": np.zeros(n_genes, dtype=np.int64), "feature_type": "unknown"})


def _quantised_table(p: np.ndarray) -> np.ndarray:
    """Slots of a 2**TABLE_BITS lookup table, gene g filling round(p_g * size) of them
    (largest remainder, so the table is exactly full)."""
    size = 1 << TABLE_BITS
    exact = p / p.sum() * size
    slots = np.floor(exact).astype(np.int64)
    short = size - int(slots.sum())
    if short > 0:
        slots[np.argsort(exact - slots)[::-1][:short]] += 1
    return np.repeat(np.arange(len(p), dtype=np.int32), slots)


def _expected_detected(table: np.ndarray, n_genes: int, batch_p: np.ndarray, beta: float) -> np.ndarray:
    """Expected genes detected at each depth of _DEPTH_GRID (Poisson sampling of UMIs)."""
    p = (1 - beta) * np.bincount(table, minlength=n_genes) / len(table) + beta * batch_p
    p = p[p > 0]
    return (-np.expm1(-np.outer(_DEPTH_GRID, p))).sum(axis=1)


def type_parents(cell_types: list[str], guide) -> dict[str, str | None]:
    """Each type's nearest CL ancestor among `cell_types` (None for a top-level type)."""
    chosen = set(cell_types)
    parents = {}
    for t in cell_types:
        term = guide.get(t)
        parents[t] = next((a for a in term.ancestors if a in chosen), None)
    return parents


def build_synth_census(out: str | os.PathLike, n_cells: int, seed: int = 0,
                       config: SynthConfig | str | os.PathLike | None = None,
                       progress: bool = True, workers: int = 1, layout: str = "rows") -> SynthSummary:
    """Write a synthetic Census-schema store with `n_cells` cells at `out`. With `workers` > 1,
    that many processes generate chunks and write their X rows in parallel while this one writes
    obs; the store's content does not depend on `workers`. `layout` is X's tiling
    (`ingest.soma_store.X_LAYOUTS`; "census" as the real Census): same cells, another tiling."""
    from tqdm import tqdm

    from langcell.ingest.ontology import GuideSource
    from langcell.ingest.soma_store import CensusStoreWriter, DatasetInfo, check_layout, check_output

    if isinstance(n_cells, bool) or not isinstance(n_cells, (int, np.integer)) or n_cells < 1:
        raise LangCellError(f"--cells: must be a whole number >= 1, got {n_cells!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise LangCellError(f"--workers: must be a whole number >= 1, got {workers!r}")
    check_output(out)
    check_layout(layout)
    cfg = config if isinstance(config, SynthConfig) else load_synth_config(config)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    guide = GuideSource()
    label_cache: dict[str, str] = {}

    def label(term_id: str) -> str:
        if term_id not in label_cache:
            if term_id == "unknown":
                label_cache[term_id] = "unknown"
            else:
                label_cache[term_id] = ",".join(guide.label(t) for t in term_id.split(","))
        return label_cache[term_id]

    genes = _load_genes(cfg.n_genes, rng)
    G = cfg.n_genes
    cell_types = list(dict.fromkeys(t for tissue in cfg.tissues for t in tissue["cell_types"]))
    for t in cell_types:
        label(t)
    parents = type_parents(cell_types, guide)

    # Expression profiles: baseline + the programs of the type and all its configured ancestors.
    baseline = rng.normal(0.0, cfg.baseline_log_sd, G)
    programs = {}
    for t in cell_types:
        program = np.zeros(G)
        program[rng.choice(G, size=min(cfg.program_genes, G), replace=False)] = \
            rng.normal(cfg.program_log_fold, 0.4, min(cfg.program_genes, G))
        programs[t] = program
    n_states = cfg.states_per_type
    tables = np.empty((len(cell_types) * n_states, 1 << TABLE_BITS), dtype=np.int32)
    for i, t in enumerate(cell_types):
        log_profile, node = baseline.copy(), t
        while node is not None:
            log_profile += programs[node]
            node = parents[node]
        profile = np.exp(log_profile - log_profile.max())
        for s in range(n_states):
            tables[i * n_states + s] = _quantised_table(profile * rng.gamma(cfg.nb_shape, 1 / cfg.nb_shape, G))

    # Datasets: one tissue, assay and disease each, a few donors, a size drawn from a Dirichlet.
    n_datasets = cfg.n_datasets
    sizes = rng.multinomial(n_cells, rng.dirichlet(np.full(n_datasets, 2.0)))
    datasets = []
    for d in range(n_datasets):
        tissue = cfg.tissues[d % len(cfg.tissues)]
        options = cfg.diseases.get(tissue["tissue"], [])
        disease = "PATO:0000461" if not options or rng.random() < 0.5 else options[rng.integers(len(options))]
        dataset_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        donors = [{"donor_id": f"{dataset_id[:8]}-donor{j + 1}",
                   "sex": cfg.sexes[rng.integers(len(cfg.sexes))],
                   "stage": cfg.development_stages[rng.integers(len(cfg.development_stages))],
                   "ethnicity": cfg.self_reported_ethnicities[rng.integers(len(cfg.self_reported_ethnicities))]}
                  for j in range(cfg.donors_per_dataset)]
        type_idx = np.array([cell_types.index(t) for t in tissue["cell_types"]])
        batch_profile = np.exp(baseline + rng.normal(0.0, 1.0, G))
        datasets.append({"dataset_id": dataset_id, "tissue": tissue, "disease": disease,
                         "assay": cfg.assays[rng.integers(len(cfg.assays))], "donors": donors,
                         "types": type_idx, "type_p": rng.dirichlet(np.full(len(type_idx), 1.5)),
                         "batch_table": _quantised_table(batch_profile),
                         "batch_p": batch_profile / batch_profile.sum(), "n_cells": int(sizes[d])})

    # Depth needed per type state for a number of detected genes, against the average batch.
    mean_batch = np.mean([d["batch_p"] for d in datasets], axis=0)
    detected_curves = np.stack([_expected_detected(tbl, G, mean_batch, cfg.batch_strength) for tbl in tables])
    lo, hi = cfg.genes_detected
    # Detected counts scatter by about sqrt(k) around the target: keep targets inside the range.
    target_lo, target_hi = lo + 4 * np.sqrt(lo) + 20, hi - 4 * np.sqrt(hi) - 20

    categories = _categories(datasets, cell_types, label)
    writer = CensusStoreWriter(out, n_cells, genes, categories,
                               summary={"census_build_date": "synthetic", "synthetic_seed": str(seed)},
                               trusted_coords=True, layout=layout)
    codes = {c: {v: i for i, v in enumerate(vals)} for c, vals in writer.categories.items()}
    nnz_total = 0
    # Each chunk draws from its own generator seeded by (seed, dataset, chunk), so the store is
    # the same whatever the number of workers and whichever worker makes which chunk.
    specs, first_row = [], 0
    for d, ds in enumerate(datasets):
        for i, start in enumerate(range(0, ds["n_cells"], cfg.chunk_cells)):
            n = min(cfg.chunk_cells, ds["n_cells"] - start)
            specs.append((d, i, n, first_row))
            first_row += n
    job = dict(seed=seed, datasets=datasets, tables=tables, curves=detected_curves, n_states=n_states, n_genes=G,
               beta=cfg.batch_strength, target_lo=target_lo, target_hi=target_hi, cell_types=cell_types,
               codes=codes, labels=dict(label_cache), x_uri=None, tiledb_config=None, layout=layout)
    pool = None
    bar = tqdm(total=n_cells, unit="cell", unit_scale=True, desc="synth-census", disable=not progress)
    try:
        with writer:
            for ds in datasets:
                if ds["n_cells"]:
                    writer.add_dataset(DatasetInfo(
                        dataset_id=ds["dataset_id"], title=f"synthetic {label(ds['tissue']['tissue'])}",
                        collection_name="langcell synthetic census", source="synthetic", n_cells=ds["n_cells"]))
            if workers > 1:
                import multiprocessing

                # Workers generate chunks and write their X rows themselves (one TileDB fragment
                # each), so X writing scales with them; this process writes obs in order.
                # spawn, not fork: a forked child must not use the parent's TileDB threads.
                job.update(x_uri=writer.x_uri, tiledb_config=writer.tiledb_config)
                pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(job,))
                chunks = pool.imap(_chunk_job, specs)
            else:
                _init_worker(job)
                chunks = map(_chunk_job, specs)
            for obs, rows, cols, counts, summary in chunks:
                if summary is None:
                    writer.write(obs, rows, cols, counts)
                    nnz_total += len(counts)
                else:
                    writer.append_written(obs, summary)
                    nnz_total += int(summary["nnz"].sum())
                bar.update(len(obs["is_primary_data"]))
            if pool is not None:
                pool.close()
                pool.join()
    finally:
        if pool is not None:
            pool.terminate()
        _JOB.clear()
    bar.close()
    n_donors = sum(len(d["donors"]) for d in datasets if d["n_cells"])
    return SynthSummary(out=Path(out), n_cells=n_cells, n_genes=G, n_datasets=sum(1 for d in datasets if d["n_cells"]),
                        n_donors=n_donors, nnz=nnz_total, seconds=time.perf_counter() - started, parents=parents)


def _categories(datasets, cell_types, label) -> dict[str, list[str]]:
    cats: dict[str, list[str]] = {k: [] for k in (
        "dataset_id", "assay", "assay_ontology_term_id", "cell_type", "cell_type_ontology_term_id",
        "development_stage", "development_stage_ontology_term_id", "disease", "disease_ontology_term_id",
        "donor_id", "self_reported_ethnicity", "self_reported_ethnicity_ontology_term_id", "sex",
        "sex_ontology_term_id", "suspension_type", "tissue", "tissue_ontology_term_id", "tissue_type",
        "tissue_general", "tissue_general_ontology_term_id")}

    def add(column: str, term_id: str | None = None, value: str | None = None) -> None:
        if term_id is not None:
            cats[f"{column}_ontology_term_id"].append(term_id)
            cats[column].append(label(term_id))
        else:
            cats[column].append(value)

    for t in cell_types:
        add("cell_type", t)
    for ds in datasets:
        add("dataset_id", value=ds["dataset_id"])
        add("assay", ds["assay"])
        add("disease", ds["disease"])
        add("tissue", ds["tissue"]["tissue"])
        add("tissue_general", ds["tissue"]["tissue_general"])
        for donor in ds["donors"]:
            add("donor_id", value=donor["donor_id"])
            add("sex", donor["sex"])
            add("development_stage", donor["stage"])
            add("self_reported_ethnicity", donor["ethnicity"])
    cats["suspension_type"] = ["cell"]
    cats["tissue_type"] = ["tissue"]
    return {k: list(dict.fromkeys(v)) for k, v in cats.items()}


_JOB: dict = {}
_X_WRITER = None
_BLOCK_BINS = 1 << 21


def _sample_counts(rng, table_id, from_type, from_batch, tables, batch_table, n_genes, row_offset):
    """COO counts (rows from `row_offset`, row-major) of cells drawing `from_type` UMIs from
    their type-state table and `from_batch` from the dataset's table."""
    n = len(table_id)
    size = 1 << TABLE_BITS
    # Cells are visited grouped by lookup table so that each gather stays inside one table
    # (512 KiB, cache-resident) instead of jumping across all of them.
    order = np.argsort(table_id, kind="stable")
    per_cell = from_type[order]
    n_type, n_batch = int(per_cell.sum()), int(from_batch.sum())
    # One int64 key per UMI, cell * n_genes + gene, filled in place to avoid temporaries.
    keys = np.empty(n_type + n_batch, dtype=np.int64)
    slot = rng.integers(0, size, size=n_type, dtype=np.int32)
    ends = np.cumsum(per_cell)
    sorted_tid = table_id[order]
    group_starts = np.flatnonzero(np.r_[True, sorted_tid[1:] != sorted_tid[:-1]])
    group_ends = np.r_[group_starts[1:], n]
    for g0, g1 in zip(group_starts, group_ends):
        a = ends[g0 - 1] if g0 > 0 else 0
        keys[a:ends[g1 - 1]] = tables[sorted_tid[g0]][slot[a:ends[g1 - 1]]]
    keys[:n_type] += np.repeat(order.astype(np.int64) * n_genes, per_cell)
    keys[n_type:] = batch_table[rng.integers(0, size, size=n_batch, dtype=np.int32)]
    keys[n_type:] += np.repeat(np.arange(n, dtype=np.int64) * n_genes, from_batch)
    cell_gene = np.bincount(keys, minlength=n * n_genes)
    flat = np.flatnonzero(cell_gene)
    rows, cols = np.divmod(flat, n_genes)
    # int32 halves what a worker process sends back; the writer widens them again.
    return ((rows + row_offset).astype(np.int32), cols.astype(np.int32),
            cell_gene[flat].astype(np.float32))


def _init_worker(job: dict) -> None:
    global _X_WRITER
    _JOB.clear()
    _JOB.update(job)
    _X_WRITER = None


def _chunk_job(spec: tuple[int, int, int, int]):
    """One chunk: (obs, rows, cols, counts, None), or with an X writer set up
    (obs, None, None, None, cell summaries) after writing the rows to X here."""
    global _X_WRITER
    d, index, n, first_row = spec
    job = _JOB
    rng = np.random.default_rng([job["seed"], d, index])
    obs, rows, cols, counts = _chunk(rng, job["datasets"][d], n, job["tables"], job["curves"], job["n_states"],
                                     job["n_genes"], job["beta"], job["target_lo"], job["target_hi"],
                                     job["cell_types"], job["codes"], job["labels"])
    if job["x_uri"] is None:
        return obs, rows, cols, counts, None
    from langcell.ingest.soma_store import XChunkWriter, cell_summaries

    if _X_WRITER is None:
        _X_WRITER = XChunkWriter(job["x_uri"], job["tiledb_config"], job["layout"])
    _X_WRITER.write(rows.astype(np.int64) + first_row, cols, counts)
    return obs, None, None, None, cell_summaries(rows, counts, n, job["n_genes"], cols)


def _chunk(rng, ds, n, tables, curves, n_states, n_genes, beta, target_lo, target_hi, cell_types, codes, labels):
    """Obs codes and the COO counts (row-major, local rows) of `n` cells of dataset `ds`."""
    type_local = rng.choice(len(ds["types"]), size=n, p=ds["type_p"])
    type_idx = ds["types"][type_local]
    donor = rng.integers(len(ds["donors"]), size=n)
    table_id = type_idx * n_states + rng.integers(n_states, size=n)
    target = np.exp(rng.uniform(np.log(target_lo), np.log(target_hi), size=n))
    depth = np.empty(n, dtype=np.int64)
    for tid in np.unique(table_id):
        sel = table_id == tid
        depth[sel] = np.round(np.interp(target[sel], curves[tid], _DEPTH_GRID)).astype(np.int64)
    from_batch = rng.binomial(depth, beta)
    # Blocks of cells keep the (cell, gene) count array small enough (<= 16 MiB) for malloc to
    # reuse it, instead of faulting in fresh pages for every chunk.
    block = max(1, _BLOCK_BINS // n_genes)
    parts = [_sample_counts(rng, table_id[b:b + block], depth[b:b + block] - from_batch[b:b + block],
                            from_batch[b:b + block], tables, ds["batch_table"], n_genes, b)
             for b in range(0, n, block)]
    rows = np.concatenate([p[0] for p in parts])
    cols = np.concatenate([p[1] for p in parts])
    counts = np.concatenate([p[2] for p in parts])

    def const(column, value):
        return np.full(n, codes[column][value], dtype=np.int32)

    def per_donor(column, key, as_label=False):
        values = [labels[d[key]] if as_label else d[key] for d in ds["donors"]]
        return np.array([codes[column][v] for v in values], dtype=np.int32)[donor]

    type_codes = np.array([codes["cell_type"][labels[t]] for t in cell_types], dtype=np.int32)
    type_id_codes = np.array([codes["cell_type_ontology_term_id"][t] for t in cell_types], dtype=np.int32)
    tissue = ds["tissue"]
    obs = {
        "dataset_id": const("dataset_id", ds["dataset_id"]),
        "assay": const("assay", labels[ds["assay"]]), "assay_ontology_term_id": const("assay_ontology_term_id", ds["assay"]),
        "cell_type": type_codes[type_idx], "cell_type_ontology_term_id": type_id_codes[type_idx],
        "development_stage": per_donor("development_stage", "stage", True),
        "development_stage_ontology_term_id": per_donor("development_stage_ontology_term_id", "stage"),
        "disease": const("disease", labels[ds["disease"]]),
        "disease_ontology_term_id": const("disease_ontology_term_id", ds["disease"]),
        "donor_id": per_donor("donor_id", "donor_id"),
        "self_reported_ethnicity": per_donor("self_reported_ethnicity", "ethnicity", True),
        "self_reported_ethnicity_ontology_term_id": per_donor("self_reported_ethnicity_ontology_term_id", "ethnicity"),
        "sex": per_donor("sex", "sex", True), "sex_ontology_term_id": per_donor("sex_ontology_term_id", "sex"),
        "suspension_type": const("suspension_type", "cell"),
        "tissue": const("tissue", labels[tissue["tissue"]]),
        "tissue_ontology_term_id": const("tissue_ontology_term_id", tissue["tissue"]),
        "tissue_type": const("tissue_type", "tissue"),
        "tissue_general": const("tissue_general", labels[tissue["tissue_general"]]),
        "tissue_general_ontology_term_id": const("tissue_general_ontology_term_id", tissue["tissue_general"]),
        "is_primary_data": np.ones(n, dtype=bool),
        "n_measured_vars": np.full(n, n_genes, dtype=np.int64),
    }
    return obs, rows, cols, counts
