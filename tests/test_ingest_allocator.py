"""The ingest command's allocator setting takes effect only before pyarrow loads, and never
overrides the user's own."""

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, os, sys
from langcell.ingest.allocator import keep_arrow_pages, PURGE_DELAY
first = keep_arrow_pages()
import pyarrow
print(json.dumps([first, keep_arrow_pages(), os.environ.get(PURGE_DELAY)]))
"""


@pytest.mark.parametrize("preset, expected", [(None, "-1"), ("250", "250")])
def test_keep_arrow_pages_before_pyarrow_loads(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "MIMALLOC_PURGE_DELAY"}
    if preset is not None:
        env["MIMALLOC_PURGE_DELAY"] = preset
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, False, expected]
