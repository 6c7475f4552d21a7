"""Crash-safe file writing, checksums and an exclusive lock on an output folder.

Every stage that writes a folder other stages read follows one rule: a file becomes visible
under its final name only once it is complete (write to a temporary name in the same folder,
fsync, rename), and a manifest entry marks a part finished only after its file is renamed.
A killed run therefore never leaves anything that a rerun would take as complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from langcell.core.errors import LangCellError


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_dir():
            raise LangCellError(f"{path}: atomic_path only renames files, got a folder")
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise LangCellError(f"{path}: {what} not found; check the path") from None
    except json.JSONDecodeError as exc:
        raise LangCellError(f"{path}: {what} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                            "delete it and rerun the stage that writes it") from None


def read_record(path: str | os.PathLike) -> Any:
    """A progress record written by atomic_write_json, or None where there is none yet (or it
    cannot be read, which resuming treats as not done)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# flock errors that mean "this filesystem does not do flock" (NFS without lockd, Lustre mounted
# without -o flock), not "someone holds it".
_FLOCK_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
OWNER_FILE = ".lock-owner"


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `folder` so that two runs never write into it at once.

    The lock is an flock on `folder/.lock`: the kernel releases it when the holder dies, so a
    SIGKILLed run never leaves a stale lock behind. Where the filesystem refuses flock, or
    `LANGCELL_LOCK=file` asks for it (NFS mounted with `local_lock=flock` grants flocks that
    other nodes never see), it is `folder/.lock-owner` naming its holder (`_owner_file_lock`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if os.environ.get("LANGCELL_LOCK", "flock") == "file":
        with _owner_file_lock(folder):
            yield
        return
    with open(folder / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                # A forked child (a data loader worker) shares the flock and outlives a killed parent.
                orphans = (", which has exited: processes it started still hold the lock until they exit"
                           if _on_this_host(holder) and not _pid_alive(_on_this_host(holder)) else "")
                raise LangCellError(f"{folder}: locked by {holder}{orphans}; wait for that run to finish "
                                    "or write to another folder") from None
            if exc.errno not in _FLOCK_UNSUPPORTED:
                raise LangCellError(f"{folder / '.lock'}: cannot lock ({exc.strerror}); "
                                    "write to a folder on another filesystem") from None
            flocked = False
        if flocked:
            handle.seek(0)
            handle.truncate()
            handle.write(_holder())
            handle.flush()
            yield
            return
    with _owner_file_lock(folder):
        yield


@contextlib.contextmanager
def shared_lock(folder: str | os.PathLike, holder: str) -> Iterator[None]:
    """Hold `folder` shared: any number of shared holders at once, none while `output_lock(folder)`
    is held (`holder` names who that is, for the error). Where flock is refused (or
    `LANGCELL_LOCK=file`) there is no shared lock file can express, so only an exclusive
    holder's owner file is checked: an exclusive run that starts later is not kept out."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    busy = f"{folder}: {holder} holds this folder; wait for it to finish"
    if os.environ.get("LANGCELL_LOCK", "flock") != "file":
        with open(folder / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise LangCellError(busy) from None
                if exc.errno not in _FLOCK_UNSUPPORTED:
                    raise LangCellError(f"{folder / '.lock'}: cannot lock ({exc.strerror}); "
                                        "write to a folder on another filesystem") from None
            else:
                yield
                return
    owner = folder / OWNER_FILE
    if owner.is_file():
        pid = _on_this_host(owner.read_text().strip())
        if pid is None or _pid_alive(pid):
            raise LangCellError(busy)
    yield


def _on_this_host(holder: str) -> int | None:
    """The pid of a `pid P on HOST` holder when HOST is this machine."""
    parts = holder.split()
    if len(parts) == 4 and parts[0] == "pid" and parts[1].isdigit() and parts[3] == socket.gethostname():
        return int(parts[1])
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def _owner_file_lock(folder: Path) -> Iterator[None]:
    """A lock file holding `pid P on HOST`, created by hard-linking a complete file to its name
    (atomic and exclusive on NFS and Lustre, and never seen empty), removed on exit. A holder
    killed without cleanup leaves it behind: one from this host whose pid is gone is taken over
    with a message on stderr; one from another host cannot be checked from here, so the error
    says how to clear it."""
    path = folder / OWNER_FILE
    me = _holder()
    tmp = folder / f"{OWNER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(me)
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                _clear_stale_owner_file(folder, path)
            except OSError as exc:
                raise LangCellError(f"{path}: cannot create the lock file ({exc.strerror}); write to a "
                                    "folder on a filesystem with flock or hard links") from None
        else:
            raise LangCellError(f"{path}: other runs keep taking this folder; wait for them to finish "
                                "or write to another folder")
    finally:
        tmp.unlink()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.read_text().strip() == me:
                path.unlink()


def _clear_stale_owner_file(folder: Path, path: Path) -> None:
    """Remove `path` if its holder is a dead process of this host, else raise who holds it."""
    try:
        holder = path.read_text().strip()
    except FileNotFoundError:
        return
    pid = _on_this_host(holder)
    if pid is None:
        raise LangCellError(f"{folder}: locked by {holder or 'another process'} (a lock file: this filesystem "
                            "has no flock); wait for that run to finish, or if it no longer runs delete "
                            f"{path}")
    if _pid_alive(pid):
        raise LangCellError(f"{folder}: locked by {holder}; wait for that run to finish or write to another folder")
    # Renamed before it is removed: of two runs clearing the same stale file, the second moves the
    # first one's new lock instead, sees a different holder and puts it back.
    moved = folder / f"{OWNER_FILE}.{os.getpid()}.stale"
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return
    taken = moved.read_text().strip()
    if taken != holder:
        with contextlib.suppress(FileExistsError):
            os.link(moved, path)
        moved.unlink()
        raise LangCellError(f"{folder}: locked by {taken}; wait for that run to finish or write to another folder")
    moved.unlink()
    print(f"langcell: {path}: removed the stale lock of {holder}, which no longer runs", file=sys.stderr)


def display_path(path: str | os.PathLike) -> str:
    """`path` as a report shows it: relative to the working directory when it lies below it (where
    the user ran the command), else as given."""
    given = Path(path)
    if given.is_absolute():
        try:
            return str(given.relative_to(Path.cwd()))
        except ValueError:
            pass
    return str(path)
