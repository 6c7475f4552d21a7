"""Ontology terms for the cells of an ingest: labels, definitions, synonyms, parents, ancestors.

`langcell ingest ontologies --ingest INGEST` reads every `*_ontology_term_id` column of
`INGEST/cells/*.parquet`, resolves each id and all of its ancestors, and writes
`INGEST/ontology/terms.parquet` and `INGEST/ontology/unresolved.json` (see docs/DEVELOPING.md).

Two sources give the same records:
- `guide` (offline, the default): the JSON files that `cellxgene-ontology-guide` ships, the
  ontology versions the Census uses. Their `ancestors` map carries a distance per ancestor;
  distance 1 are the direct parents. The guide follows `is_a` and `part_of` edges (UBERON's
  blood is part_of the hematopoietic system), so parents here are those edges too.
- `obo`: OBO or OWL files (paths or URLs) parsed with pronto, parents = `is_a` superclasses plus
  `part_of` targets, ancestors by breadth-first search (nearest first), so both sources agree.

Ids are resolved by their prefix (`CL:`, `UBERON:`, ...), whichever column they came from: the
Census uses CL terms as tissue of cell cultures and UBERON terms as development stages.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from langcell.errors import LangCellError

log = logging.getLogger(__name__)

# Values the Census puts in term-id columns when no term applies; they are not ontology terms.
PLACEHOLDERS = frozenset({"", "unknown", "na", "nan", "none", "multiethnic", "unknown_ethnicity"})
# Census joins several ids in one value: ethnicity with ',', disease (schema 5+) with ' || '.
_SPLIT = re.compile(r"\s*(?:\|\||,)\s*")

TERM_COLUMNS = ("term_id", "ontology", "label", "definition", "synonyms", "parents", "ancestors",
                "deprecated", "n_cells", "source")

# OBO Foundry PURLs for `--source obo` without `--obo`: the ontologies the Census draws terms from.
DEFAULT_OBO_URLS = (
    "http://purl.obolibrary.org/obo/cl.obo",
    "http://purl.obolibrary.org/obo/uberon.obo",
    "http://purl.obolibrary.org/obo/mondo.obo",
    "http://purl.obolibrary.org/obo/pato.obo",
    "http://purl.obolibrary.org/obo/hsapdv.obo",
    "http://purl.obolibrary.org/obo/mmusdv.obo",
    "http://purl.obolibrary.org/obo/hancestro.owl",
    "http://www.ebi.ac.uk/efo/efo.obo",
)


@dataclass
class Term:
    term_id: str
    ontology: str
    label: str
    definition: str
    synonyms: list[str]
    parents: list[str]
    ancestors: list[str]
    deprecated: bool
    source: str


def split_term_ids(value) -> list[str]:
    """The real term ids inside one Census value: split joined ids, drop placeholders."""
    if value is None:
        return []
    ids = []
    for part in _SPLIT.split(str(value).strip()):
        if part.lower() not in PLACEHOLDERS:
            ids.append(part)
    return ids


def prefix_of(term_id: str) -> str:
    return term_id.split(":", 1)[0] if ":" in term_id else ""


# --- guide source ------------------------------------------------------------------------------
def _guide_data_dir() -> Path:
    import cellxgene_ontology_guide

    return Path(cellxgene_ontology_guide.__file__).parent / "data"


@functools.lru_cache(maxsize=1)
def _guide_catalogue() -> dict[str, tuple[str, str]]:
    """prefix -> (ontology file name, version) for the latest version of each ontology."""
    info_path = _guide_data_dir() / "latest_ontology_info.json"
    try:
        info = json.loads(info_path.read_text())["ontologies"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise LangCellError(f"{info_path}: cannot read the ontology guide's catalogue ({exc}); "
                            "reinstall cellxgene-ontology-guide") from None
    catalogue = {}
    for name, entry in info.items():
        for prefix in [name, *entry.get("additional_ontologies", [])]:
            catalogue[prefix] = (name, entry["version"])
    return catalogue


@functools.lru_cache(maxsize=None)
def load_guide_ontology(name: str) -> dict:
    """The guide's term table of ontology `name` (latest version): term id -> record."""
    import zstandard

    catalogue = _guide_catalogue()
    if name not in catalogue:
        raise LangCellError(f"ontology guide: no ontology {name!r}; known: {', '.join(sorted(catalogue))}")
    file_name, version = catalogue[name][0], catalogue[name][1]
    path = _guide_data_dir() / f"{file_name}-ontology-{version}.json.zst"
    with open(path, "rb") as handle:
        return json.load(zstandard.ZstdDecompressor().stream_reader(handle))


