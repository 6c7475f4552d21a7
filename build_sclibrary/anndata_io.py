"""Tokenize a user's AnnData (`.h5ad` or in memory) into a `datasets.Dataset`.

The file is opened and checked by `build_sclibrary.user_anndata` (genes, raw counts, shape) and
read `chunk_size` rows at a time, so memory follows the chunk, not the file. Cells are kept where
`obs["filter_pass"] == 1` when that column exists (as Geneformer), otherwise all cells are kept.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from langcell.core.errors import LangCellError

from langcell.build_sclibrary.tokenizer import RankValueTokenizer
from langcell.build_sclibrary.user_anndata import open_user_anndata

log = logging.getLogger(__name__)

# The one data file of a `datasets` folder, named as `Dataset.save_to_disk` names it.
DATA_FILE = "data-00000-of-00001.arrow"


def tokenize_anndata(path_or_adata, tokenizer: RankValueTokenizer, out_dir: str | os.PathLike | None = None,
                     chunk_size: int = 2048, layer: str | None = None, gene_column: str | None = None,
                     obs_columns: list[str] | None = None, min_gene_match: float = 0.5, progress: bool = False,
                     report: dict | None = None, load: bool = True):
    """Rank-value tokens of every cell (passing `filter_pass` when present) as a `datasets.Dataset`
    with `input_ids`, `length`, `cell_index` (row in the AnnData) and the obs columns.

    With `out_dir` the dataset is saved there (`load_from_disk` reads it) and returned memory-mapped,
    or with `load=False` not opened (None is returned, and `datasets` is never imported: a third of
    a second, which `langcell tokenize` saves); otherwise it is built in memory. `n_counts` comes
    from obs when present, else the row sums of all genes. Cells with no expressed vocabulary gene
    get just `<cls>` (length 1). A `report` dict receives the gene match (n_genes, n_matched,
    share, matched_by) and cell counts.
    """
    user = open_user_anndata(path_or_adata, tokenizer.gene_medians, layer=layer, gene_column=gene_column,
                             min_gene_match=min_gene_match)
    with user:
        match = user.genes
        if report is not None:
            report.update(n_genes=match.n_genes, n_matched=match.n_matched, share=round(match.share, 4),
                          matched_by=match.kind, gene_column=match.column, counts_from=user.counts_from)
        return _tokenize(user, tokenizer, out_dir, chunk_size, obs_columns, progress, report, load)


def tokenize(path_or_adata, vocab: str | os.PathLike | None = None, *, max_length: int = 2048,
             threads: int | None = None, out_dir: str | os.PathLike | None = None, chunk_size: int = 2048,
             layer: str | None = None, gene_column: str | None = None, min_gene_match: float = 0.5,
             progress: bool = False, report: dict | None = None, load: bool = True):
    """`langcell tokenize`: a user's AnnData (in memory, backed or a path) as a `datasets.Dataset`
    of rank-value tokens, with Geneformer v1's vocabulary or `vocab` (a library's `vocab/` folder).
    Rows are the cells kept by `tokenize_anndata` (all, or those with `filter_pass == 1`); `load`
    as there."""
    threads = threads or os.cpu_count() or 1
    if vocab:
        tokenizer = RankValueTokenizer.from_vocab_dir(vocab, max_length=max_length, threads=threads)
    else:
        from langcell.build_sclibrary.vocab import geneformer_v1_vocab

        tokens, medians = geneformer_v1_vocab()
        tokenizer = RankValueTokenizer(tokens, medians, max_length=max_length, source="geneformer-v1",
                                       threads=threads)
    return tokenize_anndata(path_or_adata, tokenizer, out_dir=out_dir, chunk_size=chunk_size, layer=layer,
                            gene_column=gene_column, min_gene_match=min_gene_match, progress=progress,
                            report=report, load=load)


def _tokenize(user, tokenizer, out_dir, chunk_size, obs_columns, progress, report, load):
    from tqdm import tqdm

    obs, source, match = user.obs, user.source, user.genes
    keep = np.ones(user.n_obs, dtype=bool)
    if "filter_pass" in obs.columns:
        keep = obs["filter_pass"].to_numpy() == 1
        if not keep.any():
            raise LangCellError(f"{source}: no cell has obs['filter_pass'] == 1, so none would be tokenized; "
                                "set filter_pass to 1 for the cells to keep, or drop the column")
    columns = [c for c in (obs_columns if obs_columns is not None else list(obs.columns))]
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        raise LangCellError(f"{source}: obs has no column {missing[0]!r}; pass existing obs columns")
    obs_n_counts = user.n_counts
    if report is not None:
        report.update(n_cells=user.n_obs, n_cells_kept=int(keep.sum()),
                      n_counts_from="obs.n_counts" if obs_n_counts is not None else "row sums")

    schema = pa.schema([pa.field("input_ids", pa.list_(pa.int32())), pa.field("length", pa.int64()),
                        pa.field("cell_index", pa.int64())] + [pa.field(str(c), _arrow_type(obs[c])) for c in columns])
    batches = []
    sink = writer = None
    work = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        work = out_dir.parent / f".{out_dir.name}.tmp"
        if work.exists():
            shutil.rmtree(work)
        (work / "dataset").mkdir(parents=True)
        sink = pa.OSFile(str(work / "dataset" / DATA_FILE), "wb")
        writer = pa.ipc.new_stream(sink, schema)
    try:
        spans = [(start, min(user.n_obs, start + chunk_size)) for start in range(0, user.n_obs, chunk_size)]
        # The next chunk is read (and checked) and the last batch written on threads while this one
        # is tokenized: in turn, reading, checking and writing took nearly a quarter of a 200k-cell run.
        with tqdm(total=int(keep.sum()), unit="cells", desc="tokenize", disable=not progress) as bar, \
                concurrent.futures.ThreadPoolExecutor(2) as io:
            reading, writing = io.submit(user.rows, *spans[0]), None
            for i, (start, stop) in enumerate(spans):
                X = reading.result()
                if i + 1 < len(spans):
                    reading = io.submit(user.rows, *spans[i + 1])
                rows = np.flatnonzero(keep[start:stop])
                if rows.size == 0:
                    continue
                if rows.size < X.shape[0]:
                    X = X[rows]
                n_counts = obs_n_counts[start:stop][rows] if obs_n_counts is not None else None
                flat, offsets = tokenizer.tokenize_csr_flat(X, match.gene_ids, n_counts)
                ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, pa.int32()))
                arrays = [ids, pa.array(np.diff(offsets)), pa.array(start + rows)]
                arrays += [pa.array(_column_values(obs[c].iloc[start:stop].iloc[rows]), schema.field(str(c)).type)
                           for c in columns]
                batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
                if writer is not None:
                    if writing is not None:
                        writing.result()
                    writing = io.submit(writer.write_batch, batch)
                else:
                    batches.append(batch)
                bar.update(rows.size)
            if writing is not None:
                writing.result()
        if writer is None:
            import datasets

            return datasets.Dataset(pa.Table.from_batches(batches, schema=schema))
        writer.close()
        sink.close()
        writer = None
        staged = work / "dataset"
        _write_dataset_metadata(staged)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staged, out_dir)
        shutil.rmtree(work)
        if not load:
            return None
        import datasets

        return datasets.load_from_disk(str(out_dir))
    except BaseException:
        if writer is not None:
            writer.close()
            sink.close()
        if work is not None and work.exists():
            shutil.rmtree(work)
        raise


def _write_dataset_metadata(folder: Path) -> None:
    """Make `folder`, which holds the cells as one Arrow stream named DATA_FILE, a folder that
    `datasets.load_from_disk` opens: the two files `Dataset.save_to_disk` writes beside its data.
    Writing them here saves that method's second copy of every cell (40% of a large tokenize).
    The info leaves the features out: `load_from_disk` reads them from the stream's schema, as
    for any Arrow data (the same features, in whatever form the installed datasets writes them)."""
    state = {"_data_files": [{"filename": DATA_FILE}], "_fingerprint": secrets.token_hex(8),
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {"citation": "", "description": "", "homepage": "", "license": ""}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))


def _arrow_type(series) -> pa.DataType:
    import pandas as pd

    if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype == object:
        return pa.string()
    if pd.api.types.is_bool_dtype(series.dtype):
        return pa.bool_()
    if pd.api.types.is_integer_dtype(series.dtype):
        return pa.int64()
    if pd.api.types.is_float_dtype(series.dtype):
        return pa.float64()
    return pa.string()


def _column_values(series) -> list:
    import pandas as pd

    if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype == object:
        return [None if pd.isna(v) else str(v) for v in series.tolist()]
    return series.tolist()
