"""Shard bytes written by hand equal what `tarfile` writes, and read back with tarfile and webdataset."""

import io
import tarfile

import numpy as np
import pytest

from langcell.build_sclibrary.shard_tar import member_header, npy_bytes, tar_bytes


def _tarfile_bytes(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(payload), 0o644, 0
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_archive_bytes_equal_tarfile_and_read_back():
    rng = np.random.default_rng(0)
    members = []
    for i in range(40):
        tokens = rng.integers(0, 25427, rng.integers(0, 3000)).astype(np.int32)
        members += [(f"{10**12 * (i % 3) + i}.input_ids.npy", npy_bytes(tokens)),
                    (f"{i}.meta.json", ('{"cell_type": "B cell", "é": %d}' % i).encode()),
                    (f"{i}.texts.json", b"x" * (512 * (i % 4)))]  # payloads ending on a block boundary
    data = tar_bytes(members)
    assert data == _tarfile_bytes(members)
    assert len(data) % (20 * 512) == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == members
    assert tar_bytes([]) == _tarfile_bytes([])


def test_npy_bytes_equal_np_save_for_every_length_and_dtype():
    for tokens in (np.arange(5, dtype=np.int32), np.arange(7, dtype=np.int64), np.zeros(0, np.int32),
                   np.arange(5, dtype=np.int32)[::-1]):
        buffer = io.BytesIO()
        np.save(buffer, tokens.astype(np.int32), allow_pickle=False)
        assert npy_bytes(tokens) == buffer.getvalue()
        assert np.array_equal(np.load(io.BytesIO(npy_bytes(tokens))), tokens)


def test_long_names_are_refused():
    with pytest.raises(ValueError, match="longer than 100"):
        member_header("a" * 101, 1)
