"""What both fused primitives share (``token_scores.py``: one head's scores; ``teacher_kl.py``: a KL between two
heads): the chunked pass over the rows, and the autograd of their weighted sums.

The pass. The N rows are taken C at a time (``chunk_rows``: ``chunk_size``, or as many rows as the primitive's byte
budget of [C, V] buffers holds); for each chunk one GEMM writes its logits into a reused buffer (``head_logits``), a
row operation reduces each row and, where a gradient is wanted, overwrites the buffer with dL/dz, and two GEMMs
(three with a bias) add the chunk's share of dL/dhidden, dL/dweight and dL/dbias (``add_head_grads``).

The weighted sums (``linear_weighted_score_sum``, ``linear_weighted_teacher_kl_sum``). The loss is
``sum_i w_i * value_i`` with fixed weights, so its gradients for a unit upstream gradient are known during the forward
pass: the pass applies the two GEMMs right there, and no statistics are saved for a second pass. Backward only
scales those gradients by the upstream gradient, in place (one copy of dW at peak), which is why a second backward
through the same graph is refused rather than silently scaling them twice.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1, got chunk_size={chunk_size!r}")


def chunk_rows(n: int, vocab: int, dtype: torch.dtype, chunk_size: int | None, budget_bytes: int) -> int:
    """Rows per chunk: ``chunk_size``, or as many [rows, vocab] rows of ``dtype`` as ``budget_bytes`` holds, a
    multiple of 16 (tensor-core friendly GEMM shapes) and at least 16; never more than ``n``."""
    check_chunk_size(chunk_size)
    if chunk_size is not None:
        return max(1, min(n, chunk_size))
    rows = budget_bytes // (vocab * torch.empty((), dtype=dtype).element_size())
    rows = max(16, rows // 16 * 16)
    return max(1, min(n, rows))


def chunks(n: int, rows: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each chunk of ``rows`` rows out of ``n``."""
    for c0 in range(0, n, rows):
        yield c0, min(n, c0 + rows)


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor) -> None:
    """z <- h W^T (+ b): one chunk's raw logits, into its buffer."""
    if bias is None:
        torch.mm(h, weight.t(), out=z)
    else:
        torch.addmm(bias, h, weight.t(), out=z)


def add_head_grads(dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, dh: torch.Tensor | None,
                   dw: torch.Tensor | None, db: torch.Tensor | None, acc: torch.dtype) -> None:
    """One chunk's share of the head's gradients from its dL/dz: ``dh`` (the chunk's rows) <- dz W, ``dw`` += dz^T h,
    ``db`` += the column sums of dz (in ``acc``); each only where it is wanted (not None)."""
    if dh is not None:
        torch.mm(dz, weight, out=dh)
    if dw is not None:
        dw.addmm_(dz.t(), h)
    if db is not None:
        db.add_(dz.sum(0, dtype=acc))


def weighted_total(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum(weights * values)``, where a row of weight 0 counts 0 even if its value is NaN (a row with no token)."""
    return torch.where(weights != 0, weights * values, torch.zeros_like(values)).sum()


def keep_unit_grads(ctx, dh: torch.Tensor | None, dw: torch.Tensor | None, db: torch.Tensor | None) -> None:
    """Save the forward's gradients (for a unit upstream gradient) for ``scaled_grads``; None where not needed."""
    ctx.save_for_backward(*[t for t in (dh, dw, db) if t is not None])
    ctx.has = (dh is not None, dw is not None, db is not None)
    ctx.consumed = False


def scaled_grads(ctx, grad_loss: torch.Tensor, name: str) -> tuple[torch.Tensor | None, ...]:
    """The saved (dh, dw, db) times ``grad_loss``, in place (a 0-d device tensor: no host sync); once only."""
    if ctx.consumed:
        raise RuntimeError(f"{name} scales its stored gradients in place, so it supports a single backward pass; "
                           "recompute the loss instead of using retain_graph=True")
    ctx.consumed = True
    saved = iter(ctx.saved_tensors)
    return tuple(next(saved).mul_(grad_loss) if has else None for has in ctx.has)
