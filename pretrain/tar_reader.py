"""Samples of a webdataset tar with the byte offset where each starts, readable from any such offset.

webdataset's own reader only walks a tar from its start, so a stream position could only be a
count of samples to skip; here it is (shard, offset) and reopening there costs one seek.
Samples are grouped as webdataset groups them: members `KEY.SUFFIX` with equal KEY (the path up
to the first dot of the file name), in archive order; members without a suffix are skipped.
"""

from __future__ import annotations

import re
import tarfile

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class ShardReader:
    """Sequential samples of one shard starting at byte `offset` (0, or an offset that `read`
    returned or `position` gave). `offset=None` is a reader already at its end."""

    def __init__(self, path: str, offset: int | None = 0):
        self.path = path
        self._file = self._tar = self._next = None
        if offset is None:
            return
        self._file = open(path, "rb")
        self._file.seek(offset)
        # TarFile reads from the file's current position and reports absolute offsets.
        self._tar = tarfile.open(fileobj=self._file, mode="r:")
        self._next = self._advance()

    def _advance(self):
        while True:
            member = self._tar.next()
            if member is None or (member.isfile() and _KEY.match(member.name)):
                return member

    @property
    def position(self) -> int | None:
        """Offset of the next sample's first member; None once every sample has been read."""
        return None if self._next is None else self._next.offset

    def read(self) -> tuple[int, dict] | None:
        """(offset, sample) of the next sample, or None at the end (the file is then closed)."""
        member = self._next
        if member is None:
            self.close()
            return None
        start = member.offset
        key = _KEY.match(member.name).group(1)
        sample = {"__key__": key}
        while member is not None:
            prefix, suffix = _KEY.match(member.name).groups()
            if prefix != key:
                break
            sample[suffix.lower()] = self._tar.extractfile(member).read()
            member = self._advance()
        self._next = member
        # TarFile keeps every member it has seen; a stream holds a reader per open shard for long.
        self._tar.members.clear()
        return start, sample

    def close(self) -> None:
        if self._file is not None:
            self._tar.close()
            self._file.close()
            self._file = self._tar = self._next = None


def read_sample_at(path: str, offset: int) -> dict:
    reader = ShardReader(path, offset)
    try:
        got = reader.read()
    finally:
        reader.close()
    if got is None:
        raise ValueError(f"{path}: no sample at byte {offset}")
    return got[1]
