"""One scLibrary from several ingest folders: keys, tokens per ingest, merged vocab, splits, CLI,
resume/shards over the union of parts, and a one-ingest build left as it was."""

import glob
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from langcell.build_sclibrary.build import KEY_STRIDE, build_library
from langcell.build_sclibrary.config import load_build_config
from langcell.build_sclibrary.vocab import MedianSketch, geneformer_v1_vocab
from langcell.cli import main
from langcell.core.errors import LangCellError
from langcell.core.files import sha256_file
from tests.build_helpers import read_part_arrays, reference_tokens, write_ingest

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Ingest A (170 genes, 150 cells, 3 without a vocab gene) and B (120 other-ordered genes, 90
    cells, 2 without); both number their cells from 1, so joinids overlap."""
    root = tmp_path_factory.mktemp("multi")
    write_ingest(root / "a", n_cells=150, n_parts=2, seed=0, n_vocab_genes=150, empty_vocab_cells=3)
    write_ingest(root / "b", n_cells=90, n_parts=2, seed=1, n_vocab_genes=100, empty_vocab_cells=2)
    manifest = build_library([root / "a", root / "b"], root / "lib", load_build_config(None, {"shard_size": 30}),
                             progress=False)
    return root, manifest


def _samples(lib: Path, split: str):
    urls = sorted(glob.glob(str(lib / "shards" / split / "*.tar")))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()) if urls else []


def _cells(root: Path):
    return {j: (n, g, c, d) for j, n, g, c, d, _ in read_part_arrays(root)}


def _genes(root: Path) -> list:
    return pq.read_table(root / "genes.parquet")["feature_id"].to_pylist()


def test_every_cell_once_with_unique_keys_and_its_own_ingests_tokens(two):
    root, manifest = two
    lib = root / "lib"
    cells = [_cells(root / "a"), _cells(root / "b")]
    genes = [_genes(root / "a"), _genes(root / "b")]
    assert len(genes[0]) == 170 and len(genes[1]) == 120 and genes[0][:120] != genes[1]
    assert len(set(cells[0]) & set(cells[1])) > 30  # the two stores share joinids
    tokens, medians = geneformer_v1_vocab()
    keys = []
    for split in SPLITS:
        samples = _samples(lib, split)
        assert len(samples) == manifest["splits"][split]["n_cells"]
        for sample in samples:
            meta = sample["meta.json"]
            k, joinid = meta["ingest"], meta["soma_joinid"]
            assert int(sample["__key__"]) == k * KEY_STRIDE + joinid
            n, g, c, dataset = cells[k][joinid]
            row = np.zeros(len(genes[k]), dtype=np.float32)
            row[g] = c
            assert np.array_equal(sample["input_ids.npy"], reference_tokens(genes[k], row, n, tokens, medians, 2048))
            assert meta["dataset_id"] == dataset
            keys.append(sample["__key__"])
    assert len(keys) == len(set(keys)) == manifest["n_cells"] == 240 - 5
    a_keys = {int(k) for k in keys if int(k) < KEY_STRIDE}
    assert len(a_keys) == 147 and a_keys <= set(cells[0])  # ingest 0 keeps plain soma_joinids
    assert {int(k) - KEY_STRIDE for k in keys if int(k) >= KEY_STRIDE} <= set(cells[1])
    assert manifest["n_cells_in"] == 240 and manifest["n_skipped_no_vocab_gene"] == 5


def test_manifest_records_each_ingest_and_parts_are_numbered_globally(two):
    root, manifest = two
    assert "ingest" not in manifest and "ingest_manifest_sha256" not in manifest
    assert manifest["ingests"] == [{"path": str((root / x).resolve()), "manifest_sha256":
                                    sha256_file(root / x / "manifest.json")} for x in ("a", "b")]
    assert [(p["ingest"], p["name"], p["n_cells_in"]) for p in manifest["parts"]] == [
        (0, "cells/part-00000.parquet", 75), (0, "cells/part-00001.parquet", 75),
        (1, "cells/part-00000.parquet", 45), (1, "cells/part-00001.parquet", 45)]
    for split, info in manifest["splits"].items():
        names = [s["name"] for s in info["shards"]]
        assert len(names) == len(set(names))
        assert all(s["n_cells"] <= 30 and sha256_file(root / "lib" / s["name"]) == s["sha256"] for s in info["shards"])


def test_hf_rows_carry_the_ingest_and_match_the_shards(two):
    root, manifest = two
    for split in SPLITS:
        ds = datasets.load_from_disk(str(root / "lib" / "hf" / split))
        assert ds.num_rows == manifest["splits"][split]["n_cells"]
        by_key = {int(s["__key__"]): s["input_ids.npy"] for s in _samples(root / "lib", split)}
        rows = list(zip(ds["ingest"], ds["soma_joinid"], ds["input_ids"]))
        assert {k * KEY_STRIDE + j for k, j, _ in rows} == set(by_key) and len(rows) == len(by_key)
        for k, j, ids in rows:
            assert np.array_equal(np.asarray(ids, dtype=np.int32), by_key[k * KEY_STRIDE + j])


def test_dataset_split_over_the_union_of_cells(two):
    root, manifest = two
    where, ingests = {}, {s: set() for s in SPLITS}
    for split in SPLITS:
        for sample in _samples(root / "lib", split):
            where.setdefault(sample["meta.json"]["dataset_id"], set()).add(split)
            ingests[split].add(sample["meta.json"]["ingest"])
    # Both fixtures name their datasets dataset-0..5: one id is one group, whichever ingest holds it.
    assert len(where) == 6 and all(len(s) == 1 for s in where.values())
    assert {s for splits in where.values() for s in splits} == set(SPLITS)
    assert all(ingests[s] == {0, 1} for s in SPLITS if manifest["splits"][s]["n_cells"])


def test_corpus_vocab_is_the_union_with_merged_medians_and_cell_split(tmp_path):
    # Every cell has a coding gene here, so the stratified counts hold over the written cells.
    root = tmp_path
    write_ingest(root / "a", n_cells=150, n_parts=2, seed=0, n_vocab_genes=150, empty_vocab_cells=0)
    write_ingest(root / "b", n_cells=90, n_parts=2, seed=1, n_vocab_genes=100, empty_vocab_cells=0)
    config = load_build_config(None, {"vocab": "corpus", "split_by": "cell", "seed": 2, "shard_size": 50})
    manifest = build_library([root / "a", root / "b"], tmp_path / "lib", config, progress=False)
    tokens = json.loads((tmp_path / "lib" / "vocab" / "token_dictionary.json").read_text())
    medians = json.loads((tmp_path / "lib" / "vocab" / "gene_median_dictionary.json").read_text())
    # The reference: one sketch fed every non-zero normalised value of the coding genes of both ingests.
    union = sorted({g for x in ("a", "b") for g in _genes(root / x) if not g.startswith("ENSG9")})
    slot = {g: i for i, g in enumerate(union)}
    sketch = MedianSketch(len(union))
    for x in ("a", "b"):
        genes = _genes(root / x)
        for _, (n, g, c, _) in _cells(root / x).items():
            keep = np.array([not genes[i].startswith("ENSG9") for i in g], dtype=bool)
            sketch.add(np.array([slot[genes[i]] for i in g[keep]], dtype=np.int64), c[keep] / n * 10_000)
    expected = {g: float(m) for g, m in zip(union, sketch.medians()) if np.isfinite(m)}
    assert medians == expected and len(expected) == 150
    assert list(tokens) == ["<pad>", "<mask>", *sorted(expected), "<cls>"]
    only_a = set(_genes(root / "a")) - set(_genes(root / "b"))
    assert len(only_a & set(tokens)) == 50
    cells = [_cells(root / "a"), _cells(root / "b")]
    genes = [_genes(root / "a"), _genes(root / "b")]
    per_type: dict = {}
    for split in SPLITS:
        for sample in _samples(tmp_path / "lib", split):
            meta = sample["meta.json"]
            n, g, c, _ = cells[meta["ingest"]][meta["soma_joinid"]]
            row = np.zeros(len(genes[meta["ingest"]]), dtype=np.float32)
            row[g] = c
            assert np.array_equal(sample["input_ids.npy"],
                                  reference_tokens(genes[meta["ingest"]], row, n, tokens, medians, 2048))
            per_type.setdefault(meta["cell_type_ontology_term_id"], []).append(split)
    assert sum(len(v) for v in per_type.values()) == manifest["n_cells"] == 240
    for splits in per_type.values():
        assert splits.count("train") == round(0.8 * len(splits)) and splits.count("val") == round(0.1 * len(splits))


def test_cli_two_ingests_and_reruns_with_another_list_are_refused(two, tmp_path, capsys):
    root, manifest = two
    lib = tmp_path / "lib"
    assert main(["build", "--ingest", str(root / "a"), str(root / "b"), "--out", str(lib), "--shard-size", "30",
                 "--quiet"]) == 0
    built = json.loads((lib / "manifest.json").read_text())
    assert built["splits"] == manifest["splits"]
    capsys.readouterr()
    for order in ([root / "b", root / "a"], [root / "a"]):
        assert main(["build", "--ingest", *map(str, order), "--out", str(lib), "--shard-size", "30"]) == 2
        assert "another configuration or ingest" in capsys.readouterr().err
    with pytest.raises(LangCellError, match="ingest folder given twice"):
        build_library([root / "a", root / "a"], tmp_path / "twice", load_build_config(None, {}), progress=False)


def test_machine_shards_and_workers_over_the_union_of_parts(two, tmp_path):
    root, manifest = two
    ingests = [root / "a", root / "b"]
    base = {"shard_size": 30}
    first = build_library(ingests, tmp_path / "sh", load_build_config(None, dict(base, shard="1/2")), progress=False)
    assert first["complete"] is False
    assert sorted(p.name for p in (tmp_path / "sh" / "work" / "parts").glob("*.json")) == [
        "part-00001.json", "part-00003.json"]  # one part of each ingest
    last = build_library(ingests, tmp_path / "sh", load_build_config(None, dict(base, shard="0/2")), progress=False)
    assert last["complete"] is True and last["splits"] == manifest["splits"]
    two_workers = build_library(ingests, tmp_path / "w", load_build_config(None, dict(base, workers=2)),
                                progress=False)
    assert two_workers["splits"] == manifest["splits"]


def test_one_ingest_as_a_list_is_the_plain_single_ingest_build(two, tmp_path):
    root, _ = two
    config = load_build_config(None, {"shard_size": 30})
    plain = build_library(root / "b", tmp_path / "plain", config, progress=False)
    listed = build_library([root / "b"], tmp_path / "listed", config, progress=False)
    assert plain["ingest"] == str((root / "b").resolve()) and "ingests" not in plain
    assert plain["splits"] == listed["splits"] and plain["ingest_manifest_sha256"] == listed["ingest_manifest_sha256"]
    sample = _samples(tmp_path / "plain", "train")[0]
    assert sample["__key__"] == str(sample["meta.json"]["soma_joinid"]) and "ingest" not in sample["meta.json"]
    assert "ingest" not in datasets.load_from_disk(str(tmp_path / "plain" / "hf" / "train")).column_names


def test_joinid_beyond_the_key_stride_is_refused(two, tmp_path):
    root, _ = two
    write_ingest(tmp_path / "big", n_cells=20, n_parts=1, seed=3)
    path = tmp_path / "big" / "cells" / "part-00000.parquet"
    table = pq.read_table(path)
    joinids = table["soma_joinid"].to_numpy() + KEY_STRIDE
    pq.write_table(table.set_column(0, "soma_joinid", pa.array(joinids)), path)
    manifest = json.loads((tmp_path / "big" / "manifest.json").read_text())
    manifest["parts"][0]["sha256"] = sha256_file(path)
    (tmp_path / "big" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LangCellError, match=r"soma_joinid outside 0\.\.999999999999") as info:
        build_library([root / "a", tmp_path / "big"], tmp_path / "lib", load_build_config(None, {}), progress=False)
    assert "part-00000.parquet" in str(info.value) and "\n" not in str(info.value)
    assert json.loads((tmp_path / "lib" / "manifest.json").read_text())["complete"] is False
