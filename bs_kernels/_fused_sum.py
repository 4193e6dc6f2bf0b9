"""The autograd pattern both fused weighted sums share (``linear_weighted_score_sum``,
``linear_weighted_teacher_kl_sum``).

The loss is ``sum_i w_i * value_i`` with fixed weights, so its gradients for a unit upstream gradient are known in
the forward pass: the vocabulary pass that computes the values writes dL/dz into its logits chunk and applies the two
GEMMs right there, and no statistics are saved for a second pass. Backward only scales those gradients by the
upstream gradient, in place (one copy of dW at peak), which is why a second backward through the same graph is
refused rather than silently scaling them twice.
"""

from __future__ import annotations

import torch


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