class GuideSource:
    """Resolve ids from the cellxgene-ontology-guide files, loading each ontology on first use."""

    def __init__(self):
        self.catalogue = _guide_catalogue()

    def get(self, term_id: str) -> Term | None:
        entry = self.catalogue.get(prefix_of(term_id))
        if entry is None:
            return None
        name, version = entry
        record = self._record(term_id)
        if record is None:
            return None
        # Ties in distance are ordered by id so the output is the same on every run.
        ancestors = sorted(record.get("ancestors", {}).items(), key=lambda kv: (kv[1], kv[0]))
        return Term(term_id=term_id, ontology=prefix_of(term_id), label=record.get("label", ""),
                    definition=record.get("description", "") or "",
                    synonyms=sorted(set(record.get("synonyms", []) or [])),
                    parents=self._parents(record), ancestors=[a for a, _ in ancestors],
                    deprecated=bool(record.get("deprecated", False)), source=f"guide:{name} {version}")

    def _record(self, term_id: str) -> dict | None:
        entry = self.catalogue.get(prefix_of(term_id))
        return None if entry is None else load_guide_ontology(entry[0]).get(term_id)

    def _parents(self, record: dict) -> list[str]:
        """Distance-1 ancestors, plus the nearest ancestors reached only through a term the guide
        left out (it keeps ancestors of the term's own ontology, so EFO's path through OBI
        terms shows as a gap); without them such a term would look like a root."""
        ancestors = record.get("ancestors", {})
        parents = {a for a, d in ancestors.items() if d == 1}
        above: set[str] = set()
        for ancestor in ancestors:
            ancestor_record = self._record(ancestor)
            if ancestor_record is not None:
                above.update(ancestor_record.get("ancestors", {}))
        parents.update(a for a in ancestors if a not in above)
        return sorted(parents)

    def label(self, term_id: str) -> str:
        term = self.get(term_id)
        if term is None:
            raise LangCellError(f"ontology guide: term {term_id} not found; use an id of a shipped "
                                f"ontology ({', '.join(sorted(self.catalogue))})")
        return term.label


# --- obo source ----------------------------------------------------------------------------------
_PART_OF = {"part_of", "BFO:0000050"}


class OboSource:
    """Resolve ids from OBO/OWL files or URLs parsed with pronto (first file holding an id wins)."""

    def __init__(self, paths_or_urls: Sequence[str]):
        import pronto

        if not paths_or_urls:
            raise LangCellError("--obo: no ontology files given; pass OBO/OWL paths or URLs")
        self.ontologies = []
        for item in paths_or_urls:
            is_url = re.match(r"^[a-z]+://", str(item)) is not None
            if not is_url and not Path(item).is_file():
                raise LangCellError(f"{item}: ontology file not found; pass an OBO/OWL file or URL")
            try:
                # import_depth=0: imported ontologies would be fetched from the network.
                self.ontologies.append((str(item), pronto.Ontology(str(item), import_depth=0)))
            except OSError as exc:  # URLError and socket timeouts are OSErrors
                if not is_url:
                    raise LangCellError(f"{item}: cannot read ({exc}); check the file") from None
                raise LangCellError(f"{item}: cannot download ({exc}); check the network, or download "
                                    "the file and pass its path with --obo") from None
            except Exception as exc:  # pronto raises parser-specific types
                raise LangCellError(f"{item}: cannot parse as OBO/OWL ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}); check the file or URL") from None
        self._parents_cache: dict[str, list[str] | None] = {}

    def _lookup(self, term_id: str):
        for source, ont in self.ontologies:
            if term_id in ont:
                entity = ont[term_id]
                if hasattr(entity, "superclasses"):
                    return source, entity
        return None, None

    def _parents(self, term_id: str) -> list[str] | None:
        if term_id not in self._parents_cache:
            _, term = self._lookup(term_id)
            if term is None:
                self._parents_cache[term_id] = None
            else:
                parents = {t.id for t in term.superclasses(distance=1, with_self=False)}
                for relation, targets in term.relationships.items():
                    if relation.id in _PART_OF or relation.name == "part of":
                        parents.update(t.id for t in targets)
                parents.discard(term_id)
                self._parents_cache[term_id] = sorted(parents)
        return self._parents_cache[term_id]

    def get(self, term_id: str) -> Term | None:
        source, term = self._lookup(term_id)
        if term is None:
            return None
        parents = self._parents(term_id) or []
        distance = {p: 1 for p in parents}
        frontier = list(parents)
        while frontier:
            nxt = []
            for node in frontier:
                for parent in self._parents(node) or []:
                    if parent not in distance and parent != term_id:
                        distance[parent] = distance[node] + 1
                        nxt.append(parent)
            frontier = nxt
        ancestors = [a for a, _ in sorted(distance.items(), key=lambda kv: (kv[1], kv[0]))]
        return Term(term_id=term_id, ontology=prefix_of(term_id), label=term.name or "",
                    definition=str(term.definition) if term.definition else "",
                    synonyms=sorted({s.description for s in term.synonyms}), parents=parents,
                    ancestors=ancestors, deprecated=bool(term.obsolete), source=f"obo:{source}")


