"""What every unlearning method is written over: the step's global denominators, the per-run method state, and
the plumbing from a model's hidden states to the fused per-token scores of ``bs_kernels``.

Every loss in ``registry.py`` is one of ``bs_kernels.unlearning``'s pure functions (one implementation: the
importable one) called with the global counts of the whole optimizer step (``Norms``: all micro-batches, all ranks)
as its denominators, so a step's micro-batch losses sum to the loss of the whole step. The model is a ``LossHead``:
``on_head`` hands its ``(hidden, lm_head, activation)`` to the loss (``lm_head`` a ``bs_kernels.LMHead``: weight, bias
and logit transform, which every loss of ``bs_kernels.unlearning`` takes in place of the weight), so no [B, T, V]
logits exist.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

import bs_kernels as bk

from ..model import LossHead


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
    forget_positions: torch.Tensor
    """Every B x (T - 1) position of the forget batches that predicts a next token, prompt and padding included (UNDIAL
    with undial_positions=all)."""

    def for_beliefs(self) -> Norms:
        """These norms with the belief counts in the forget slots, to run a base forget loss on beliefs."""
        return replace(self, forget_seqs=self.belief_seqs, forget_tokens=self.belief_tokens)


def local_counts(forget: dict | None, retain: dict | None, beliefs: dict | None = None) -> torch.Tensor:
    """[8] counts of one micro-batch in ``Norms`` field order (computed on the host from CPU batches); the trainer
    sums them over micro-batches and ranks."""
    out = []
    for batch in (forget, retain, beliefs):
        if batch is None:
            out += [0, 0]
            continue
        active = bk.shift_labels(batch["labels"], bk.IGNORE_INDEX) != bk.IGNORE_INDEX
        out += [int((active.sum(-1) > 0).sum()), int(active.sum())]
    out.append(retain["labels"].numel() if retain is not None else 0)
    out.append(forget["labels"][:, :-1].numel() if forget is not None else 0)
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


def on_head(model, batch: dict, fn, layer: int | None = None):
    """One model call: ``fn(hidden [B, T, D], lm_head (an LMHead), activation of ``layer`` or None)`` with hidden and
    head in one compute dtype (``compute_dtype_pair``), the way every loss of ``bs_kernels.unlearning`` takes them."""

    def call(hidden, head, act):
        h, head = compute_dtype_pair(hidden, head)
        return fn(h, head, act)

    return model(batch["input_ids"], batch["attention_mask"], call, layer=layer)


def answer_rows(batch: dict) -> torch.Tensor:
    """[B] bool: the rows of ``batch`` with at least one answer token after the shift (on the labels' device)."""
    return (bk.shift_labels(batch["labels"], bk.IGNORE_INDEX) != bk.IGNORE_INDEX).any(-1)


def sequence_logprob(model, batch: dict, impl: str) -> torch.Tensor:
    """log pi(y|x) of every row, summed over its answer tokens [B] (``bs_kernels.sequence_logprob``): recompute path,
    any upstream gradient."""
    return on_head(model, batch, lambda h, w, _: bk.sequence_logprob(h, w, batch["labels"], impl=impl))
