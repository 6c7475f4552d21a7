"""CPU training sets glibc's mmap threshold, unless the user set it through glibc itself."""

from __future__ import annotations

import ctypes

import pytest

from langcell.pretrain import engine


class _Libc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = _Libc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: fake)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    return fake


def test_blocks_of_4_mib_and_more_get_their_own_mapping(libc):
    engine._return_freed_blocks_to_the_os()
    assert libc.calls == [(-3, 4 * 1024 * 1024)]  # M_MMAP_THRESHOLD


@pytest.mark.parametrize("name, value", [("MALLOC_MMAP_THRESHOLD_", "1048576"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")])
def test_a_threshold_the_user_set_is_kept(libc, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    engine._return_freed_blocks_to_the_os()
    assert libc.calls == []


def test_other_glibc_tunables_do_not_stop_it(libc, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    engine._return_freed_blocks_to_the_os()
    assert libc.calls == [(-3, 4 * 1024 * 1024)]
