"""LangCell reproduction: shared plumbing (errors, files, configs) and the `langcell` command.

The stages install as langcell.ingest -> langcell.build_sclibrary -> langcell.pretrain ->
langcell.eval (their folders sit at the repository's top, mapped in pyproject.toml); each imports
only the stages to its left and this package's plumbing modules. `langcell.cli` and
`langcell.demo` sit on top of all of them.
"""

__version__ = "0.1.0"