def make_source(source: str = "guide", obo: Sequence[str] | None = None):
    if source == "guide":
        return GuideSource()
    if source == "obo":
        return OboSource(list(obo) if obo else list(DEFAULT_OBO_URLS))
    raise LangCellError(f"--source: unknown ontology source {source!r}; use guide or obo")


# --- terms for an ingest -------------------------------------------------------------------------
def count_term_ids(cells_dir: str | os.PathLike) -> tuple[dict[str, Counter], Counter, Counter]:
    """Per term id: cell counts by column; cells using the term in any column (a cell whose
    tissue and tissue_general are both blood counts once); placeholder counts by column:value."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    cells_dir = Path(cells_dir)
    parts = sorted(cells_dir.glob("*.parquet"))
    if not parts:
        raise LangCellError(f"{cells_dir}: no cell parquet files; run `langcell ingest census --out "
                            f"{cells_dir.parent}` first")
    by_id: dict[str, Counter] = {}
    cells: Counter = Counter()
    placeholders: Counter = Counter()
    for part in parts:
        try:
            handle = pq.ParquetFile(part)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for damaged files
            raise LangCellError(f"{part}: not a readable parquet file ({exc}); rerun the ingest") from None
        columns = [c for c in handle.schema_arrow.names if c.endswith("_ontology_term_id")]
        if not columns:
            raise LangCellError(f"{part}: no *_ontology_term_id columns; the ingest contract requires them")
        for batch in handle.iter_batches(columns=columns, batch_size=1 << 16):
            codes: dict[str, np.ndarray] = {}
            refs: dict[str, list[tuple[str, int, int]]] = {}
            for column in columns:
                codes[column], uniques = pd.factorize(batch.column(column).to_pandas().astype(str))
                sizes = np.bincount(codes[column], minlength=len(uniques))
                for k, value in enumerate(uniques):
                    ids = split_term_ids(value)
                    if not ids:
                        placeholders[f"{column}:{value}"] += int(sizes[k])
                    for term_id in ids:
                        by_id.setdefault(term_id, Counter())[column] += int(sizes[k])
                        refs.setdefault(term_id, []).append((column, k, int(sizes[k])))
            for term_id, where in refs.items():
                if len({column for column, _, _ in where}) == 1:
                    cells[term_id] += sum(n for _, _, n in where)
                else:
                    used = np.zeros(batch.num_rows, dtype=bool)
                    for column, k, _ in where:
                        used |= codes[column] == k
                    cells[term_id] += int(used.sum())
    return by_id, cells, placeholders


def resolve_terms(term_ids: Iterable[str], source) -> tuple[dict[str, Term], list[str]]:
    """Resolve ids and, transitively, every ancestor; returns (terms, ids that did not resolve)."""
    terms: dict[str, Term] = {}
    unresolved: list[str] = []
    queue = list(dict.fromkeys(term_ids))
    seen = set(queue)
    while queue:
        term_id = queue.pop()
        term = source.get(term_id)
        if term is None:
            unresolved.append(term_id)
            continue
        terms[term_id] = term
        for ancestor in term.ancestors:
            if ancestor not in seen:
                seen.add(ancestor)
                queue.append(ancestor)
    return terms, unresolved


@dataclass
class OntologyResult:
    n_terms: int
    n_cell_terms: int
    unresolved: dict[str, int]
    terms_path: Path
    unresolved_path: Path


def ingest_ontologies(ingest: str | os.PathLike, source: str = "guide",
                      obo: Sequence[str] | None = None) -> OntologyResult:
    """Write INGEST/ontology/terms.parquet and unresolved.json for the cells of INGEST."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from langcell.files import atomic_path, atomic_write_json, output_lock

    ingest = Path(ingest)
    if not ingest.is_dir():
        raise LangCellError(f"{ingest}: ingest folder not found; pass the --out folder of `langcell ingest census`")
    manifest = ingest / "manifest.json"
    if manifest.is_file():
        from langcell.files import read_json

        if not read_json(manifest, "ingest manifest").get("complete", False):
            log.warning("%s: the ingest is not complete; terms cover only the parts written so far", manifest)
    by_id, cell_counts, placeholders = count_term_ids(ingest / "cells")
    resolver = make_source(source, obo)
    out_dir = ingest / "ontology"
    with output_lock(out_dir):
        terms, unresolved_ids = resolve_terms(sorted(by_id), resolver)
        # Ancestors that no loaded ontology holds are not errors: only ids of cells are reported.
        unresolved = {t: cell_counts[t] for t in sorted(unresolved_ids) if t in cell_counts}
        rows = sorted(terms.values(), key=lambda t: (t.ontology, t.term_id))
        table = pa.table({
            "term_id": [t.term_id for t in rows], "ontology": [t.ontology for t in rows],
            "label": [t.label for t in rows], "definition": [t.definition for t in rows],
            "synonyms": pa.array([t.synonyms for t in rows], pa.list_(pa.string())),
            "parents": pa.array([t.parents for t in rows], pa.list_(pa.string())),
            "ancestors": pa.array([t.ancestors for t in rows], pa.list_(pa.string())),
            "deprecated": pa.array([t.deprecated for t in rows], pa.bool_()),
            "n_cells": pa.array([cell_counts.get(t.term_id, 0) for t in rows], pa.int64()),
            "source": [t.source for t in rows],
        }).select(list(TERM_COLUMNS))
        terms_path = out_dir / "terms.parquet"
        with atomic_path(terms_path) as tmp:
            pq.write_table(table, tmp)
        unresolved_path = out_dir / "unresolved.json"
        atomic_write_json(unresolved_path, {
            "source": source,
            "n_unresolved": len(unresolved),
            "unresolved": [{"term_id": t, "n_cells": n, "columns": dict(sorted(by_id[t].items()))}
                           for t, n in sorted(unresolved.items(), key=lambda kv: (-kv[1], kv[0]))],
            "placeholders": dict(sorted(placeholders.items())),
        })
    if unresolved:
        shown = ", ".join(f"{t} ({n} cells)" for t, n in list(unresolved.items())[:5])
        log.warning("%d term ids resolve in no ontology: %s; see %s", len(unresolved), shown, unresolved_path)
    return OntologyResult(n_terms=len(rows), n_cell_terms=len(by_id) - len(unresolved),
                          unresolved=unresolved, terms_path=terms_path, unresolved_path=unresolved_path)


def _obo_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def write_obo(terms: Iterable[Term], path: str | os.PathLike, ontology: str = "subset") -> None:
    """Write terms as a minimal OBO 1.4 file (name, def, EXACT synonyms, one is_a per parent),
    e.g. to hand a resolved subset to OBO tools or to check the pronto path offline."""
    from langcell.files import atomic_path

    lines = ["format-version: 1.4", f"ontology: {ontology}", ""]
    for term in terms:
        lines += ["[Term]", f"id: {term.term_id}", f"name: {term.label}"]
        if term.definition:
            lines.append(f'def: "{_obo_escape(term.definition)}" []')
        lines += [f'synonym: "{_obo_escape(s)}" EXACT []' for s in term.synonyms]
        lines += [f"is_a: {p}" for p in term.parents]
        if term.deprecated:
            lines.append("is_obsolete: true")
        lines.append("")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
