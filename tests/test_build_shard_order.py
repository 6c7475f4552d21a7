"""Shard order (build_sclibrary/shuffle.py): shards of an ingest stored dataset by dataset mix all
datasets, same seed -> same bytes, another seed -> another order, every cell exactly once, resume
after a kill while cutting, and memory bounded by a bucket rather than by the library."""

import io
import json
import math
import tarfile
import tracemalloc
from pathlib import Path

import datasets
import numpy as np
import pytest

import langcell.build_sclibrary.build as build_mod
from langcell.build_sclibrary import shard_tar, shuffle
from langcell.build_sclibrary.build import build_library
from langcell.build_sclibrary.config import load_build_config
from tests.build_helpers import read_part_arrays, write_ingest

SPLITS = ("train", "val", "test")
N_CELLS, N_DATASETS, SHARD, BUCKET = 1200, 20, 50, 200
BASE = {"shard_size": SHARD, "bucket_cells": BUCKET}


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
    """1,200 cells of 20 datasets (60 each) stored one dataset after the other in 4 parts."""
    root = tmp_path_factory.mktemp("order")
    write_ingest(root / "ingest", n_cells=N_CELLS, n_parts=4, n_datasets=N_DATASETS, seed=7, dataset_blocks=True)
    manifest = build_library(root / "ingest", root / "lib", load_build_config(None, BASE), progress=False)
    return root, manifest


def _shard_cells(lib: Path, manifest: dict, split: str) -> list[list[tuple[int, str]]]:
    """(key, dataset_id) of every cell of every shard, in the manifest's shard order."""
    shards = []
    for entry in manifest["splits"][split]["shards"]:
        with tarfile.open(lib / entry["name"]) as tar:
            metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".meta.json")]
        shards.append([(m["soma_joinid"], m["dataset_id"]) for m in metas])
    return shards


