"""`build_library` on a contract-exact ingest: outputs, splits, readers, resume, workers and shards."""

import glob
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

import langcell.build_sclibrary.build as build_mod
from langcell.build_sclibrary.build import build_library
from langcell.build_sclibrary.config import load_build_config
from langcell.build_sclibrary.vocab import geneformer_v1_vocab
from langcell.core.files import sha256_file
from tests.build_helpers import read_part_arrays, reference_tokens, write_ingest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    facts = write_ingest(root / "ingest")
    manifest = build_library(root / "ingest", root / "lib", load_build_config(None, {"shard_size": 30}), progress=False)
    return root, facts, manifest


def _tar_samples(lib: Path, split: str):
    urls = sorted(glob.glob(str(lib / "shards" / split / "*.tar")))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()) if urls else []


def test_manifest_counts_checksums_and_vocab(built):
    root, facts, manifest = built
    lib = root / "lib"
    assert manifest["complete"] and manifest["format"] == "langcell-sclibrary/1"
    assert manifest["n_cells_in"] == 240 and manifest["n_skipped_no_vocab_gene"] == facts["empty"] == 3
    assert sum(manifest["splits"][s]["n_cells"] for s in ("train", "val", "test")) == 237
    for split, info in manifest["splits"].items():
        assert sum(s["n_cells"] for s in info["shards"]) == info["n_cells"]
        for shard in info["shards"]:
            assert shard["n_cells"] <= 30
            assert sha256_file(lib / shard["name"]) == shard["sha256"]
    tokens = json.loads((lib / "vocab" / "token_dictionary.json").read_text())
    assert tokens["<pad>"] == 0 and tokens["<mask>"] == 1 and tokens["<cls>"] == 25426 and len(tokens) == 25427
    assert manifest["vocab_sha256"]["token_dictionary.json"] == sha256_file(lib / "vocab" / "token_dictionary.json")
    assert not (lib / "work" / "hf").exists()
    assert (lib / "stats.png").stat().st_size > 10_000
    stats = manifest["stats"]
    assert stats["cells_per_split"] == {s: manifest["splits"][s]["n_cells"] for s in ("train", "val", "test")}
    lengths = [n for s in ("train", "val", "test") for n in datasets.load_from_disk(str(lib / "hf" / s))["length"]]
    assert stats["token_length"]["max"] == max(lengths) and stats["token_length"]["min"] == min(lengths)
    assert stats["token_length"]["mean"] == round(float(np.mean(lengths)), 2)
    assert stats["n_cell_types"] == 4 and stats["n_diseases"] == 2
    report = (lib / "stats.md").read_text()
    assert f"| train | {manifest['splits']['train']['n_cells']:,} | {len(manifest['splits']['train']['shards'])} |" in report
    assert "skipped (no expressed vocabulary gene): 3." in report


def test_shards_hold_reference_tokens_meta_and_texts(built):
    root, _, manifest = built
    lib = root / "lib"
    cells = {j: (n, g, c, d, ct) for j, n, g, c, d, ct in read_part_arrays(root / "ingest")}
    gene_ids = pq.read_table(root / "ingest" / "genes.parquet")["feature_id"].to_pylist()
    tokens, medians = geneformer_v1_vocab()
    seen = {}
    for split in ("train", "val", "test"):
        samples = _tar_samples(lib, split)
        assert len(samples) == manifest["splits"][split]["n_cells"]
        for sample in samples:
            key = int(sample["__key__"])
            n, g, c, dataset, cell_type = cells[key]
            row = np.zeros(len(gene_ids), dtype=np.float32)
            row[g] = c
            expected = reference_tokens(gene_ids, row, n, tokens, medians, 2048)
            assert sample["input_ids.npy"].dtype == np.int32
            assert np.array_equal(sample["input_ids.npy"], expected)
            meta, texts = sample["meta.json"], sample["texts.json"]
            assert meta["soma_joinid"] == key and meta["dataset_id"] == dataset and meta["cell_type"] == cell_type
            assert "self_reported_ethnicity" not in texts  # "unknown" gives no text
            if cell_type == "B cell":
                assert texts["cell_type"] == ("cell type: B cell. A lymphocyte of B lineage that is capable of "
                                              "B cell mediated immunity.")
            if cell_type == "unknown":
                assert "cell_type" not in texts
            assert texts["tissue"].startswith("tissue: blood. ")
            seen[key] = split
    assert len(seen) == 237
    type2text = json.loads((lib / "type2text.json").read_text())
    assert sorted(type2text) == ["B cell", "T cell", "monocyte"]
    variants = json.loads((lib / "text_variants.json").read_text())
    assert variants["cell_type"]["CL:0000236"]["synonym_texts"][0].startswith("cell type: B lymphocyte. ")
    assert variants["cell_type"]["CL:0000236"]["parent_texts"] == ["cell type: B cell, a kind of lymphocyte."]


