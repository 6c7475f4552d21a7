"""A small scLibrary with learnable structure, written exactly as `langcell build` writes one.

Tests and the benchmark need shards without running ingest and build. Each synthetic cell
type has its own top-ranked genes (shuffled a little per cell), so masked-gene, contrastive
and matching losses all have something to learn, and cell lengths vary like real cells.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from langcell.core.files import atomic_path, atomic_write_json, sha256_file

CELL_TYPES = ("T cell", "B cell", "natural killer cell", "monocyte", "erythrocyte", "platelet")
TISSUES = ("blood", "lung", "liver")
DISEASES = ("normal", "COVID-19")


def write_synthetic_library(out: str | os.PathLike, *, n_cells: int = 256, n_shards: int = 4,
                            vocab_size: int = 25427, min_len: int = 32, max_len: int = 256,
                            seed: int = 0, n_val: int = 0, unlabelled_every: int = 0) -> Path:
    """Write LIB/{vocab,shards/train,shards/val,manifest.json}; returns LIB. With
    `unlabelled_every` = k, every k-th cell has no identity text (as unlabelled Census cells)."""
    import webdataset as wds
    out = Path(out)
    rng = np.random.default_rng(seed)
    cls_id = vocab_size - 1
    (out / "vocab").mkdir(parents=True, exist_ok=True)
    token_dictionary = {"<pad>": 0, "<mask>": 1}
    token_dictionary.update({f"ENSG{i:011d}": i for i in range(2, cls_id)})
    token_dictionary["<cls>"] = cls_id
    atomic_write_json(out / "vocab" / "token_dictionary.json", token_dictionary)
    atomic_write_json(out / "vocab" / "gene_median_dictionary.json",
                      {g: 1.0 for g in token_dictionary if g.startswith("ENSG")})
    # Each type prefers its own genes (300, or a tenth of a small vocabulary); a cell ranks a
    # noisy permutation of them first, then random genes.
    n_type = min(300, (vocab_size - 3) // 10)
    type_genes = [rng.choice(np.arange(2, cls_id), n_type, replace=False) for _ in CELL_TYPES]
    manifest = {"format": "langcell-sclibrary/1", "complete": True, "splits": {},
                "vocab_sha256": sha256_file(out / "vocab" / "token_dictionary.json")}
    joinid = 0
    for split, count in (("train", n_cells), ("val", n_val)):
        if count == 0:
            continue
        shards = []
        per_shard = -(-count // n_shards)
        for s in range(n_shards):
            path = out / "shards" / split / f"sclibrary-{s:06d}.tar"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = 0
            with atomic_path(path) as tmp:
                with wds.TarWriter(str(tmp)) as sink:
                    for _ in range(min(per_shard, count - s * per_shard)):
                        t = int(rng.integers(len(CELL_TYPES)))
                        length = int(rng.integers(min_len, max_len + 1))
                        top = type_genes[t][np.argsort(rng.normal(np.arange(n_type), n_type / 10))]
                        rest = rng.choice(np.arange(2, cls_id), length, replace=False)
                        genes = np.concatenate([top, rest[~np.isin(rest, top)]])[: length - 1]
                        ids = np.concatenate([[cls_id], genes]).astype(np.int32)
                        tissue, disease = TISSUES[joinid % 3], DISEASES[joinid % 2]
                        meta = {"soma_joinid": joinid, "cell_type": CELL_TYPES[t], "tissue": tissue,
                                "disease": disease, "dataset_id": f"d{joinid % 4}", "donor_id": f"p{joinid % 7}"}
                        meta.update({"cell_type_ontology_term_id": f"CL:{t:07d}",
                                     "tissue_ontology_term_id": f"UBERON:{TISSUES.index(tissue):07d}",
                                     "disease_ontology_term_id": f"MONDO:{DISEASES.index(disease):07d}"})
                        texts = {"cell_type": f"A {CELL_TYPES[t]}, a cell of type number {t}.",
                                 "tissue": f"Found in the {tissue}.", "disease": f"Donor condition: {disease}."}
                        if unlabelled_every and joinid % unlabelled_every == 0:
                            meta.update(cell_type="unknown", cell_type_ontology_term_id="unknown")
                            texts = {}
                        sink.write({"__key__": str(joinid), "input_ids.npy": ids,
                                    "meta.json": json.dumps(meta).encode(), "texts.json": json.dumps(texts).encode()})
                        joinid += 1
                        rows += 1
            shards.append({"name": f"shards/{split}/{path.name}", "n_cells": rows, "sha256": sha256_file(path)})
        manifest["splits"][split] = {"n_cells": count, "shards": shards}
    atomic_write_json(out / "manifest.json", manifest)
    return out
