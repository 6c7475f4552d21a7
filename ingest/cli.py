"""`langcell ingest ...`: cells from the Census or a SOMA store, ontology terms, and local stores."""

from __future__ import annotations


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("ingest", help="ingest cells and ontology terms",
                                   description="Ingest cells from the CELLxGENE Census (or a local SOMA "
                                               "store) and ontology terms; build local Census-schema stores.")
    commands = parser.add_subparsers(dest="ingest_command", metavar="SOURCE", required=True)
    _add_store_commands(commands)
    _add_census_commands(commands)


# --- demo-census, synth-census, ontologies -------------------------------------------------
def _add_store_commands(commands) -> None:
    demo = commands.add_parser(
        "demo-census", help="build a small real Census-schema SOMA store from data shipped in PyPI packages",
        description="Write a local SOMA store laid out like the CELLxGENE Census (census_data/homo_sapiens, "
                    "measurement RNA, X layer raw) from scanpy's pbmc68k_reduced (700 labelled PBMCs) and "
                    "celltypist's sample (559 unlabelled cells). No network. Read it with "
                    "`langcell ingest census --uri DIR`.")
    demo.add_argument("--out", required=True, metavar="DIR", help="store folder (replaced if it is a store)")
    demo.set_defaults(handler=_run_demo_census)

    synth = commands.add_parser(
        "synth-census", help="build a synthetic Census-schema SOMA store of any size for scale tests",
        description="Stream N synthetic cells (real CL/UBERON/MONDO terms and Ensembl ids, cell-type programs "
                    "that follow the CL hierarchy, dataset batch effects, negative binomial counts) into a "
                    "Census-schema SOMA store. Same --seed, same store.")
    synth.add_argument("--cells", required=True, type=int, metavar="N", help="number of cells")
    synth.add_argument("--out", required=True, metavar="DIR", help="store folder (replaced if it is a store)")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default %(default)s)")
    synth.add_argument("--config", default=None, metavar="YAML",
                       help="generator settings (default configs/ingest/synth_census.yaml)")
    synth.add_argument("--genes", type=int, default=None, metavar="G", help="override n_genes of the config")
    synth.add_argument("--genes-detected", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                       help="override genes_detected of the config: the range of genes detected per cell "
                            "(writing time grows with it)")
    synth.add_argument("--workers", type=int, default=1, metavar="N",
                       help="processes generating cells and writing their counts in parallel; the store is "
                            "the same for any N (default %(default)s)")
    synth.add_argument("--layout", choices=("rows", "census"), default="rows",
                       help="X tiling: rows (one tile spans every gene; fastest to write and read) or census "
                            "(the Census builder's 2048 x 2048 cells x genes tiles, row-major tile order) "
                            "(default %(default)s)")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(handler=_run_synth_census)

    onto = commands.add_parser(
        "ontologies", help="resolve the ontology terms of ingested cells (and their ancestors)",
        description="Read every *_ontology_term_id of INGEST/cells/*.parquet and write INGEST/ontology/terms.parquet "
                    "(label, definition, synonyms, parents, ancestors of each term and all its ancestors) and "
                    "INGEST/ontology/unresolved.json (ids no ontology resolves, with cell counts and why; the ontology "
                    "versions used; obsolete terms and the replacements followed; references to undeclared terms; "
                    "ontologies that could not be loaded).")
    onto.add_argument("--ingest", required=True, metavar="INGEST", help="the --out folder of `langcell ingest census`")
    onto.add_argument("--source", choices=("guide", "obo"), default="guide",
                      help="guide: the ontologies shipped by cellxgene-ontology-guide (offline), in the versions of "
                           "the CELLxGENE schema the ingested Census release names where the guide has them, else "
                           "the newest it ships (unresolved.json says which); obo: one OBO/OWL file or URL per "
                           "ontology, parsed with pronto (default %(default)s)")
    onto.add_argument("--ontology-file", action="append", default=None, metavar="PREFIX=FILE_OR_URL",
                      help="with --source obo, repeatable: the file or URL of the ontology of ids with this prefix, "
                           "e.g. CL=cl.obo, EFO=efo.owl (default: the OBO Foundry PURLs of CL, UBERON, MONDO, PATO, "
                           "HsapDv, MmusDv, HANCESTRO and EFO; needs the network)")
    onto.set_defaults(handler=_run_ontologies)


def _run_demo_census(args) -> int:
    from langcell.ingest.demo_census import build_demo_census

    summary = build_demo_census(args.out)
    for s in summary.sources:
        print(f"{s.name}: {s.n_cells} cells; {s.n_mapped}/{s.n_symbols} gene symbols mapped to Ensembl "
              f"({s.n_unmapped} unmapped dropped, {s.n_merged} merged into a shared id); "
              f"{s.stored_counts:.0f} of {s.total_counts:.0f} counts kept")
    print(f"{args.out}: {summary.n_cells} cells x {summary.n_genes} genes; open with "
          f"cellxgene_census.open_soma(uri={str(args.out)!r})")
    return 0


def _run_synth_census(args) -> int:
    from langcell.ingest.synth_census import build_synth_census, load_synth_config

    config = load_synth_config(args.config, n_genes=args.genes,
                               genes_detected=list(args.genes_detected) if args.genes_detected else None)
    summary = build_synth_census(args.out, args.cells, seed=args.seed, config=config, progress=not args.no_progress,
                                 workers=args.workers, layout=args.layout)
    print(f"{args.out}: {summary.n_cells} cells x {summary.n_genes} genes, {summary.n_datasets} datasets, "
          f"{summary.n_donors} donors, {summary.nnz / summary.n_cells:.0f} genes detected per cell on average; "
          f"{summary.seconds:.1f} s ({summary.cells_per_s:,.0f} cells/s)")
    return 0


