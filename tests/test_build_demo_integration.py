"""Real cells end to end: demo Census store -> ingest census -> ingest ontologies -> build."""

import glob

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from langcell.build_sclibrary.build import build_library
from langcell.build_sclibrary.config import load_build_config
from langcell.build_sclibrary.vocab import geneformer_v1_vocab
from langcell.ingest.census import ingest_census
from langcell.ingest.demo_census import build_demo_census
from langcell.ingest.ontology import ingest_ontologies
from tests.build_helpers import read_part_arrays, reference_tokens


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo_census(root / "store", progress=False)
    ingest_census(root / "ingest", uri=str(root / "store"), progress=False, cells_per_part=500)
    ingest_ontologies(root / "ingest")
    config = load_build_config(None, {"split_by": "cell", "shard_size": 400})
    manifest = build_library(root / "ingest", root / "lib", config, progress=False)
    return root, manifest


def test_demo_cells_tokenized_exactly_with_texts(demo):
    root, manifest = demo
    assert manifest["complete"] and manifest["n_cells_in"] == 1259
    assert manifest["n_cells"] + manifest["n_skipped_no_vocab_gene"] == 1259
    assert all(manifest["splits"][s]["n_cells"] > 50 for s in ("train", "val", "test"))
    cells = {j: (n, g, c) for j, n, g, c, _, _ in read_part_arrays(root / "ingest")}
    gene_ids = pq.read_table(root / "ingest" / "genes.parquet")["feature_id"].to_pylist()
    tokens, medians = geneformer_v1_vocab()
    seen, with_type = 0, 0
    for split in ("train", "val", "test"):
        urls = sorted(glob.glob(str(root / "lib" / "shards" / split / "*.tar")))
        for sample in wds.WebDataset(urls, shardshuffle=False).decode():
            n, g, c = cells[int(sample["__key__"])]
            row = np.zeros(len(gene_ids), dtype=np.float32)
            row[g] = c
            assert np.array_equal(sample["input_ids.npy"], reference_tokens(gene_ids, row, n, tokens, medians, 2048))
            if sample["meta.json"]["dataset_id"] == "scanpy-pbmc68k-reduced":
                assert sample["texts.json"]["cell_type"].startswith("cell type: ")
                with_type += 1
            else:
                assert "cell_type" not in sample["texts.json"]  # celltypist cells are unlabelled
            seen += 1
    assert seen == manifest["n_cells"] and with_type == 700
    type2text = (root / "lib" / "type2text.json").read_text()
    assert "natural killer cell" in type2text and "B cell" in type2text
