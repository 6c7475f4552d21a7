"""Output locks: the owner-file fallback where flock does not work (Lustre/NFS without flock), and
what a contended lock says."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import langcell.core.files as files
from langcell.core.errors import LangCellError
from langcell.core.files import OWNER_FILE, output_lock


def _no_flock(errno_code):
    def flock(fd, op):
        raise OSError(errno_code, "flock refused by the filesystem")
    return flock


@pytest.fixture
def lustre(monkeypatch):
    """flock fails as Lustre mounted without `-o flock` makes it fail."""
    monkeypatch.setattr(files.fcntl, "flock", _no_flock(errno.ENOSYS))


def _hold_lock(folder, ready, release):
    with output_lock(folder):
        ready.set()
        release.wait(10)


def test_owner_file_excludes_a_second_run_and_goes_away_after(tmp_path, lustre):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    proc.start()
    assert ready.wait(10)
    holder = f"pid {proc.pid} on {socket.gethostname()}"
    assert (tmp_path / OWNER_FILE).read_text() == holder
    with pytest.raises(LangCellError, match=f"locked by {holder}; wait"):
        with output_lock(tmp_path):
            pass
    release.set()
    proc.join()
    assert proc.exitcode == 0
    assert not (tmp_path / OWNER_FILE).exists()
    with output_lock(tmp_path):
        assert (tmp_path / OWNER_FILE).read_text().startswith(f"pid {os.getpid()} on ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_a_dead_holder_on_this_host_is_taken_over_with_a_message(tmp_path, lustre, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = f"pid {int(dead.stdout)} on {socket.gethostname()}"
    (tmp_path / OWNER_FILE).write_text(stale)
    with output_lock(tmp_path):
        assert (tmp_path / OWNER_FILE).read_text() != stale
    assert f"removed the stale lock of {stale}, which no longer runs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_a_holder_on_another_host_is_never_taken_over(tmp_path, lustre):
    (tmp_path / OWNER_FILE).write_text("pid 1 on some-other-node")
    with pytest.raises(LangCellError, match=f"locked by pid 1 on some-other-node .*no longer runs delete "
                                            f"{tmp_path / OWNER_FILE}$"):
        with output_lock(tmp_path):
            pass
    assert (tmp_path / OWNER_FILE).read_text() == "pid 1 on some-other-node"


def test_a_live_holder_on_this_host_is_kept(tmp_path, lustre):
    (tmp_path / OWNER_FILE).write_text(f"pid {os.getppid()} on {socket.gethostname()}")
    with pytest.raises(LangCellError, match=f"locked by pid {os.getppid()} on "):
        with output_lock(tmp_path):
            pass


def test_langcell_lock_file_skips_flock(tmp_path, monkeypatch):
    """NFS with `local_lock=flock` grants flocks other nodes never see: the owner file is the way out."""
    monkeypatch.setenv("LANGCELL_LOCK", "file")
    monkeypatch.setattr(files.fcntl, "flock", _no_flock(errno.EBADF))
    with output_lock(tmp_path):
        assert (tmp_path / OWNER_FILE).exists()
    assert not (tmp_path / OWNER_FILE).exists()


def test_other_flock_errors_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(files.fcntl, "flock", _no_flock(errno.EIO))
    with pytest.raises(LangCellError, match=r"\.lock: cannot lock \(flock refused by the filesystem\); write to"):
        with output_lock(tmp_path):
            pass


def _lock_then_exit_leaving_a_child(folder, child_ready):
    """A run that forks a worker while it holds the lock, then dies without cleanup."""
    with output_lock(folder):
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        worker.start()
        child_ready.send(worker.pid)
        os._exit(0)


def test_a_flock_kept_by_a_dead_runs_worker_says_so(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, sender = ctx.Pipe(duplex=False)  # sent at once: the run exits with os._exit right after
    run = ctx.Process(target=_lock_then_exit_leaving_a_child, args=(tmp_path, sender))
    run.start()
    assert ready.poll(10)
    worker = ready.recv()
    run.join()
    try:
        with pytest.raises(LangCellError, match=f"locked by pid {run.pid} on {socket.gethostname()}, which has "
                                                "exited: processes it started still hold the lock"):
            with output_lock(tmp_path):
                pass
    finally:
        os.kill(worker, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with output_lock(tmp_path):
                break
        except LangCellError:
            time.sleep(0.05)
    else:
        pytest.fail("the lock was not released once the worker died")


@pytest.mark.parametrize("flock", ["works", "refused"])
def test_shared_holders_coexist_and_keep_the_exclusive_run_out(tmp_path, monkeypatch, flock):
    """Sharded ingest: shards hold the folder shared side by side; a merge (exclusive) holding it
    keeps new shards out, with flock and with the owner file where flock is refused."""
    if flock == "refused":
        monkeypatch.setattr(files.fcntl, "flock", _no_flock(errno.ENOSYS))
    with files.shared_lock(tmp_path, "a merge"), files.shared_lock(tmp_path, "a merge"):
        pass
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    proc.start()
    assert ready.wait(10)
    try:
        with pytest.raises(LangCellError, match=f"^{tmp_path}: a merge holds this folder; wait"):
            with files.shared_lock(tmp_path, "a merge"):
                pass
    finally:
        release.set()
        proc.join()
    with files.shared_lock(tmp_path, "a merge"):
        pass
