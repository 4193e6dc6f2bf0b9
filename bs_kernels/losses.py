"""Convenience losses over the fused per-token scores: cross-entropy / GA and the BS-T forget loss.

They accept model-shaped tensors (hidden [B, T, D], labels [B, T]) and, with ``shift=True``, predict token t+1 from
position t the way Hugging Face causal LMs do. The shift moves the *labels* (padding the end with ``ignore_index``)
rather than slicing the hidden states, so no copy of the [B, T, D] activations is made.

All three know every token's upstream gradient at forward time, so they run on ``linear_weighted_score_sum``:
three GEMMs and no logits. Each takes a transformed head's ``bias``, ``logit_scale`` and ``softcap`` (``head.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import IGNORE_INDEX
from .token_scores import linear_token_scores, linear_weighted_score_sum

REDUCTIONS = ("mean", "sum", "none")


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels[..., t] <- labels[..., t + 1], the last position set to ``ignore_index`` (HF causal-LM convention)."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _flatten(hidden: torch.Tensor, labels: torch.Tensor, shift: bool, ignore_index: int):
    if not isinstance(hidden, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("hidden and labels must be torch.Tensors")
    if hidden.dim() < 2 or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden [..., D] and labels [...] must share leading dims, got hidden "
                         f"{tuple(hidden.shape)} and labels {tuple(labels.shape)}")
    if shift:
        labels = shift_labels(labels, ignore_index)
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), labels


def sequence_mean_weights(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Token weights for "mean over answer tokens within a sequence, then mean over sequences", shape of labels.

    ``labels`` is [B, T] (a 1-D tensor is one sequence). Sequences with no answer token are left out of the outer
    mean; computed on the labels' device without host syncs.
    """
    lab = labels if labels.dim() >= 2 else labels[None]
    active = (lab != ignore_index).float()
    per_seq = active.sum(-1, keepdim=True)
    n_seq = (per_seq > 0).sum().clamp_min(1)
    return (active / per_seq.clamp_min(1) / n_seq).reshape(labels.shape)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean", shift: bool = False,
                         impl: str = "triton", chunk_size: int | None = None, bias: torch.Tensor | None = None,
                         logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, like ``F.cross_entropy`` on the logits.

    ``reduction="mean"`` averages over non-ignored tokens (0 when there are none); ``"none"`` returns the
    per-token NLL with the shape of ``labels``. Gradient ascent (GA) is minimising the negative of this loss.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got reduction={reduction!r}")
    h, y, shaped = _flatten(hidden, labels, shift, ignore_index)
    head = {"bias": bias, "logit_scale": logit_scale, "softcap": softcap}
    if reduction == "none":
        nll = -linear_token_scores(h, weight, y, ignore_index=ignore_index, impl=impl, chunk_size=chunk_size, **head)
        return nll.view(shaped.shape)
    w = -(y != ignore_index).float()
    if reduction == "mean":
        w = w / (-w.sum()).clamp_min(1)
    loss, _ = linear_weighted_score_sum(h, weight, y, w, ignore_index=ignore_index, impl=impl,
                                        chunk_size=chunk_size, **head)
    return loss


def bst_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, lam: float = 0.2,
             topk: int = 20, ignore_index: int = IGNORE_INDEX, shift: bool = True, impl: str = "triton",
             chunk_size: int | None = None, bias: torch.Tensor | None = None, logit_scale: float = 1.0,
             softcap: float | None = None) -> torch.Tensor:
    """BS-T forget loss (minimised): mean over answer tokens of s_i within a sequence, then mean over sequences.

    ``hidden`` [B, T, D], ``labels`` [B, T] with ``ignore_index`` outside the answer. s_i uses the soft target
    (1 - lam) e_y + lam sg[q_i] over the model's top-``topk`` beliefs; ``lam=0`` is exactly gradient ascent with
    the same reduction. Defaults are the paper's (lam 0.2, k 20).
    """
    h, y, shaped = _flatten(hidden, labels, shift, ignore_index)
    w = sequence_mean_weights(shaped, ignore_index).reshape(-1)
    loss, _ = linear_weighted_score_sum(h, weight, y, w, topk=topk, lam=lam, ignore_index=ignore_index,
                                        impl=impl, chunk_size=chunk_size, bias=bias, logit_scale=logit_scale,
                                        softcap=softcap)
    return loss


def ga_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
            shift: bool = True, impl: str = "triton", chunk_size: int | None = None, bias: torch.Tensor | None = None,
            logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Gradient-ascent forget loss (minimised): the mean log-likelihood with the reference reduction of ``bst_loss``."""
    return bst_loss(hidden, weight, labels, lam=0.0, topk=0, ignore_index=ignore_index, shift=shift, impl=impl,
                    chunk_size=chunk_size, bias=bias, logit_scale=logit_scale, softcap=softcap)
