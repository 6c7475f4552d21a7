"""Per-cell texts: one description per identity aspect, from the ontology terms of the ingest.

`cell type: B cell. A lymphocyte of B lineage that is capable of B cell mediated immunity.`
Values the Census uses as placeholders (`unknown`, `na`, ...) give no text. A value whose term the
ontologies do not resolve keeps its Census label without a definition. A value joining several
ids (`MONDO:1 || MONDO:2`) lists every label and definition.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from langcell.ingest.ontology import PLACEHOLDERS, split_term_ids
from langcell.core.errors import LangCellError

from langcell.build_sclibrary.config import TextConfig
from langcell.build_sclibrary.ingest_io import ASPECTS


@dataclass
class TermInfo:
    label: str
    definition: str
    synonyms: list[str]
    parents: list[str]


def load_terms(ingest_root: str | os.PathLike) -> dict[str, TermInfo]:
    path = Path(ingest_root) / "ontology" / "terms.parquet"
    if not path.is_file():
        raise LangCellError(f"{path}: ontology terms not found; run `langcell ingest ontologies --ingest {ingest_root}`")
    table = pq.read_table(path)
    missing = [c for c in ("term_id", "label", "definition", "synonyms", "parents") if c not in table.column_names]
    if missing:
        raise LangCellError(f"{path}: column {missing[0]!r} missing; rerun `langcell ingest ontologies`")
    columns = {c: table[c].to_pylist() for c in ("term_id", "label", "definition", "synonyms", "parents")}
    return {tid: TermInfo(label or tid, definition or "", list(syn or []), list(par or []))
            for tid, label, definition, syn, par in zip(columns["term_id"], columns["label"], columns["definition"],
                                                        columns["synonyms"], columns["parents"])}


def as_sentence(text: str) -> str:
    text = " ".join(str(text).split())
    return text if not text or text.endswith((".", "!", "?")) else text + "."


def is_placeholder(value) -> bool:
    return value is None or str(value).strip().lower() in PLACEHOLDERS


class TextBuilder:
    """Texts for cells, cached per (aspect, label, term id) since a corpus has few distinct values."""

    def __init__(self, terms: dict[str, TermInfo], config: TextConfig):
        self.terms = terms
        self.config = config
        self._cache: dict[tuple, str | None] = {}

    def describe(self, aspect: str, label, term_value) -> str | None:
        key = (aspect, label, term_value)
        if key not in self._cache:
            self._cache[key] = self._describe(aspect, label, term_value)
        return self._cache[key]

    def _describe(self, aspect: str, label, term_value) -> str | None:
        ids = split_term_ids(term_value) if not is_placeholder(term_value) else []
        prefix = self.config.prefixes[aspect]
        labels, definitions = [], []
        for tid in ids:
            term = self.terms.get(tid)
            if term is not None:
                labels.append(term.label)
                if term.definition:
                    definitions.append(as_sentence(term.definition))
        if not labels:
            if is_placeholder(label):
                return None
            labels = [str(label)]
        label_text = ", ".join(labels)
        if definitions:
            return self.config.template.format(prefix=prefix, label=label_text, definition=" ".join(definitions)).strip()
        return self.config.template_no_definition.format(prefix=prefix, label=label_text).strip()

    def texts_for(self, meta: dict) -> dict[str, str]:
        texts = {}
        for aspect in ASPECTS:
            text = self.describe(aspect, meta.get(aspect), meta.get(f"{aspect}_ontology_term_id"))
            if text:
                texts[aspect] = text
        return texts

    def variants(self, aspect: str, term_id: str) -> dict | None:
        """Canonical text plus synonym and parent variants of one resolved term (for augmentation)."""
        term = self.terms.get(term_id)
        if term is None:
            return None
        prefix = self.config.prefixes[aspect]
        definition = as_sentence(term.definition) if term.definition else ""
        canonical = self._describe(aspect, term.label, term_id)
        synonyms = [self.config.synonym_template.format(prefix=prefix, synonym=s, definition=definition).strip()
                    for s in term.synonyms[:self.config.max_synonyms] if s and s != term.label]
        parents = [self.config.parent_template.format(prefix=prefix, label=term.label,
                                                      parent=self.terms[p].label).strip()
                   for p in term.parents if p in self.terms][:self.config.max_parents]
        return {"label": term.label, "text": canonical, "synonym_texts": synonyms, "parent_texts": parents}