def _run_ontologies(args) -> int:
    import logging

    from langcell.ingest.ontology import ingest_ontologies

    logging.basicConfig(level=logging.WARNING, format="langcell ingest ontologies: warning: %(message)s")
    result = ingest_ontologies(args.ingest, source=args.source, ontology_files=args.ontology_file)
    print(f"{result.terms_path}: {result.n_terms} terms ({result.n_cell_terms} used by cells, the rest their "
          f"ancestors); {len(result.unresolved)} unresolved ids listed in {result.unresolved_path}, with the "
          "ontology versions used")
    return 0


# --- census, merge ---------------------------------------------------------------------------
def _add_census_commands(commands) -> None:
    census = commands.add_parser(
        "census", help="stream cells from the CELLxGENE Census or a local SOMA store into parquet parts",
        description="Stream cells passing --obs-filter into OUT/cells/part-NNNNN.parquet, OUT/genes.parquet and "
                    "OUT/manifest.json. Resumable: rerun the same command after a crash. For a SLURM array run "
                    "every task with --shard $SLURM_ARRAY_TASK_ID/N and the same --out, then `langcell ingest "
                    "merge --out OUT`.")
    source = census.add_mutually_exclusive_group()
    source.add_argument("--census-version", metavar="V", help='Census release, e.g. 2025-01-30 (default "stable"; '
                                                             "needs the network)")
    source.add_argument("--uri", metavar="STORE", help="a local (or s3://) SOMA store laid out like the Census")
    census.add_argument("--organism", default="homo_sapiens", choices=("homo_sapiens", "mus_musculus"))
    census.add_argument("--obs-filter", default="is_primary_data == True", metavar="EXPR",
                        help="SOMA value filter on obs (default: %(default)r)")
    census.add_argument("--var-filter", default=None, metavar="EXPR",
                        help="SOMA value filter on var: genes kept in genes.parquet and gene_index")
    census.add_argument("--max-cells", type=int, default=None, metavar="N",
                        help="only the first N passing cells by soma_joinid")
    census.add_argument("--chunk-cells", type=int, default=20_000, metavar="N",
                        help="at most N cells read at once (default %(default)s)")
    census.add_argument("--chunk-counts", type=int, default=50_000_000, metavar="N",
                        help="at most N counts read at once, by obs nnz where the store has it: sets peak "
                             "memory, about 16 bytes a count for each of 3 chunks in flight per worker "
                             "(default %(default)s)")
    census.add_argument("--retries", type=int, default=5, metavar="N",
                        help="retries of a chunk's read after a TileDB/S3 error, with exponential backoff "
                             "from 1 s (default %(default)s)")
    census.add_argument("--cells-per-part", type=int, default=100_000, metavar="N",
                        help="cells per parquet part, the unit of resuming and sharding (default %(default)s)")
    census.add_argument("--workers", type=int, default=1, metavar="N", help="processes over disjoint parts")
    census.add_argument("--shard", default=None, metavar="I/N", help="take parts I, I+N, ... (SLURM array task I of N)")
    census.add_argument("--no-progress", action="store_true", help="no progress bar")
    census.add_argument("--out", required=True, metavar="DIR")
    census.set_defaults(handler=_run_census)

    merge = commands.add_parser(
        "merge", help="verify the parts of all --shard runs in OUT and write OUT/manifest.json",
        description="After every `langcell ingest census --shard I/N --out OUT` task has finished: check each part "
                    "(sha256, rows, soma_joinid ranges disjoint and covering the plan) and write OUT/manifest.json.")
    merge.add_argument("--out", required=True, metavar="DIR", help="the folder all shards wrote into")
    merge.set_defaults(handler=_run_merge)


def _run_census(args) -> int:
    import logging
    import sys

    from langcell.ingest.allocator import keep_arrow_pages

    keep_arrow_pages()  # before ingest.census loads pyarrow
    from langcell.ingest.census import ingest_census, parse_shard

    shard = parse_shard(args.shard) if args.shard is not None else None
    logging.basicConfig(level=logging.WARNING, format="langcell ingest census: warning: %(message)s")
    manifest = ingest_census(
        args.out, census_version=args.census_version, uri=args.uri, organism=args.organism,
        obs_filter=args.obs_filter, var_filter=args.var_filter, max_cells=args.max_cells,
        chunk_cells=args.chunk_cells, chunk_counts=args.chunk_counts, cells_per_part=args.cells_per_part,
        workers=args.workers, shard=shard, retries=args.retries, progress=not args.no_progress)
    where = "manifest.json" if shard is None else f"manifest.shard-{shard[0]}-of-{shard[1]}.json"
    for warning in manifest["warnings"]:
        print(f"langcell ingest census: warning: {warning}", file=sys.stderr)
    print(f"{args.out}: {manifest['n_cells']} cells in {len(manifest['parts'])} parts "
          f"({manifest['skipped_empty_cells']} empty cells skipped), {manifest['n_genes']} genes; see {where}")
    return 0


def _run_merge(args) -> int:
    from langcell.ingest.census import merge_shards

    manifest = merge_shards(args.out)
    print(f"{args.out}: merged {len(manifest['parts'])} parts, {manifest['n_cells']} cells; wrote manifest.json")
    return 0
