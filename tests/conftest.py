"""Shared test setup: make ``tests/reference.py`` importable as ``reference`` whatever the
pytest import mode, and an opt-in single-thread fixture."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: its tensors are tiny, and on a busy 2-core machine a
    second thread only adds contention (measured 8x slower NCA steps under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
