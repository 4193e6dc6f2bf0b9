"""Cross-entropy over the fused per-token scores, and the label shift every model-shaped loss shares.

They accept model-shaped tensors (hidden [B, T, D], labels [B, T]) and, with ``shift=True`` (or ``shift=k``), predict
token t+1 (t+k) from position t the way Hugging Face causal LMs do. The shift moves the *labels* (padding the end with
``ignore_index``) rather than slicing the hidden states, so no copy of the [B, T, D] activations is made.

With ``reduction="mean"`` every token's upstream gradient is known at forward time, so it runs on
``linear_weighted_score_sum``: three GEMMs and no logits. It takes a transformed head's ``bias``, ``logit_scale`` and
``softcap`` (``head.py``). The unlearning losses (GA, BS-T, NPO, ...) live in ``unlearning.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import IGNORE_INDEX
from .token_scores import linear_token_scores, linear_weighted_score_sum

REDUCTIONS = ("mean", "sum", "none")


def shift_amount(shift: bool | int) -> int:
    """How many positions ``shift`` moves the labels: ``False`` / ``True`` are 0 / 1 and an int k >= 0 is k (Cut
    Cross-Entropy's ``shift=k``). Anything else is refused by name, never read as truthy (``shift=2`` once meant 1)."""
    if isinstance(shift, bool):
        return int(shift)
    if not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be a bool or an int >= 0 (positions between a hidden state and the token it "
                         f"predicts), got shift={shift!r}")
    return shift


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, shift: int = 1) -> torch.Tensor:
    """labels[..., t] <- labels[..., t + shift], the last ``shift`` positions set to ``ignore_index`` (the Hugging Face
    causal-LM convention at ``shift=1``)."""
    k = shift_amount(shift)
    if k == 0:
        return labels
    k = min(k, labels.shape[-1])
    return F.pad(labels[..., k:], (0, k), value=ignore_index)


def _flatten(hidden: torch.Tensor, labels: torch.Tensor, shift: bool | int, ignore_index: int):
    if not isinstance(hidden, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("hidden and labels must be torch.Tensors")
    if hidden.dim() < 2 or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden [..., D] and labels [...] must share leading dims, got hidden "
                         f"{tuple(hidden.shape)} and labels {tuple(labels.shape)}")
    labels = shift_labels(labels, ignore_index, shift)
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
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean", shift: bool | int = False,
                         impl: str = "triton", chunk_size: int | None = None, bias: torch.Tensor | None = None,
                         logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, like ``F.cross_entropy`` on the logits.

    ``reduction="mean"`` averages over non-ignored tokens (0 when there are none); ``"none"`` returns the
    per-token NLL with the shape of ``labels``. ``shift=True`` (or an int k) scores position t against the label at
    t + 1 (t + k). Gradient ascent (GA) is minimising the negative of this loss.
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
