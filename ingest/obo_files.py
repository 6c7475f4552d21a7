"""Read one OBO or OWL (RDF/XML) ontology file with pronto, whatever it refers to.

pronto raises KeyError while parsing when an `is_a` / `rdfs:subClassOf` points at a class the
file does not declare, or a `relationship:` names an undeclared relation, and later when a
relationship or `replaced_by` target is undeclared. Real files do this all the time (MONDO
refers to thousands of terms of other ontologies it does not import). So before parsing, every
referenced but undeclared class and relation gets a stub declaration carrying `STUB_MARK` as its
comment: the file parses, the references stay (a parent is kept by its id), and callers tell a
stub from a real term by `is_stub`.
"""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

STUB_MARK = "langcell: referenced, not declared in this file"

# OBO tags whose value starts with a term id (after an optional relation for the two-part forms).
_OBO_TERM_REFS = ("is_a", "union_of", "disjoint_from", "equivalent_to", "replaced_by", "consider")
_OBO_RELATION_REFS = ("relationship", "intersection_of")
_OBO_ID = re.compile(r"^\s*id:\s*(\S+)")
_OBO_TAG = re.compile(r"^\s*([a-z_]+):\s*(\S+)(?:\s+(\S+))?")
_RDF_CLASS = re.compile(rb'<owl:Class\s+rdf:about="([^"]+)"')
_RDF_PROPERTY = re.compile(rb'<owl:(?:Object|Annotation|Datatype)Property\s+rdf:about="([^"]+)"')
_RDF_CLASS_REF = re.compile(rb'<(?:rdfs:subClassOf|owl:someValuesFrom|owl:allValuesFrom|obo:IAO_0100001)'
                            rb'\s+rdf:resource="([^"]+)"')
_RDF_PROPERTY_REF = re.compile(rb'<owl:onProperty\s+rdf:resource="([^"]+)"')


def is_url(item: str) -> bool:
    return re.match(r"^[a-z]+://", str(item)) is not None


def read_bytes(item: str, timeout: float = 300.0) -> bytes:
    """The file or URL's bytes, gunzipped when gzipped. Raises OSError (URLError is one)."""
    if is_url(item):
        import urllib.request

        with urllib.request.urlopen(item, timeout=timeout) as response:
            data = response.read()
    else:
        data = Path(item).read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def load_ontology(data: bytes):
    """A pronto.Ontology of `data` (OBO or RDF/XML) with its dangling references declared as stubs;
    returns (ontology, number of stubs)."""
    import pronto

    data, stubs = _declare_dangling(data)
    # import_depth=0: imported ontologies would be fetched from the network.
    return pronto.Ontology(io.BytesIO(data), import_depth=0), stubs


def is_stub(entity) -> bool:
    return (entity.comment or "") == STUB_MARK


def _declare_dangling(data: bytes) -> tuple[bytes, int]:
    head = data.lstrip()[:512]
    if head.startswith(b"<"):
        return _declare_dangling_rdf(data)
    return _declare_dangling_obo(data)


def _declare_dangling_obo(data: bytes) -> tuple[bytes, int]:
    terms, relations, term_refs, relation_refs = set(), set(), set(), set()
    stanza = None
    for line in data.decode("utf-8", errors="replace").splitlines():
        if line.startswith("["):
            stanza = line.strip()
            continue
        match = _OBO_ID.match(line)
        if match and stanza in ("[Term]", "[Typedef]"):
            (terms if stanza == "[Term]" else relations).add(match.group(1))
            continue
        match = _OBO_TAG.match(line)
        if not match:
            continue
        tag, first, second = match.groups()
        if tag in _OBO_TERM_REFS:
            (term_refs if stanza == "[Term]" else relation_refs).add(first)
        elif tag in _OBO_RELATION_REFS and stanza == "[Term]":
            if second is None or second.startswith(("!", "{")):
                term_refs.add(first)  # intersection_of: GENUS
            else:
                relation_refs.add(first)
                term_refs.add(second)
    missing_terms, missing_relations = sorted(term_refs - terms), sorted(relation_refs - relations)
    stubs = [f"[Term]\nid: {term}\ncomment: {STUB_MARK}\n" for term in missing_terms]
    stubs += [f"[Typedef]\nid: {relation}\ncomment: {STUB_MARK}\n" for relation in missing_relations]
    if not stubs:
        return data, 0
    return data.rstrip() + b"\n\n" + "\n".join(stubs).encode(), len(missing_terms)


def _declare_dangling_rdf(data: bytes) -> tuple[bytes, int]:
    classes = set(_RDF_CLASS.findall(data))
    properties = set(_RDF_PROPERTY.findall(data))
    missing_classes = sorted(set(_RDF_CLASS_REF.findall(data)) - classes)
    missing_properties = sorted(set(_RDF_PROPERTY_REF.findall(data)) - properties)
    if not missing_classes and not missing_properties:
        return data, 0
    mark = f"<rdfs:comment>{STUB_MARK}</rdfs:comment>".encode()
    stubs = b"".join(b'<owl:Class rdf:about="' + iri + b'">' + mark + b"</owl:Class>\n" for iri in missing_classes)
    stubs += b"".join(b'<owl:ObjectProperty rdf:about="' + iri + b'">' + mark + b"</owl:ObjectProperty>\n"
                      for iri in missing_properties)
    end = data.rfind(b"</rdf:RDF>")
    if end < 0:
        return data, 0  # not RDF/XML after all: let pronto say what it is
    return data[:end] + stubs + data[end:], len(missing_classes)
