"""Make ``bench_losses`` importable from the benchmark tests and run Triton on the CPU interpreter without a GPU."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
