"""Ontology terms for the cells of an ingest: labels, definitions, synonyms, parents, ancestors.

`langcell ingest ontologies --ingest INGEST` reads every `*_ontology_term_id` column of
`INGEST/cells/*.parquet`, resolves each id and all of its ancestors, and writes
`INGEST/ontology/terms.parquet` and `INGEST/ontology/unresolved.json` (see docs/DEVELOPING.md).

Two sources give the same records:
- `guide` (offline, the default): the JSON files that `cellxgene-ontology-guide` ships. It
  ships several versions of each ontology and, per CELLxGENE schema version, which ones that
  schema uses (`ontology_info.json`); the ingest's manifest names the schema of the Census
  release it read (`census_summary.dataset_schema_version`), and each ontology is taken in that
  schema's version where the guide has it, else in the newest version it ships. Which versions
  were used, and why, is in `unresolved.json` (`ontologies`). Their `ancestors` map carries a
  distance per ancestor; distance 1 are the direct parents. The guide follows `is_a` and
  `part_of` edges (UBERON's blood is part_of the hematopoietic system), so parents here are
  those edges too.
- `obo`: one OBO or OWL (RDF/XML) file or URL per ontology (`--ontology-file CL=cl.obo`; default
  the OBO Foundry PURLs), parsed with pronto (`ingest.obo_files`), parents = `is_a`
  superclasses plus `part_of` targets, ancestors by breadth-first search (nearest first), so
  both sources agree. References to terms a file does not declare are kept as parents by id and
  listed in `unresolved.json` (`dangling`). A file that cannot be read or parsed is reported
  there (`ontology_errors`) and the other ontologies still resolve.

Ids are resolved by their prefix (`CL:`, `UBERON:`, ...), whichever column they came from (the
Census uses CL terms as tissue of cell cultures and UBERON terms as development stages), in the
ontology of that prefix: never in another ontology's imported copy (cl.obo carries pruned UBERON
terms with other parents). A prefix without its own ontology (AfPO in HANCESTRO, OBI in EFO) is
looked up in the loaded ontologies in order.

An obsolete term whose `replaced_by` resolves keeps its own row with the replacement as its only
parent (its ancestors are the replacement's), and the replacement is recorded in
`unresolved.json` (`replaced_by`); one without a usable replacement keeps a row without
ancestors and is listed there (`obsolete`).
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
from typing import Any, Iterable, Sequence

from langcell.core.errors import LangCellError

log = logging.getLogger(__name__)

# Values the Census puts in term-id columns when no term applies; they are not ontology terms.
PLACEHOLDERS = frozenset({"", "unknown", "na", "nan", "none", "multiethnic", "unknown_ethnicity"})
# Census joins several ids in one value: ethnicity with ',', disease (schema 5+) with ' || '.
_SPLIT = re.compile(r"\s*(?:\|\||,)\s*")

TERM_COLUMNS = ("term_id", "ontology", "label", "definition", "synonyms", "parents", "ancestors",
                "deprecated", "n_cells", "source")

# OBO Foundry PURLs for `--source obo` without `--ontology-file`: the ontologies the Census draws
# terms from, by id prefix.
DEFAULT_OBO_URLS = {
    "CL": "http://purl.obolibrary.org/obo/cl.obo",
    "UBERON": "http://purl.obolibrary.org/obo/uberon.obo",
    "MONDO": "http://purl.obolibrary.org/obo/mondo.obo",
    "PATO": "http://purl.obolibrary.org/obo/pato.obo",
    "HsapDv": "http://purl.obolibrary.org/obo/hsapdv.obo",
    "MmusDv": "http://purl.obolibrary.org/obo/mmusdv.obo",
    "HANCESTRO": "http://purl.obolibrary.org/obo/hancestro.owl",
    "EFO": "http://www.ebi.ac.uk/efo/efo.obo",
}
# pronto keeps IRIs outside purl.obolibrary.org as they are (EFO's own classes are
# http://www.ebi.ac.uk/efo/EFO_0009922); ids are compared as CURIEs.
_IRI_ID = re.compile(r"^[a-z]+://.*/([A-Za-z][A-Za-z0-9]*)_([A-Za-z0-9]+)$")


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
    replaced_by: str | None = None


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


@functools.lru_cache(maxsize=None)
def _guide_catalogue(schema_version: str | None = None) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """(prefix -> (ontology name, version), ontology name -> why that version): the versions of
    CELLxGENE schema `schema_version` where the guide lists that schema and ships the file, the
    newest it ships otherwise."""
    data = _guide_data_dir()
    try:
        latest = json.loads((data / "latest_ontology_info.json").read_text())["ontologies"]
        by_schema = json.loads((data / "ontology_info.json").read_text())
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise LangCellError(f"{data}: cannot read the ontology guide's catalogue ({exc}); "
                            "reinstall cellxgene-ontology-guide") from None
    schema = by_schema.get(schema_version.lstrip("v"), {}).get("ontologies", {}) if schema_version else {}
    catalogue, why = {}, {}
    for name, entry in latest.items():
        version = schema.get(name, {}).get("version")
        if version is not None and (data / f"{name}-ontology-{version}.json.zst").is_file():
            why[name] = f"{version}, as CELLxGENE schema {schema_version} names it"
        else:
            version = entry["version"]
            reason = ("the ingest names no CELLxGENE schema version" if not schema_version else
                      f"the guide does not list schema {schema_version}" if not schema else
                      f"the guide lacks {name}'s version of schema {schema_version}")
            why[name] = f"{version}, the newest the guide ships ({reason})"
        for prefix in [name, *entry.get("additional_ontologies", [])]:
            catalogue[prefix] = (name, version)
    return catalogue, why


@functools.lru_cache(maxsize=None)
def load_guide_ontology(name: str, version: str) -> dict:
    """The guide's term table of ontology `name` in `version`: term id -> record."""
    import zstandard

    path = _guide_data_dir() / f"{name}-ontology-{version}.json.zst"
    try:
        with open(path, "rb") as handle:
            return json.load(zstandard.ZstdDecompressor().stream_reader(handle))
    except OSError as exc:
        raise LangCellError(f"{path}: cannot read the ontology guide's {name} ({exc.strerror}); "
                            "reinstall cellxgene-ontology-guide") from None


