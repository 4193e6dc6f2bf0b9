"""What every unlearning method is written over: the step's global denominators, the per-run method state, and
the plumbing from a model's hidden states to the fused per-token scores of ``bs_kernels``.

Every loss in ``methods.py`` is a sum over a micro-batch divided by a global count for the whole optimizer step
(``Norms``: all micro-batches, all ranks), built from token weights (``seq_weights``, ``mean_weights``,
``nll_weights``) over the shifted labels, and evaluated either on the fused three-GEMM path when every token's
weight is known at forward time (``weighted_score_sum``) or through per-token log-probs with any upstream
gradient (``token_logp``); on the CPU both run the lm_head on the scored (answer) rows only (``scored_rows``).
The model is a ``LossHead``: it hands ``(hidden, lm_head, activation)`` to the function given (``lm_head`` a
``bs_kernels.LMHead``: weight, bias and logit transform, all passed on to the fused ops), so no [B, T, V] logits exist.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

import bs_kernels as bk

from .model import LossHead


@dataclass
class Norms:
    """Global denominators for one optimizer step (0-d tensors; all-reduced across ranks by the trainer)."""

    forget_seqs: torch.Tensor
    forget_tokens: torch.Tensor
    retain_seqs: torch.Tensor
    retain_tokens: torch.Tensor
    belief_seqs: torch.Tensor
    belief_tokens: torch.Tensor
    retain_positions: torch.Tensor
    """Every B x T position of the retain batches, padding included (the KL retain term with kl_positions=all)."""

    def for_beliefs(self) -> Norms:
        """These norms with the belief counts in the forget slots, to run a base forget loss on beliefs."""
        return replace(self, forget_seqs=self.belief_seqs, forget_tokens=self.belief_tokens)


def local_counts(forget: dict | None, retain: dict | None, beliefs: dict | None = None) -> torch.Tensor:
    """[7] counts of one micro-batch in ``Norms`` field order (computed on the host from CPU batches); the trainer
    sums them over micro-batches and ranks."""
    out = []
    for batch in (forget, retain, beliefs):
        if batch is None:
            out += [0, 0]
            continue
        active = bk.shift_labels(batch["labels"], bk.IGNORE_INDEX) != bk.IGNORE_INDEX
        out += [int((active.sum(-1) > 0).sum()), int(active.sum())]
    out.append(retain["labels"].numel() if retain is not None else 0)
    return torch.tensor(out, dtype=torch.float64)


@dataclass
class MethodState:
    """Everything a method needs beyond the batch, built once before training (``cfg`` is a ``MethodConfig``)."""

    cfg: Any
    impl: str
    ref_logp: torch.Tensor | None = None  # [n_forget] NPO reference log pi_ref(y|x), indexed by example
    reference: LossHead | None = None  # frozen initial model for the KL retain term and RMU
    rmu_direction: torch.Tensor | None = None  # [D] unit vector
    beliefs: object | None = None  # BS-S: the current beliefs.BeliefSet
    prompts: list[list[int]] | None = None  # BS-S: every forget prompt, encoded (the beliefs are drawn for these)
    sampler: object | None = None  # BS-S: the run's one belief sampler (beliefs.belief_sampler), built at first use
    dual: torch.Tensor | None = None  # PDU: the dual variable (0-d, on the device) weighting the retain constraint


def compute_dtype_pair(hidden: torch.Tensor, head: bk.LMHead) -> tuple[torch.Tensor, bk.LMHead]:
    """Bring hidden states and the head (weight and bias) to one dtype: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        return hidden.to(dtype), head.to(dtype)
    return hidden.to(head.weight.dtype), head


def flat_shifted(hidden, head, labels):
    """(hidden [B*T, D], head, shifted labels [B, T]), hidden and head in one dtype."""
    h, head = compute_dtype_pair(hidden, head)
    y = bk.shift_labels(labels, bk.IGNORE_INDEX)
    return h.reshape(-1, h.shape[-1]), head, y


def seq_weights(y: torch.Tensor, n_seqs: torch.Tensor) -> torch.Tensor:
    """Token weights of "mean over answer tokens per sequence, summed, divided by the global sequence count"."""
    active = (y != bk.IGNORE_INDEX).float()
    return (active / active.sum(-1, keepdim=True).clamp_min(1) / n_seqs).reshape(-1)


def mean_weights(y: torch.Tensor, n: Norms, reduction: str) -> torch.Tensor:
    """Token weights of a forget loss's mean over answer tokens: per sequence then over sequences (``sequence``), or
    one mean over the step's answer tokens (``token``)."""
    if reduction == "token":
        return (y != bk.IGNORE_INDEX).float().reshape(-1) / n.forget_tokens
    return seq_weights(y, n.forget_seqs)


def nll_weights(y: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Token weights of the NLL "mean over all answer tokens" (negative: the fused sum is of log-likelihoods)."""
    return -(y != bk.IGNORE_INDEX).float().reshape(-1) / n_tokens


def scored_rows(y: torch.Tensor) -> torch.Tensor | None:
    """On the CPU, the flat indices of the shifted labels ``y`` that are scored (not ``IGNORE_INDEX``): the losses
    then run the lm_head GEMMs on the answer rows only (on TOFU with SmolLM2's chat template 42% of a batch's rows;
    the prompts and padding score 0 and get no gradient either way). None on a GPU, where selecting rows by value
    is a host sync (``nonzero``) per loss: there every row goes through the fused kernel."""
    if y.device.type != "cpu":
        return None
    keep = (y.reshape(-1) != bk.IGNORE_INDEX).nonzero().squeeze(1)
    return keep if keep.numel() else None  # nothing scored: every row, each scoring 0


def weighted_score_sum(model, batch, st: MethodState, token_weights_fn, *, topk=0, lam=0.0):
    """sum_i w_i s_i on the fused three-GEMM path; ``token_weights_fn(y)`` builds the weights from shifted labels."""

    def fn(hidden, head, _):
        h, head, y = flat_shifted(hidden, head, batch["labels"])
        keep = scored_rows(y)
        y, tw = y.reshape(-1), token_weights_fn(y).to(h.device).reshape(-1)
        if keep is not None:
            h, y, tw = h[keep], y[keep], tw[keep]
        loss, _ = bk.linear_weighted_score_sum(h, head.weight, y, tw, topk=topk, lam=lam, impl=st.impl,
                                               **head.options())
        return loss

    return model(batch["input_ids"], batch["attention_mask"], fn)


def token_logp(model, batch, impl: str):
    """Per-token log p(y_i) [B, T-shifted] (recompute path: any upstream gradient) and the answer mask."""

    def fn(hidden, head, _):
        h, head, y = flat_shifted(hidden, head, batch["labels"])
        keep = scored_rows(y)
        if keep is None:
            s = bk.linear_token_scores(h, head.weight, y.reshape(-1), impl=impl, **head.options())
        else:  # the scored rows' scores in place, 0 (no gradient) on the others
            kept = bk.linear_token_scores(h[keep], head.weight, y.reshape(-1)[keep], impl=impl, **head.options())
            s = kept.new_zeros(y.numel()).index_copy(0, keep, kept)
        return s.view(y.shape), y != bk.IGNORE_INDEX

    return model(batch["input_ids"], batch["attention_mask"], fn)
