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
    del commands
