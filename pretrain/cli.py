"""Subcommands of this stage (filled in as the stage is built)."""


def add_commands(subparsers) -> None:
    del subparsers