def test_hf_datasets_match_shards(built):
    root, _, manifest = built
    lib = root / "lib"
    for split in ("train", "val", "test"):
        ds = datasets.load_from_disk(str(lib / "hf" / split))
        assert ds.num_rows == manifest["splits"][split]["n_cells"]
        by_key = {int(s["__key__"]): s["input_ids.npy"] for s in _tar_samples(lib, split)}
        assert set(ds["soma_joinid"]) == set(by_key)
        for row in ds:
            assert row["length"] == len(row["input_ids"])
            assert np.array_equal(np.asarray(row["input_ids"], dtype=np.int32), by_key[row["soma_joinid"]])
        assert {"cell_type", "cell_type_ontology_term_id", "dataset_id", "donor_id", "tissue", "disease",
                "development_stage", "sex", "assay", "self_reported_ethnicity"} <= set(ds.column_names)


def test_dataset_split_keeps_each_dataset_in_one_split(built):
    root, _, _ = built
    lib = root / "lib"
    where = {}
    for split in ("train", "val", "test"):
        for sample in _tar_samples(lib, split):
            where.setdefault(sample["meta.json"]["dataset_id"], set()).add(split)
    assert len(where) == 6
    assert all(len(splits) == 1 for splits in where.values())
    assert {s for splits in where.values() for s in splits} == {"train", "val", "test"}


def test_cell_split_is_stratified_and_holdout_types_stay_out_of_train(tmp_path):
    write_ingest(tmp_path / "ingest", n_cells=300, n_parts=2, seed=5, empty_vocab_cells=0)
    config = load_build_config(None, {"split_by": "cell", "holdout_cell_types": ["CL:0000576"], "seed": 3})
    build_library(tmp_path / "ingest", tmp_path / "lib", config, progress=False)
    per = {}
    for split in ("train", "val", "test"):
        for sample in _tar_samples(tmp_path / "lib", split):
            per.setdefault(sample["meta.json"]["cell_type"], []).append(split)
    assert set(per["monocyte"]) == {"test"}
    for cell_type in ("B cell", "T cell", "unknown"):
        splits = per[cell_type]
        n = len(splits)
        assert splits.count("train") == round(0.8 * n) and splits.count("val") == round(0.1 * n)


def test_kill_and_resume_gives_identical_library(tmp_path, monkeypatch):
    write_ingest(tmp_path / "ingest", n_cells=150, n_parts=3, seed=2)
    config = load_build_config(None, {"shard_size": 20})
    clean = build_library(tmp_path / "ingest", tmp_path / "clean", config, progress=False)

    real = build_mod._process_part
    calls = []

    def dies_in_second_part(job):
        calls.append(job.index)
        if len(calls) == 2:
            # A crash halfway: one run of this part's spill is written, then the process dies.
            writer = build_mod._SplitWriter(Path(job.out), "train", job.index, job.n_buckets[0])
            writer.add(0, "1", np.array([1, 2], np.int32), {}, {})
            writer.spill.end_run()
            raise KeyboardInterrupt("killed")
        return real(job)

    monkeypatch.setattr(build_mod, "_process_part", dies_in_second_part)
    with pytest.raises(KeyboardInterrupt):
        build_library(tmp_path / "ingest", tmp_path / "lib", config, progress=False)
    partial = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    assert partial["complete"] is False
    assert len(list((tmp_path / "lib" / "work" / "parts").glob("*.json"))) == 1
    assert not (tmp_path / "lib" / "shards").exists()  # shards are cut only once every part is done
    # Corrupt the finished part's spill too: resume must notice the checksum and redo the part.
    record = json.loads((tmp_path / "lib" / "work" / "parts" / "part-00000.json").read_text())
    first = tmp_path / "lib" / record["spill"]["train"]["name"]
    first.write_bytes(first.read_bytes()[:-10] + b"0123456789")

    monkeypatch.setattr(build_mod, "_process_part", real)
    calls.clear()
    resumed = build_library(tmp_path / "ingest", tmp_path / "lib", config, progress=False)
    for split in ("train", "val", "test"):
        assert resumed["splits"][split]["shards"] == clean["splits"][split]["shards"]
        names = sorted(p.name for p in (tmp_path / "lib" / "shards" / split).glob("*"))
        assert names == sorted(p.name for p in (tmp_path / "clean" / "shards" / split).glob("*"))
        a = datasets.load_from_disk(str(tmp_path / "lib" / "hf" / split))
        b = datasets.load_from_disk(str(tmp_path / "clean" / "hf" / split))
        assert a["input_ids"] == b["input_ids"] and a["soma_joinid"] == b["soma_joinid"]
    assert (tmp_path / "lib" / "type2text.json").read_bytes() == (tmp_path / "clean" / "type2text.json").read_bytes()


