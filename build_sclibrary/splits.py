"""Deterministic train/val/test assignment of every cell of an ingest.

- `dataset` (default) and `donor`: whole groups (a dataset; a donor within a dataset) go to one
  split. Groups are shuffled with the seed and laid end to end; a group goes to the split in
  whose cell-fraction interval its midpoint falls, so split sizes follow the fractions in cells.
- `cell`: stratified by cell type: per type, cells are ordered by a seeded random key (drawn
  in soma_joinid order, so the part layout does not matter) and the first round(f_train * n)
  go to train, the next round(f_val * n) to val, the rest to test.
- `holdout_cell_types`: cells of these types (label or term id) go to test whatever the mode,
  so train never sees them (novel-type zero-shot evaluation).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from langcell.core.errors import LangCellError

TRAIN, VAL, TEST = 0, 1, 2


def assign_splits(obs: pd.DataFrame, split_by: str, fractions: list[float], seed: int,
                  holdout_cell_types: list[str] = ()) -> np.ndarray:
    """Split code (0 train, 1 val, 2 test) per row of `obs` (soma_joinid, dataset_id, donor_id,
    cell_type, cell_type_ontology_term_id)."""
    n = len(obs)
    codes = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return codes
    holdout = np.zeros(n, dtype=bool)
    if holdout_cell_types:
        labels = obs["cell_type"].astype(str).to_numpy()
        term_ids = obs["cell_type_ontology_term_id"].astype(str).to_numpy()
        for name in holdout_cell_types:
            hit = (labels == name) | (term_ids == name)
            if not hit.any():
                raise LangCellError(f"--holdout-cell-types: no cell has type {name!r}; use a cell_type label or "
                                    "CL id present in the ingest (see the stats of a previous build)")
            holdout |= hit
    if split_by == "cell":
        codes[:] = _by_cell(obs, fractions, seed)
    else:
        keys = ["dataset_id"] if split_by == "dataset" else ["dataset_id", "donor_id"]
        # Group numbers in sorted key order, from categorical codes: no per-cell Python strings.
        frame = pd.DataFrame({k: obs[k].astype(str).astype("category") for k in keys})
        group = frame.groupby(keys, sort=True, observed=True).ngroup().to_numpy()
        codes[:] = _by_group(group, fractions, seed)
    codes[holdout] = TEST
    return codes


def _by_group(group: np.ndarray, fractions: list[float], seed: int) -> np.ndarray:
    sizes = np.bincount(group)
    order = np.random.default_rng(seed).permutation(sizes.size)
    bounds = np.cumsum(fractions)
    total = sizes.sum()
    split_of = np.zeros(sizes.size, dtype=np.uint8)
    start = 0
    for g in order:
        midpoint = (start + sizes[g] / 2) / total
        split_of[g] = min(int(np.searchsorted(bounds, midpoint, side="right")), 2)
        start += sizes[g]
    _fill_empty_splits(split_of, sizes, order, fractions)
    return split_of[group]


def _fill_empty_splits(split_of: np.ndarray, sizes: np.ndarray, order: np.ndarray, fractions: list[float]) -> None:
    """With few groups, a split with a positive fraction can end up empty; give it the smallest
    group of the split holding the most groups, as long as that leaves the donor non-empty."""
    for split in (VAL, TEST):
        if fractions[split] <= 0 or (split_of == split).any():
            continue
        counts = np.bincount(split_of, minlength=3)
        donor = int(np.argmax(counts))
        if counts[donor] < 2:
            continue
        candidates = [g for g in order if split_of[g] == donor]
        smallest = min(candidates, key=lambda g: (sizes[g], list(order).index(g)))
        split_of[smallest] = split


def _by_cell(obs: pd.DataFrame, fractions: list[float], seed: int) -> np.ndarray:
    joinids = obs["soma_joinid"].to_numpy()
    by_joinid = np.argsort(joinids, kind="stable")
    key = np.empty(len(obs))
    key[by_joinid] = np.random.default_rng(seed).random(len(obs))
    types = obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    codes = np.full(len(obs), TEST, dtype=np.uint8)
    frame = pd.DataFrame({"type": types, "key": key, "row": np.arange(len(obs))})
    for _, rows in frame.sort_values(["type", "key"], kind="stable").groupby("type", sort=True)["row"]:
        rows = rows.to_numpy()
        n_train = int(round(fractions[TRAIN] * rows.size))
        n_val = int(round(fractions[VAL] * rows.size))
        codes[rows[:n_train]] = TRAIN
        codes[rows[n_train:n_train + n_val]] = VAL
    return codes
