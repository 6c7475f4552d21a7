"""LangCell reproduction: shared plumbing (errors, files, configs) and the `langcell` command.

The stages live in the top-level packages ingest -> build_sclibrary -> pretrain -> eval; each
imports only the stages to its left and this package's plumbing modules. `langcell.cli` and
`langcell.demo` sit on top of all of them.
"""

__version__ = "0.1.0"