def test_workers_and_machine_shards_give_identical_library(tmp_path):
    write_ingest(tmp_path / "ingest", n_cells=120, n_parts=4, seed=4)
    base = {"shard_size": 25, "split_by": "donor"}
    one = build_library(tmp_path / "ingest", tmp_path / "one", load_build_config(None, base), progress=False)
    two = build_library(tmp_path / "ingest", tmp_path / "two", load_build_config(None, dict(base, workers=2)),
                        progress=False)
    first = build_library(tmp_path / "ingest", tmp_path / "sh", load_build_config(None, dict(base, shard="0/2")),
                          progress=False)
    assert first["complete"] is False
    last = build_library(tmp_path / "ingest", tmp_path / "sh", load_build_config(None, dict(base, shard="1/2")),
                         progress=False)
    assert last["complete"] is True
    for other in (two, last):
        assert other["splits"] == one["splits"]


def test_sigkill_mid_build_then_resume_equals_clean_build(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    write_ingest(tmp_path / "ingest", n_cells=6000, n_parts=12, seed=6)
    clean = build_library(tmp_path / "ingest", tmp_path / "clean", load_build_config(None, {"shard_size": 200}),
                          progress=False)
    code = ("import sys; from build_sclibrary.build import build_library; "
            "from build_sclibrary.config import load_build_config; "
            f"build_library({str(tmp_path / 'ingest')!r}, {str(tmp_path / 'lib')!r}, "
            "load_build_config(None, {'shard_size': 200}), progress=False)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    records = tmp_path / "lib" / "work" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and not list(records.glob("part-*.json")) and child.poll() is None:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = len(list(records.glob("part-*.json")))
    assert 1 <= done < 12  # killed part-way
    assert json.loads((tmp_path / "lib" / "manifest.json").read_text())["complete"] is False
    resumed = build_library(tmp_path / "ingest", tmp_path / "lib", load_build_config(None, {"shard_size": 200}),
                            progress=False)
    assert resumed["splits"] == clean["splits"]
    assert not list((tmp_path / "lib").rglob(".*.tmp"))


def test_an_empty_split_loads_as_an_empty_dataset_and_the_build_says_so(tmp_path, capsys):
    """Two datasets split by dataset: one trains, one validates, nothing is left to test."""
    from langcell.cli import main
    write_ingest(tmp_path / "ingest", n_cells=60, n_parts=1, n_datasets=2)
    assert main(["build", "--ingest", str(tmp_path / "ingest"), "--out", str(tmp_path / "lib"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test 0 cells" in out
    assert "split test has no cells: no shards, and hf/test is an empty dataset" in out
    manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    assert manifest["splits"]["test"]["n_cells"] == 0 and manifest["splits"]["test"]["shards"] == []
    test = datasets.load_from_disk(str(tmp_path / "lib" / "hf" / "test"))
    train = datasets.load_from_disk(str(tmp_path / "lib" / "hf" / "train"))
    assert test.num_rows == 0 and train.num_rows == manifest["splits"]["train"]["n_cells"] > 0
    assert test.features == train.features