class GuideSource:
    """Resolve ids from the cellxgene-ontology-guide files, loading each ontology on first use, in
    the versions of CELLxGENE schema `schema_version` where the guide has them."""

    def __init__(self, schema_version: str | None = None):
        self.catalogue, self.versions = _guide_catalogue(schema_version)

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
                    deprecated=bool(record.get("deprecated", False)), source=f"guide:{name} {version}",
                    replaced_by=record.get("replaced_by") or None)

    def report(self) -> dict:
        return {"ontologies": {name: self.versions[name] for name in sorted(self.versions)}}

    def reason(self, term_id: str) -> str:
        entry = self.catalogue.get(prefix_of(term_id))
        if entry is None:
            return f"the ontology guide has no ontology for prefix {prefix_of(term_id) or term_id!r}"
        return f"not in the guide's {entry[0]} {entry[1]}"

    def _record(self, term_id: str) -> dict | None:
        entry = self.catalogue.get(prefix_of(term_id))
        return None if entry is None else load_guide_ontology(*entry).get(term_id)

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


def parse_ontology_files(items: Sequence[str]) -> dict[str, str]:
    """`--ontology-file` values (`PREFIX=path-or-url`, repeatable) -> {prefix: path or url}."""
    files: dict[str, str] = {}
    for item in items:
        prefix, sep, where = str(item).partition("=")
        prefix, where = prefix.strip(), where.strip()
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", prefix) or not where:
            raise LangCellError(f"--ontology-file {item!r}: expected PREFIX=PATH_OR_URL, e.g. CL=cl.obo or "
                                "MONDO=http://purl.obolibrary.org/obo/mondo.obo")
        if prefix in files:
            raise LangCellError(f"--ontology-file {prefix}: given twice ({files[prefix]}, {where}); pass one file "
                                "per ontology")
        files[prefix] = where
    return files


