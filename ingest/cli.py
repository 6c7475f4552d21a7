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
    del commands


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
                        help="cells read at once; sets peak memory (default %(default)s)")
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
    from ingest.census import ingest_census, parse_shard

    shard = parse_shard(args.shard) if args.shard is not None else None
    manifest = ingest_census(
        args.out, census_version=args.census_version, uri=args.uri, organism=args.organism,
        obs_filter=args.obs_filter, var_filter=args.var_filter, max_cells=args.max_cells,
        chunk_cells=args.chunk_cells, cells_per_part=args.cells_per_part, workers=args.workers,
        shard=shard, progress=not args.no_progress)
    where = "manifest.json" if shard is None else f"manifest.shard-{shard[0]}-of-{shard[1]}.json"
    print(f"{args.out}: {manifest['n_cells']} cells in {len(manifest['parts'])} parts "
          f"({manifest['skipped_empty_cells']} empty cells skipped), {manifest['n_genes']} genes; see {where}")
    return 0


def _run_merge(args) -> int:
    from ingest.census import merge_shards

    manifest = merge_shards(args.out)
    print(f"{args.out}: merged {len(manifest['parts'])} parts, {manifest['n_cells']} cells; wrote manifest.json")
    return 0
