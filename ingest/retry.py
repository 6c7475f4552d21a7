"""Retries of the ingest's reads: a transient TileDB/S3 error costs a chunk's read, not the run.

TileDB retries S3 connections itself (`S3_RETRY_CONFIG`, part of every read's config); what
still reaches Python (a request that timed out, a dropped connection mid-read, a throttled
bucket) is retried here, for the whole chunk, with exponential backoff. Reads are idempotent and
each attempt starts from empty buffers, so a retried chunk is byte-identical to a clean read.
Errors of the data (`LangCellError`: a bad count, a corrupt store) are never retried.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from langcell.core.errors import LangCellError

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_RETRIES = 5
# Seconds before the first retry; each further one waits twice as long (1, 2, 4, 8, 16 s: half a
# minute in all by default, long enough for an S3 throttling spell to pass).
BACKOFF_SECONDS = 1.0
# TileDB's own S3 retries (connect_max_tries and connect_scale_factor, in ms, drive the AWS SDK's
# exponential backoff; defaults 5 and 25), and a request timeout above its default 3 s, which a
# large tile over a busy link can exceed.
S3_RETRY_CONFIG = {"vfs.s3.connect_max_tries": "10", "vfs.s3.connect_scale_factor": "100",
                   "vfs.s3.request_timeout_ms": "30000"}


def _transient_types() -> tuple[type[BaseException], ...]:
    import tiledbsoma
    import tiledbsoma.pytiledbsoma

    # SOMAError (both the Python and the C++ binding's class) is how TileDB errors reach Python;
    # RuntimeError is what pybind11 makes of other C++ exceptions; OSError covers sockets.
    return tiledbsoma.SOMAError, tiledbsoma.pytiledbsoma.SOMAError, RuntimeError, OSError


def with_retries(read: Callable[[], T], what: str, retries: int) -> T:
    """`read()`, retried up to `retries` times on transient errors; then a one-line LangCellError
    naming `what` (the chunk) and the last error."""
    transient = _transient_types()
    attempt = 0
    while True:
        try:
            return read()
        except LangCellError:
            raise
        except transient as exc:
            if attempt == retries:
                raise LangCellError(f"{what}: read failed {retries + 1} times, last with {_first_line(exc)}; "
                                    "rerun the same command to resume from the last finished part, with a "
                                    "larger --retries if the store is flaky") from None
            delay = BACKOFF_SECONDS * 2 ** attempt
            attempt += 1
            log.warning("%s: read failed (%s); retry %d of %d in %.0f s", what, _first_line(exc), attempt,
                        retries, delay)
            time.sleep(delay)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
