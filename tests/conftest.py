"""Shared test fixtures. Keep tests hermetic: no network, temporary folders only."""

import os

import pytest

# Hub look-ups must never be attempted in tests: the CI machine has no network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: the multi-process tests (torchrun ranks, ingest/build workers)
# otherwise oversubscribe the CI machine's 2 cores, which slowed them by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")



@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from two threads, and on a shared 2-core box spinning OpenMP
    threads slow them many times over; restored afterwards for other test files."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
