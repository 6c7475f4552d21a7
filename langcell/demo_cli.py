"""`langcell demo`: the main job on the embedded default, ingest to report."""


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline on the embedded mini-Census and write a report",
        description="Build a local mini-Census from real cells shipped in PyPI packages (plus synthetic "
                    "cells), ingest it, build scLibrary, pre-train both stages with DeepSpeed on CPU, "
                    "export, and evaluate on held-out real PBMCs. Reruns reuse finished steps.")
    parser.add_argument("--out", required=True, help="output folder (report.md is written here)")
    parser.add_argument("--config", default="default",
                        help="configs/demo/<name>.yaml or a YAML path (default: default; `ci` is a reduced run)")
    parser.add_argument("--seed", type=int, default=None,
                        help="pre-training seed (default: the config's); the library and held-out cells stay the same")
    parser.set_defaults(handler=_demo)


def _demo(args) -> int:
    from langcell.demo import run_demo

    run_demo(args.out, args.config, args.seed)
    return 0
