"""Shared test setup: run Triton kernels on the CPU interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported; ``import torch`` does not import triton, so
setting it here (conftest is imported before any test module) is early enough. On a CUDA machine the kernels run
natively and the interpreter stays off.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_device() -> str:
    """Where impl="triton" runs in this session: the GPU if there is one, else the CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
