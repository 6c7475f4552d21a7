"""Cell Ontology look-ups for eval: label <-> CL id, definitions, ancestors and descendants.

Two sources with the same interface: the ingest's `ontology/terms.parquet` (the exact ontology
the library was built from) or, when no ingest folder is at hand, the CL release shipped in
`cellxgene-ontology-guide` (the version the Census uses).
"""

from __future__ import annotations

from pathlib import Path

from langcell.core.errors import LangCellError


class CellOntology:
    def __init__(self, labels: dict[str, str], definitions: dict[str, str],
                 ancestors: dict[str, list[str]], synonyms: dict[str, list[str]]):
        self.labels = labels
        self.definitions = definitions
        self._ancestors = ancestors
        self._by_name: dict[str, str] = {}
        # Synonyms first so that an exact label always wins over another term's synonym.
        for term, syns in synonyms.items():
            for syn in syns:
                self._by_name.setdefault(syn.strip().lower(), term)
        for term, label in labels.items():
            self._by_name[label.strip().lower()] = term
        self._children: dict[str, set[str]] | None = None

    @classmethod
    def from_terms_parquet(cls, path: str | Path) -> "CellOntology":
        import pandas as pd

        path = Path(path)
        if not path.is_file():
            raise LangCellError(f"{path}: ontology terms not found; run `langcell ingest ontologies` "
                                "or leave the option out to use cellxgene-ontology-guide's CL")
        df = pd.read_parquet(path)
        missing = {"term_id", "label", "definition", "ancestors"} - set(df.columns)
        if missing:
            raise LangCellError(f"{path}: columns {sorted(missing)} missing; rerun `langcell ingest ontologies`")
        df = df[df["term_id"].str.startswith("CL:")]
        syn = df["synonyms"] if "synonyms" in df.columns else [[]] * len(df)
        return cls(labels=dict(zip(df["term_id"], df["label"])),
                   definitions=dict(zip(df["term_id"], df["definition"].fillna(""))),
                   ancestors={t: list(a) for t, a in zip(df["term_id"], df["ancestors"])},
                   synonyms={t: list(s) if s is not None else [] for t, s in zip(df["term_id"], syn)})

    @classmethod
    def from_ontology_guide(cls) -> "CellOntology":
        from cellxgene_ontology_guide.ontology_parser import OntologyParser

        parser = OntologyParser()
        terms = [t for t in parser.cxg_schema.ontology("CL") if t.startswith("CL:")]
        labels, defs, ancestors, synonyms = {}, {}, {}, {}
        for term in terms:
            meta = parser.cxg_schema.ontology("CL")[term]
            if meta.get("deprecated"):
                continue
            labels[term] = meta.get("label", term)
            defs[term] = meta.get("description") or ""
            ancestors[term] = [a for a in meta.get("ancestors", {}) if a.startswith("CL:")]
            synonyms[term] = list(meta.get("synonyms") or [])
        return cls(labels, defs, ancestors, synonyms)

    @classmethod
    def load(cls, terms_parquet: str | Path | None = None) -> "CellOntology":
        return cls.from_terms_parquet(terms_parquet) if terms_parquet else cls.from_ontology_guide()

    def term_for(self, name_or_id: str) -> str | None:
        """CL id for a CL id, a label or a synonym (case-insensitive); None when unknown."""
        name_or_id = str(name_or_id).strip()
        if name_or_id in self.labels:
            return name_or_id
        return self._by_name.get(name_or_id.lower())

    def ancestors(self, term: str) -> set[str]:
        return set(self._ancestors.get(term, ()))

    def ancestor_map(self) -> dict[str, set[str]]:
        return {t: set(a) for t, a in self._ancestors.items()}

    def descendants(self, root: str) -> list[str]:
        """Every term that has `root` among its ancestors, sorted by id (root itself excluded)."""
        if root not in self.labels:
            raise LangCellError(f"--ontology-root: '{root}' is not a CL term id; pass one like CL:0000542")
        return sorted(t for t, anc in self._ancestors.items() if root in anc)

    def description(self, term: str, prompt: dict) -> str:
        """The term's class text in `prompt` (eval.prompts)."""
        from langcell.eval.prompts import class_text

        return class_text(prompt, self.labels[term], self.definitions.get(term, ""))
