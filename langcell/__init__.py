"""LangCell reproduction: the notebook API, the `langcell` command, and the pipeline's stages.

    import langcell
    model = langcell.load_model("EXPORT")                 # ours, LangCell's release, or an HF id
    emb = model.embed_cells(adata)                        # cells x 256
    langcell.annotate(adata, model, cell_types=[...])     # obs/obsm/uns, as `langcell annotate`
    ds = langcell.tokenize(adata)                         # datasets.Dataset, as `langcell tokenize`

The stages install as langcell.ingest -> langcell.build_sclibrary -> langcell.pretrain ->
langcell.eval (their folders sit at the repository's top, mapped in pyproject.toml) over the
ground, langcell.core; this package and its cli/demo modules sit on top of all of them.
"""

__version__ = "0.1.0"

# Resolved on first use, so `import langcell` (and `langcell --help`) loads no torch.
_API = {
    "load_model": ("langcell.eval.model_io", "open_model"),
    "annotate": ("langcell.eval.annotate", "annotate_adata"),
    "tokenize": ("langcell.build_sclibrary.anndata_io", "tokenize"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'langcell' has no attribute {name!r}")
    import importlib

    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
