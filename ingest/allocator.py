"""Allocator setting of a process that runs the ingest.

Arrow's default memory pool (mimalloc) hands freed pages back to the kernel 10 ms after they are
freed, so parquet encoding faults a fresh set of pages in for every chunk: 0.12-0.22 CPU-s of
system time per 20,000-cell chunk here, 0.01 with the pages kept (BENCHMARKS.md, Ingest). mimalloc
reads the setting from the environment once, when pyarrow loads, so it is set before pyarrow is
imported; worker processes inherit it. The cost is that Arrow memory freed by the process stays
mapped to it, so its resident size stays at its peak.
"""

from __future__ import annotations

import os
import sys

PURGE_DELAY = "MIMALLOC_PURGE_DELAY"


def keep_arrow_pages() -> bool:
    """Ask Arrow's mimalloc pool to keep freed pages; False when pyarrow is already loaded (too
    late to take effect). A value the user set is left alone."""
    if "pyarrow" in sys.modules:
        return False
    os.environ.setdefault(PURGE_DELAY, "-1")
    return True
