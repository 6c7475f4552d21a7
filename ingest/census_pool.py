"""Running the parts of `langcell ingest census`: in this process, or on `--workers` spawned
processes (each with its own SOMA handle), recording each finished part in the manifest."""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import multiprocessing
import signal
from pathlib import Path
from typing import Any

from langcell.core.errors import LangCellError
from langcell.core.files import atomic_write_json
from langcell.ingest.census_manifest import _finish
from langcell.ingest.census_parts import _PartTask, _crash_point, _row_buffers, _write_parts
from langcell.ingest.census_store import _experiment, _open_handle

def _run_parts(task: _PartTask, pending: list[dict[str, Any]], manifest: dict[str, Any], manifest_path: Path,
               workers: int, progress: bool) -> None:
    from tqdm import tqdm

    total = sum(part["planned_rows"] for part in manifest["parts"])
    done_cells = total - sum(part["planned_rows"] for part in pending)
    bar = tqdm(total=total, initial=done_cells, unit="cells", unit_scale=True, disable=not progress,
               desc=f"ingest {manifest_path.parent.name}", smoothing=0.1)

    def record(result: dict[str, Any]) -> None:
        part = next(p for p in manifest["parts"] if p["name"] == result["name"])
        part.update(result, status="done")
        _finish(manifest)
        atomic_write_json(manifest_path, manifest)
        _crash_point("manifest_written")

    try:
        if workers == 1 or len(pending) <= 1:
            with _open_handle(task.source) as census:
                experiment = _experiment(census, task.source, task.organism)
                for result in _write_parts(experiment, task, pending, bar.update, _row_buffers()):
                    record(result)
        else:
            _run_pool(task, pending, record, bar, workers)
    finally:
        bar.close()



def _run_pool(task, pending, record, bar, workers) -> None:
    # spawn: a forked child would inherit the parent's TileDB threads and their locks.
    context = _TrackedContext(multiprocessing.get_context("spawn"))
    queue = context.Queue()
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=context,
                                                initializer=_worker_init, initargs=(queue,)) as pool:
        futures = {pool.submit(_worker_part, task, part) for part in pending}
        try:
            while futures:
                finished, futures = concurrent.futures.wait(futures, timeout=0.2,
                                                            return_when=concurrent.futures.FIRST_COMPLETED)
                _drain(queue, bar)
                for future in finished:
                    record(future.result())
            _drain(queue, bar)
        except concurrent.futures.process.BrokenProcessPool:
            raise LangCellError(f"ingest worker process died ({context.deaths()}); rerun the same command to resume, "
                                "with a smaller --chunk-counts or fewer --workers if memory is short") from None
        except BaseException:
            for future in futures:
                future.cancel()
            raise



class _TrackedContext:
    """A multiprocessing context that remembers the processes it starts, so that a broken pool
    can say how its workers ended (the executor keeps that to itself)."""

    def __init__(self, context):
        self._context = context
        self._processes: list = []

    def __getattr__(self, name):
        return getattr(self._context, name)

    def Process(self, *args, **kwargs):
        process = self._context.Process(*args, **kwargs)
        self._processes.append(process)
        return process

    def deaths(self) -> str:
        """How the workers that did not exit cleanly ended: a signal (SIGKILL: most often the
        kernel's out-of-memory killer; SIGSEGV: a crash in native code, traceback above) or an
        exit code."""
        ends = {}
        for process in self._processes:
            process.join(timeout=5)
            code = process.exitcode
            if code:
                ends[process.pid] = signal.Signals(-code).name if code < 0 else f"exit code {code}"
        # SIGTERM: the pool stopping the other workers once one has died.
        return "; ".join(f"pid {pid}: {end}" for pid, end in ends.items()) or "killed, or out of memory"



def _drain(queue, bar) -> None:
    import queue as queue_module

    while True:
        try:
            bar.update(queue.get_nowait())
        except queue_module.Empty:
            return



_WORKER: dict[str, Any] = {}



def _worker_init(queue) -> None:
    import faulthandler

    # A worker that dies in native code (TileDB, Arrow, numba) prints where, in the run's stderr.
    faulthandler.enable()
    _WORKER["queue"] = queue



def _worker_part(task: _PartTask, part: dict[str, Any]) -> dict[str, Any]:
    # One SOMA handle per worker process, reused across its parts.
    if "census" not in _WORKER:
        _WORKER["census"] = _open_handle(task.source)
        _WORKER["experiment"] = _experiment(_WORKER["census"], task.source, task.organism)
        _WORKER["buffers"] = _row_buffers()
    return next(_write_parts(_WORKER["experiment"], task, [part], _WORKER["queue"].put, _WORKER["buffers"]))
