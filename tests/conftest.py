"""Shared test setup: run Triton kernels on the CPU interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported; ``import torch`` does not import triton, so
setting it here (conftest is imported before any test module) is early enough. On a CUDA machine the kernels run
natively and the interpreter stays off.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker gets its share of the cores (torch's default is all of them in every worker, which
# oversubscribes the CPU); the processes tests start (torchrun ranks, the CLI) inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(_threads)


@pytest.fixture
def triton_device() -> str:
    """Where impl="triton" runs in this session: the GPU if there is one, else the CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def original(tmp_path_factory) -> Path:
    """A tiny Llama fine-tuned on the generated authors (the "original" model), shared by the trainer, BS-S and
    evaluation tests: ``<dir>/final`` is the model, ``<dir>/data`` the dataset."""
    from bs_train.config import load_config
    from bs_train.trainer import run
    from small_runs import SMALL

    out = tmp_path_factory.mktemp("runs") / "original"
    cfg = load_config(None, SMALL + [f"output_dir={out}", "train.lr=3e-3", "train.epochs=12", "train.warmup_steps=2"],
                      command="finetune")
    run(cfg, progress=False)
    return out


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
