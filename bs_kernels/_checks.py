"""Argument validation shared by every public entry point of ``bs_kernels``.

Everything a caller can get wrong (shapes, dtypes, devices, ``topk``, ``lam``, ``impl``) is checked here, on the
host, before any kernel launches, and raised as a ``ValueError`` that names the offending argument. Nothing in this
file reads tensor *values* from a GPU (that would be a host sync); label ranges are only checked eagerly for CPU
tensors, and on CUDA an out-of-range label turns its score into NaN inside the kernel instead of reading out of bounds.
"""

from __future__ import annotations

import os

import torch

IGNORE_INDEX = -100
"""Label value that marks a position as not scored (``torch.nn.functional.cross_entropy``'s default)."""
IMPLS = ("triton", "torch")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TORCH_DTYPES = TRITON_DTYPES + (torch.float64,)
# The Triton kernel keeps the running top-k in registers, padded to a power of two; 128 covers every setting in the
# literature (the reference default is 20; the tests merge tiles up to k = 64) without blowing the register budget.
MAX_TRITON_TOPK = 128


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1`` set before ``import triton``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_options(*, topk: int, lam: float, ignore_index: int, impl: str, vocab: int | None = None) -> None:
    """Validate the scalar options of a score computation; ``vocab`` bounds ``topk`` when known."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise ValueError(f"topk must be an int, got topk={topk!r}")
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got topk={topk}")
    if vocab is not None and topk > vocab:
        raise ValueError(f"topk must be <= the vocabulary size V={vocab}, got topk={topk}")
    if impl == "triton" and topk > MAX_TRITON_TOPK:
        raise ValueError(f"topk={topk} exceeds the Triton kernel's limit of {MAX_TRITON_TOPK}; use impl='torch'")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise ValueError(f"lam must be a float in [0, 1], got lam={lam!r}")
    if not 0.0 <= float(lam) <= 1.0:  # also rejects NaN
        raise ValueError(f"lam must lie in [0, 1], got lam={lam}")
    if lam > 0 and topk == 0:
        raise ValueError(f"lam={lam} > 0 spreads mass over the top-k beliefs, so topk must be >= 1 (got topk=0)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got ignore_index={ignore_index!r}")


def check_tensors(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, impl: str,
                  ignore_index: int, token_weights: torch.Tensor | None = None) -> None:
    """Validate the tensors of a score computation: hidden [N, D], weight [V, D], labels [N] (and weights [N])."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden has D={hidden.shape[1]} but weight has D={weight.shape[1]} "
                         f"(shapes {tuple(hidden.shape)} and {tuple(weight.shape)})")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must have shape [N]=({hidden.shape[0]},) to match hidden, "
                         f"got {tuple(labels.shape)}")
    allowed = TRITON_DTYPES if impl == "triton" else TORCH_DTYPES
    if hidden.dtype not in allowed:
        raise ValueError(f"hidden dtype {hidden.dtype} is not supported by impl={impl!r} (supported: {allowed})")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got dtype {labels.dtype}")
    for name, t in (("weight", weight), ("labels", labels)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if token_weights is not None:
        if token_weights.shape != labels.shape:
            raise ValueError(f"token_weights must have shape {tuple(labels.shape)}, got {tuple(token_weights.shape)}")
        if token_weights.device != hidden.device:
            raise ValueError(f"token_weights is on {token_weights.device} but hidden is on {hidden.device}")
        if not token_weights.is_floating_point():
            raise ValueError(f"token_weights must be floating point, got dtype {token_weights.dtype}")
    if impl == "triton" and hidden.device.type != "cuda" and not triton_interpret():
        raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton for "
                         f"the CPU interpreter); hidden is on {hidden.device}. Use impl='torch' on the CPU.")
    if labels.device.type == "cpu" and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels[{i}]={int(labels[i])} is outside [0, V={weight.shape[0]}) "
                             f"and is not ignore_index={ignore_index}")
