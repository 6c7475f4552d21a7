"""`langcell build` (ingest folder -> scLibrary) and `langcell tokenize` (a user's .h5ad -> tokens)."""

from __future__ import annotations

import argparse


def add_commands(subparsers) -> None:
    build = subparsers.add_parser(
        "build", help="build scLibrary (tokens + texts, split into shards) from an ingest folder",
        description="Tokenize the cells of an ingest folder with Geneformer's rank-value encoding, pair "
                    "them with ontology texts, split them and write webdataset shards, HF datasets, "
                    "type2text.json, stats and a manifest. Resumable: rerun the same command after a kill.")
    build.add_argument("--ingest", required=True, nargs="+", metavar="INGEST",
                       help="ingest folder(s) (langcell ingest census --out ...); several build one library, "
                            "keyed by ingest position (keep the order on reruns)")
    build.add_argument("--out", required=True, help="output folder (scLibrary)")
    build.add_argument("--config", default=None, help="build config YAML (default configs/build/default.yaml)")
    build.add_argument("--vocab", choices=("geneformer-v1", "corpus"), default=None,
                       help="gene vocabulary: Geneformer v1's, or built from the corpus with its own medians")
    build.add_argument("--split-by", choices=("dataset", "donor", "cell"), default=None,
                       help="keep whole datasets / donors in one split, or split cells stratified by cell type")
    build.add_argument("--fractions", default=None, help="train,val,test fractions (default 0.8,0.1,0.1)")
    build.add_argument("--holdout-cell-types", default=None,
                       help="comma-separated cell types (labels or CL ids) kept out of train (they go to test)")
    build.add_argument("--seed", type=int, default=None)
    build.add_argument("--workers", type=int, default=None, help="worker processes (one ingest part each)")
    build.add_argument("--shard", default=None, help="i/N: build only parts with index %% N == i (one machine each)")
    build.add_argument("--max-length", type=int, default=None, help="tokens per cell, <cls> included (2048)")
    build.add_argument("--shard-size", type=int, default=None, help="cells per webdataset tar, at most (10000)")
    build.add_argument("--bucket-cells", type=int, default=None,
                       help="cells per shuffle bucket, cut into shards in random order; memory follows it (50000)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(handler=_build)

    tokenize = subparsers.add_parser(
        "tokenize", help="tokenize your own .h5ad (raw counts) into a datasets folder",
        description="Rank-value tokens of every cell of an .h5ad (raw counts; Ensembl ids or gene symbols in "
                    "var), saved with datasets.save_to_disk: input_ids, length, cell_index and the obs columns.")
    tokenize.add_argument("--input", required=True, help=".h5ad file with raw counts")
    tokenize.add_argument("--out", required=True, help="output folder (datasets.load_from_disk reads it)")
    tokenize.add_argument("--vocab", default=None,
                          help="vocab folder with token_dictionary.json and gene_median_dictionary.json "
                               "(default: Geneformer v1, as LangCell's published checkpoint)")
    tokenize.add_argument("--layer", default=None,
                          help="layer holding the raw counts (default layers['counts'] when present, else X)")
    tokenize.add_argument("--gene-column", default=None, help="var column with gene ids (default var_names)")
    tokenize.add_argument("--max-length", type=int, default=2048)
    tokenize.add_argument("--chunk-size", type=int, default=2048, help="cells read at a time")
    tokenize.add_argument("--threads", type=int, default=None,
                          help="threads sorting each chunk's cells (default: every core)")
    tokenize.add_argument("--min-gene-match", type=float, default=0.5,
                          help="refuse files whose share of genes in the vocabulary is below this")
    tokenize.set_defaults(handler=_tokenize)


def _build(args: argparse.Namespace) -> int:
    from langcell.core.errors import LangCellError

    from langcell.build_sclibrary.build import build_library
    from langcell.build_sclibrary.config import load_build_config

    overrides = {"vocab": args.vocab, "split_by": args.split_by, "seed": args.seed, "workers": args.workers,
                 "shard": args.shard, "max_length": args.max_length, "shard_size": args.shard_size,
                 "bucket_cells": args.bucket_cells}
    if args.fractions is not None:
        try:
            overrides["fractions"] = [float(x) for x in args.fractions.split(",")]
        except ValueError:
            raise LangCellError(f"--fractions: {args.fractions!r} is not three comma-separated numbers; "
                                "e.g. 0.8,0.1,0.1") from None
    if args.holdout_cell_types is not None:
        overrides["holdout_cell_types"] = [t.strip() for t in args.holdout_cell_types.split(",") if t.strip()]
    config = load_build_config(args.config, overrides)
    manifest = build_library(args.ingest, args.out, config, progress=not args.quiet)
    if manifest.get("complete"):
        counts = ", ".join(f"{s} {manifest['splits'][s]['n_cells']:,}" for s in ("train", "val", "test"))
        print(f"scLibrary written to {args.out}: {counts} cells; "
              f"{manifest['n_skipped_no_vocab_gene']:,} skipped (no vocabulary gene)")
        for split in (s for s in ("train", "val", "test") if manifest["splits"][s]["n_cells"] == 0):
            print(f"split {split} has no cells: no shards, and hf/{split} is an empty dataset; "
                  "with --split-by dataset or donor, more groups (or --split-by cell) fill it")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from langcell.build_sclibrary.anndata_io import tokenize

    report: dict = {}
    tokenize(args.input, args.vocab, max_length=args.max_length, threads=args.threads, out_dir=args.out,
             chunk_size=args.chunk_size, layer=args.layer, gene_column=args.gene_column,
             min_gene_match=args.min_gene_match, progress=True, report=report, load=False)
    print(f"{report['n_matched']:,} of {report['n_genes']:,} genes ({100 * report['share']:.1f}%, by "
          f"{report['matched_by']}) are in the vocabulary; {report['n_cells_kept']:,} cells tokenized to {args.out} "
          f"(n_counts from {report['n_counts_from']})")
    return 0
