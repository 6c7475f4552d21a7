"""Write one benchmark's results into its own section of BENCHMARKS.md, leaving the others alone."""

from __future__ import annotations

import re
from pathlib import Path

from langcell.core.files import atomic_write_bytes

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def record_section(heading: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the body of the `## {heading}` section (up to the next `## `) with `body`."""
    text = path.read_text()
    new, count = re.subn(rf"(## {re.escape(heading)}\n)(.*?)(?=\n## |\Z)",
                         lambda m: m.group(1) + body.rstrip() + "\n", text, count=1, flags=re.S)
    if count != 1:
        raise RuntimeError(f"{path}: no '## {heading}' section to record into")
    atomic_write_bytes(path, new.encode())


def record_subsection(heading: str, subheading: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append at the end of `## {heading}`) the `### {subheading}` block, so that one
    benchmark's cases are recorded one run at a time without wiping the others."""
    text = path.read_text()
    section = re.search(rf"## {re.escape(heading)}\n(.*?)(?=\n## |\Z)", text, flags=re.S)
    if section is None:
        raise RuntimeError(f"{path}: no '## {heading}' section to record into")
    inner = section.group(1)
    block = f"### {subheading}\n{body.rstrip()}\n"
    inner, count = re.subn(rf"### {re.escape(subheading)}\n.*?(?=\n### |\Z)", lambda m: block.rstrip("\n") + "\n",
                           inner, count=1, flags=re.S)
    if count == 0:
        inner = inner.rstrip("\n") + "\n\n" + block
    atomic_write_bytes(path, (text[:section.start(1)] + inner + text[section.end(1):]).encode())
