"""The `langcell` command: one subcommand per stage, a thin layer over library functions.

Stage CLI modules import only argparse at module level and the heavy libraries (torch,
tiledbsoma, deepspeed) inside their handlers, so `langcell --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from langcell import __version__
from langcell.core.errors import LangCellError

# Each module defines add_commands(subparsers); the order is the order of the pipeline.
STAGE_CLIS = ("langcell.ingest.cli", "langcell.build_sclibrary.cli", "langcell.pretrain.cli", "langcell.eval.cli",
              "langcell.demo_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="langcell",
        description="LangCell reproduction: ingest the CELLxGENE Census and OBO ontologies, build "
                    "scLibrary, pre-train the cell/text dual encoder, evaluate and annotate.",
    )
    parser.add_argument("--version", action="version", version=f"langcell {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in STAGE_CLIS:
        importlib.import_module(module).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except LangCellError as exc:
        print(f"langcell {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
