"""Run Triton on the CPU interpreter when there is no GPU, for the benchmark tests run on their own.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported (``tests/conftest.py`` does the same for the
test suite). The benchmark modules are imported as the ``benchmarks`` package from the repository root, which
pyproject's ``pythonpath = ["."]`` puts on ``sys.path``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