def _curie(term_id: str) -> str:
    match = _IRI_ID.match(term_id)
    return f"{match.group(1)}:{match.group(2)}" if match else term_id


class OboSource:
    """Resolve ids from one OBO/OWL file or URL per ontology, parsed with pronto; each id in the
    ontology its prefix names. Files that fail to load are recorded in `errors` (the others
    still resolve); references to undeclared terms are recorded in `dangling`."""

    def __init__(self, files: dict[str, str]):
        from langcell.ingest.obo_files import is_url, load_ontology, read_bytes

        if not files:
            raise LangCellError("--ontology-file: no ontology files given; pass PREFIX=PATH_OR_URL")
        self.files = dict(files)
        self.ontologies: dict[str, tuple[Any, dict[str, str]]] = {}
        self.errors: dict[str, str] = {}
        self.n_stubs: dict[str, int] = {}
        for name, item in self.files.items():
            try:
                data = read_bytes(item)
            except OSError as exc:  # URLError and socket timeouts are OSErrors
                what = "cannot download" if is_url(item) else "cannot read"
                self.errors[name] = f"{item}: {what} ({_one_line(exc)})"
                continue
            try:
                ontology, self.n_stubs[name] = load_ontology(data)
            except Exception as exc:  # pronto raises parser-specific types
                self.errors[name] = f"{item}: cannot parse as OBO/OWL ({type(exc).__name__}: {_one_line(exc)})"
                continue
            index = {_curie(term.id): term.id for term in ontology.terms()}
            self.ontologies[name] = (ontology, index)
        if not self.ontologies:
            raise LangCellError(f"--ontology-file: no ontology could be loaded ({'; '.join(self.errors.values())}); "
                                "check the files, or download them and pass their paths")
        self.dangling: dict[str, set[str]] = {}
        self._parents_cache: dict[str, list[str] | None] = {}

    def _homes(self, term_id: str) -> list[str]:
        prefix = prefix_of(term_id)
        if prefix in self.files:
            return [prefix] if prefix in self.ontologies else []
        return list(self.ontologies)

    def _lookup(self, term_id: str):
        """(ontology name, pronto term) of the declared term, or (None, None)."""
        from langcell.ingest.obo_files import is_stub

        for name in self._homes(term_id):
            ontology, index = self.ontologies[name]
            if term_id in index:
                entity = ontology[index[term_id]]
                if hasattr(entity, "superclasses") and not is_stub(entity):
                    return name, entity
        return None, None

    def _parents(self, term_id: str) -> list[str] | None:
        if term_id not in self._parents_cache:
            _, term = self._lookup(term_id)
            if term is None:
                self._parents_cache[term_id] = None
            else:
                parents = {_curie(t.id) for t in term.superclasses(distance=1, with_self=False)}
                for relation, targets in term.relationships.items():
                    if relation.id in _PART_OF or relation.name == "part of":
                        parents.update(_curie(t.id) for t in targets)
                parents.discard(term_id)
                for parent in parents:
                    if self._lookup(parent)[1] is None:
                        self.dangling.setdefault(parent, set()).add(term_id)
                self._parents_cache[term_id] = sorted(parents)
        return self._parents_cache[term_id]

    def get(self, term_id: str) -> Term | None:
        name, term = self._lookup(term_id)
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
        replaced_by = sorted(_curie(t.id) for t in term.replaced_by) if term.obsolete else []
        return Term(term_id=term_id, ontology=prefix_of(term_id), label=term.name or "",
                    definition=str(term.definition) if term.definition else "",
                    synonyms=sorted({s.description for s in term.synonyms}), parents=parents,
                    ancestors=ancestors, deprecated=bool(term.obsolete), source=f"obo:{self.files[name]}",
                    replaced_by=replaced_by[0] if len(replaced_by) == 1 else None)

    def report(self) -> dict:
        return {"ontologies": {name: f"{item} ({self.n_stubs[name]} undeclared terms referenced)"
                               if name in self.ontologies else f"{item} (not loaded)"
                               for name, item in sorted(self.files.items())},
                "ontology_errors": dict(sorted(self.errors.items())),
                "dangling": [{"term_id": t, "referenced_by": sorted(by)} for t, by in sorted(self.dangling.items())]}

    def reason(self, term_id: str) -> str:
        prefix = prefix_of(term_id)
        if prefix in self.errors:
            return f"ontology {prefix} not loaded: {self.errors[prefix]}"
        if prefix in self.files:
            return f"not declared in {self.files[prefix]}"
        return (f"no --ontology-file for prefix {prefix or term_id!r}, and no loaded ontology declares it; "
                f"add --ontology-file {prefix or 'PREFIX'}=FILE")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def make_source(source: str = "guide", ontology_files: Sequence[str] | None = None,
                schema_version: str | None = None):
    if source == "guide":
        if ontology_files:
            raise LangCellError("--ontology-file: only used with --source obo; add --source obo or drop it")
        return GuideSource(schema_version)
    if source == "obo":
        return OboSource(parse_ontology_files(ontology_files) if ontology_files else dict(DEFAULT_OBO_URLS))
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
    """Resolve ids and, transitively, every ancestor; returns (terms, ids that did not resolve).
    An obsolete term whose `replaced_by` resolves to a live term takes it as its only parent."""
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
        if term.deprecated and term.replaced_by:
            replacement = source.get(term.replaced_by)
            if replacement is not None and not replacement.deprecated:
                term.parents = [replacement.term_id]
                term.ancestors = [replacement.term_id, *replacement.ancestors]
        terms[term_id] = term
        for ancestor in term.ancestors:
            if ancestor not in seen:
                seen.add(ancestor)
                queue.append(ancestor)
    return terms, unresolved