def _mean_distinct(datasets_in_order: list[str], sizes: list[int]) -> float:
    bounds = np.cumsum([0, *sizes])
    return float(np.mean([len(set(datasets_in_order[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]))


def test_shards_of_a_dataset_by_dataset_ingest_mix_the_datasets(blocked):
    root, manifest = blocked
    shards = _shard_cells(root / "lib", manifest, "train")
    sizes = [len(s) for s in shards]
    mixed = _mean_distinct([d for shard in shards for _, d in shard], sizes)
    # The same cells in ingest order, and uniformly shuffled, cut into shards of the same sizes.
    train = {key for shard in shards for key, _ in shard}
    ingest_order = [d for j, _, _, _, d, _ in read_part_arrays(root / "ingest") if j in train]
    rng = np.random.default_rng(0)
    uniform = np.mean([_mean_distinct(list(rng.permutation(ingest_order)), sizes) for _ in range(20)])
    n_train_datasets = len(set(ingest_order))
    assert n_train_datasets >= 12
    assert _mean_distinct(ingest_order, sizes) <= 2.5  # what writing in ingest order gave
    assert mixed >= 0.9 * uniform and uniform > 0.8 * n_train_datasets
    assert min(len({d for _, d in shard}) for shard in shards) >= 0.5 * n_train_datasets


def test_every_cell_exactly_once_in_near_equal_shards_numbered_in_order(blocked):
    root, manifest = blocked
    lib = root / "lib"
    cells = {j for j, *_ in read_part_arrays(root / "ingest")}
    seen = []
    for split in SPLITS:
        entries = manifest["splits"][split]["shards"]
        assert [e["name"] for e in entries] == [f"shards/{split}/sclibrary-{i:06d}.tar" for i in range(len(entries))]
        assert all(SHARD / 2 < e["n_cells"] <= SHARD for e in entries)
        keys = [key for shard in _shard_cells(lib, manifest, split) for key, _ in shard]
        assert len(keys) == len(set(keys)) == manifest["splits"][split]["n_cells"]
        hf = datasets.load_from_disk(str(lib / "hf" / split))
        assert sorted(hf["soma_joinid"]) == sorted(keys)  # hf/ holds the same cells (in ingest order)
        seen += keys
    assert len(seen) == len(set(seen)) == N_CELLS - 3  # 3 cells have no vocabulary gene
    assert set(seen) <= cells
    assert [p.name for p in (lib / "work").iterdir()] == ["parts"]  # spill files and bucket records removed


def test_same_seed_gives_identical_bytes_and_another_seed_another_order(blocked, tmp_path):
    root, manifest = blocked
    again = build_library(root / "ingest", tmp_path / "again", load_build_config(None, BASE), progress=False)
    assert again["splits"] == manifest["splits"]
    for split in SPLITS:
        for entry in manifest["splits"][split]["shards"]:
            assert (tmp_path / "again" / entry["name"]).read_bytes() == (root / "lib" / entry["name"]).read_bytes()
    # Every cell in train, so the seed changes only the order, not which cells a split holds.
    orders = []
    for seed in (0, 1):
        config = load_build_config(None, dict(BASE, seed=seed, fractions=[1.0, 0.0, 0.0]))
        built = build_library(root / "ingest", tmp_path / f"seed{seed}", config, progress=False)
        orders.append([key for shard in _shard_cells(tmp_path / f"seed{seed}", built, "train") for key, _ in shard])
    assert sorted(orders[0]) == sorted(orders[1]) and len(orders[0]) == N_CELLS - 3
    assert orders[0] != orders[1]
    first_shard = set(orders[0][:SHARD])
    assert len(first_shard & set(orders[1][:SHARD])) < SHARD / 2


def test_kill_while_cutting_then_resume_equals_clean_build(blocked, tmp_path, monkeypatch):
    root, clean = blocked
    lib = tmp_path / "lib"
    real = shuffle.cut_bucket
    calls = []

    def dies_in_third_bucket(job):
        calls.append(job.bucket)
        if len(calls) == 3:
            # Killed after writing one shard of this bucket, before its record.
            (lib / f"shards/{job.split}/sclibrary-{job.first_number:06d}.tar").write_bytes(b"half a bucket")
            raise KeyboardInterrupt("killed")
        return real(job)

    monkeypatch.setattr(build_mod.shuffle, "cut_bucket", dies_in_third_bucket)
    with pytest.raises(KeyboardInterrupt):
        build_library(root / "ingest", lib, load_build_config(None, BASE), progress=False)
    assert json.loads((lib / "manifest.json").read_text())["complete"] is False
    records = sorted((lib / "work" / "shuffle" / "train").glob("bucket-*.json"))
    assert [p.name for p in records] == ["bucket-00000.json", "bucket-00001.json"]
    # Spill files stay under work/, never where a reader looks for shards.
    files = [p for p in (lib / "shards").rglob("*") if p.is_file()]
    assert all(p.suffix == ".tar" and p.parent.parent.name == "shards" for p in files)
    recorded = json.loads(records[0].read_text())["shards"][0]["name"]
    (lib / recorded).write_bytes(b"corrupt")  # a recorded shard damaged: its bucket is cut again

    monkeypatch.setattr(build_mod.shuffle, "cut_bucket", real)
    resumed = build_library(root / "ingest", lib, load_build_config(None, BASE), progress=False)
    assert resumed["splits"] == clean["splits"]
    for split in SPLITS:
        names = sorted(p.name for p in (lib / "shards" / split).iterdir())
        assert names == sorted(Path(e["name"]).name for e in clean["splits"][split]["shards"])
        for entry in clean["splits"][split]["shards"]:
            assert (lib / entry["name"]).read_bytes() == (root / "lib" / entry["name"]).read_bytes()
    assert not list(lib.rglob(".*.tmp"))


def _scatter_and_cut(out: Path, n_cells: int, payload: int = 2000, n_parts: int = 4, run: int = 256):
    """Scatter `n_cells` synthetic cells of `payload` bytes (4 parts) and cut them; returns the peak
    traced memory of the scatter and of the cut, and the keys in each shard."""
    n_buckets = math.ceil(n_cells / 500)
    spills = []
    tracemalloc.start()
    for p in range(n_parts):
        writer = shuffle.SpillWriter(out, "train", p, n_buckets)
        keys = range(p * n_cells // n_parts, (p + 1) * n_cells // n_parts)
        buckets = shuffle.scatter_buckets(0, p, np.zeros(len(keys), np.uint8), [n_buckets, 1, 1])
        for i, (key, bucket) in enumerate(zip(keys, buckets)):
            writer.add(int(bucket), shard_tar.member_bytes(f"{key}.bin", bytes(payload)))
            if i % run == run - 1:
                writer.end_run()
        spills.append(writer.close())
    scatter_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    done, jobs = shuffle.plan_cut(out, "train", 0, spills, n_buckets, seed=0, shard_size=250)
    for job in jobs:
        shuffle.cut_bucket(job)
    cut_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    shards = [shuffle.trusted_bucket(out, "train", job.bucket, job.source, job.first_number) for job in jobs]
    keys = []
    for entry in (s for bucket in shards for s in bucket):
        with tarfile.open(fileobj=io.BytesIO((out / entry["name"]).read_bytes())) as tar:
            keys.append([int(m.name.split(".")[0]) for m in tar.getmembers()])
    assert not done and len(jobs) == n_buckets
    return scatter_peak, cut_peak, keys


def test_memory_follows_the_bucket_not_the_number_of_cells(tmp_path):
    small = _scatter_and_cut(tmp_path / "small", 4_000)
    big = _scatter_and_cut(tmp_path / "big", 16_000)  # 32 MB of cells, buckets of ~500 cells (~1.3 MB)
    for _, _, keys in (small, big):
        flat = [k for shard in keys for k in shard]
        assert sorted(flat) == list(range(len(flat)))  # every cell once
        assert max(len(shard) for shard in keys) <= 250
    assert len(big[2]) > 3 * len(small[2])
    for stage in (0, 1):
        assert big[stage] < 1.5 * small[stage], (stage, small[stage], big[stage])
        assert big[stage] < 16_000 * 2_000 / 8
