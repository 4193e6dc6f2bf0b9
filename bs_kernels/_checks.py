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
    _check_head("hidden", hidden, "weight", weight)
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
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
    _check_weights_and_place(token_weights, hidden.shape[0], hidden.device, impl)
    if labels.device.type == "cpu" and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels[{i}]={int(labels[i])} is outside [0, V={weight.shape[0]}) "
                             f"and is not ignore_index={ignore_index}")


def _is_real(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float))


def check_head(*, logit_scale, softcap, bias, weight, prefix: str = "") -> None:
    """Validate a head's transform (``head.py``): ``logit_scale`` a finite float > 0, ``softcap`` None or a finite
    float > 0, ``bias`` None or a [V] tensor in ``weight``'s dtype and on its device. ``prefix`` names the argument
    family (``teacher_`` for the teacher head of the teacher KL)."""
    if not _is_real(logit_scale) or not 0.0 < float(logit_scale) < float("inf"):
        raise ValueError(f"{prefix}logit_scale must be a finite float > 0, got {prefix}logit_scale={logit_scale!r}")
    if softcap is not None and (not _is_real(softcap) or not 0.0 < float(softcap) < float("inf")):
        raise ValueError(f"{prefix}softcap must be None or a finite float > 0, got {prefix}softcap={softcap!r}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise ValueError(f"{prefix}bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return  # the weight's own check names the problem
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{prefix}bias must have shape [V]=({weight.shape[0]},) to match the weight, "
                         f"got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise ValueError(f"{prefix}bias dtype {bias.dtype} must equal the weight dtype {weight.dtype}")
    if bias.device != weight.device:
        raise ValueError(f"{prefix}bias is on {bias.device} but the weight is on {weight.device}")


# ---- the teacher-KL primitive (teacher_kl.py) -------------------------------------------------------------------

TEACHER_KINDS = ("kl", "ce")


def check_teacher_options(*, kind: str, gamma: float, temperature: float, ignore_index: int, impl: str,
                          has_labels: bool) -> None:
    """Validate the scalar options of a teacher-KL computation (``has_labels``: whether ``labels`` was given)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
    if kind not in TEACHER_KINDS:
        raise ValueError(f"kind must be one of {TEACHER_KINDS}, got kind={kind!r}")
    if not _is_real(gamma) or not abs(float(gamma)) < float("inf"):  # also rejects NaN
        raise ValueError(f"gamma must be a finite float, got gamma={gamma!r}")
    if gamma != 0 and not has_labels:
        raise ValueError(f"gamma={gamma} adjusts the teacher's logit at the label, so labels must be given")
    if not _is_real(temperature) or not 0.0 < float(temperature) < float("inf"):
        raise ValueError(f"temperature must be a finite float > 0, got temperature={temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got ignore_index={ignore_index!r}")


def _check_weights_and_place(token_weights, n: int, device: torch.device, impl: str) -> None:
    """Optional per-token weights: a floating-point tensor [n] on ``device``; and impl='triton' only where Triton
    can run (CUDA, or the CPU interpreter)."""
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor):
            raise ValueError(f"token_weights must be a torch.Tensor, got {type(token_weights).__name__}")
        if token_weights.shape != (n,):
            raise ValueError(f"token_weights must have shape ({n},), got {tuple(token_weights.shape)}")
        if token_weights.device != device:
            raise ValueError(f"token_weights is on {token_weights.device} but hidden is on {device}")
        if not token_weights.is_floating_point():
            raise ValueError(f"token_weights must be floating point, got dtype {token_weights.dtype}")
    if impl == "triton" and device.type != "cuda" and not triton_interpret():
        raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton for "
                         f"the CPU interpreter); hidden is on {device}. Use impl='torch' on the CPU.")


def _check_head(hname: str, h, wname: str, w) -> None:
    """``h`` [N, D] and ``w`` [V, D], tensors of the same D, named as the caller's arguments are."""
    for name, t in ((hname, h), (wname, w)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if h.dim() != 2:
        raise ValueError(f"{hname} must be 2-D [N, D], got shape {tuple(h.shape)}")
    if w.dim() != 2:
        raise ValueError(f"{wname} must be 2-D [V, D], got shape {tuple(w.shape)}")
    if h.shape[1] != w.shape[1]:
        raise ValueError(f"{hname} has D={h.shape[1]} but {wname} has D={w.shape[1]} "
                         f"(shapes {tuple(h.shape)} and {tuple(w.shape)})")


def check_teacher_tensors(hidden, weight, teacher_hidden, teacher_weight, labels, *, impl: str, ignore_index: int,
                          token_weights=None) -> None:
    """Validate student hidden [N, D] / weight [V, D], teacher hidden [N, D_t] / weight [V, D_t], optional labels [N]
    and token weights [N]: one dtype and one device for all four float tensors, one V, one N."""
    _check_head("hidden", hidden, "weight", weight)
    _check_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    if teacher_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"teacher_hidden has N={teacher_hidden.shape[0]} rows but hidden has N={hidden.shape[0]}")
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher_weight has V={teacher_weight.shape[0]} but weight has V={weight.shape[0]}: "
                         f"the two heads must share the vocabulary")
    allowed = TRITON_DTYPES if impl == "triton" else TORCH_DTYPES
    if hidden.dtype not in allowed:
        raise ValueError(f"hidden dtype {hidden.dtype} is not supported by impl={impl!r} (supported: {allowed})")
    for name, t in (("weight", weight), ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if t.dtype != hidden.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must equal hidden dtype {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    n = hidden.shape[0]
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape [N]=({n},) to match hidden, got {tuple(labels.shape)}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be int64 or int32, got dtype {labels.dtype}")
        if labels.device != hidden.device:
            raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    _check_weights_and_place(token_weights, n, hidden.device, impl)
    if labels is not None and labels.device.type == "cpu" and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels[{i}]={int(labels[i])} is outside [0, V={weight.shape[0]}) "
                             f"and is not ignore_index={ignore_index}")