def _followed(term: Term) -> bool:
    return term.deprecated and term.replaced_by is not None and term.parents == [term.replaced_by]


@dataclass
class OntologyResult:
    n_terms: int
    n_cell_terms: int
    unresolved: dict[str, int]
    terms_path: Path
    unresolved_path: Path


def ingest_ontologies(ingest: str | os.PathLike, source: str = "guide",
                      ontology_files: Sequence[str] | None = None) -> OntologyResult:
    """Write INGEST/ontology/terms.parquet and unresolved.json for the cells of INGEST.
    `ontology_files`: `PREFIX=path-or-url` items for `source="obo"`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from langcell.core.files import atomic_path, atomic_write_json, output_lock

    ingest = Path(ingest)
    if not ingest.is_dir():
        raise LangCellError(f"{ingest}: ingest folder not found; pass the --out folder of `langcell ingest census`")
    manifest_path = ingest / "manifest.json"
    schema_version = None
    if manifest_path.is_file():
        from langcell.core.files import read_json

        manifest = read_json(manifest_path, "ingest manifest")
        if not manifest.get("complete", False):
            log.warning("%s: the ingest is not complete; terms cover only the parts written so far", manifest_path)
        schema_version = (manifest.get("census_summary") or {}).get("dataset_schema_version")
    by_id, cell_counts, placeholders = count_term_ids(ingest / "cells")
    resolver = make_source(source, ontology_files, schema_version)
    for name, error in getattr(resolver, "errors", {}).items():
        log.warning("ontology %s not loaded, its ids stay unresolved: %s", name, error)
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
            **({"census_schema": schema_version} if source == "guide" else {}),
            "n_unresolved": len(unresolved),
            "unresolved": [{"term_id": t, "n_cells": n, "columns": dict(sorted(by_id[t].items())),
                            "reason": resolver.reason(t)}
                           for t, n in sorted(unresolved.items(), key=lambda kv: (-kv[1], kv[0]))],
            "placeholders": dict(sorted(placeholders.items())),
            "replaced_by": {t.term_id: t.replaced_by for t in rows if _followed(t)},
            "obsolete": [{"term_id": t.term_id, "n_cells": cell_counts.get(t.term_id, 0), "replaced_by": t.replaced_by}
                         for t in rows if t.deprecated and not _followed(t)],
            **resolver.report(),
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
    from langcell.core.files import atomic_path

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
