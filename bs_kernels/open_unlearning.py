"""Drop-in replacements for open-unlearning's loss helpers, on the fused losses of ``bs_kernels``: no [B, T, V] logits.

open-unlearning (locuslab/open-unlearning) computes every loss from the model's full logits, which at an 8B model's
vocabulary is most of a GPU's memory (its issue #179: out of memory on 40 GB). The helpers here keep the signatures
and the numbers of its ``src/trainer/utils.py`` (and of the helpers and losses next to it: CE-U's, RMU's activation
loss, the authors' fork kemoulee/open-unlearning's BS-T and BS-S) and run the decoder alone, scoring its hidden states
against the lm_head weight chunk by chunk (``bs_kernels.unlearning``). A user of that codebase changes one import:

    from bs_kernels.open_unlearning import compute_dpo_loss, compute_kl_divergence  # was: from trainer.utils import

Same numbers: on the same model and inputs each helper equals the reference formula to about 1e-6 relative in float32
(``tests/test_open_unlearning.py`` writes every reference out independently). Where the reference has a defect an
argument chooses: ``reference_exact=True`` (the default, so that switching changes nothing) reproduces it, ``False``
applies the fix:

* ``compute_undial_loss``: the reference averages over every position, prompt and padding included, and reads a
  -100 label as the vocabulary id V - 100 (its logit is the one lowered); fixed: the answer tokens only.
* ``compute_bst_loss``: a row without answer tokens makes the fork's loss NaN (0 / 0); fixed: the row is left out.
* ``compute_activation_loss`` (RMU): the reference divides each row's sum by every row's token count (a [B] / [B, 1]
  broadcast to [B, B]), the per-sequence mean only when all answers are equally long; fixed: per-sequence mean.

What differs by construction: the helpers return a ``FusedOutput`` where the reference returns the model's output:
``logits`` is None (never built) and ``last_hidden_state`` holds the decoder's output. ``model`` must expose
``get_decoder()`` and ``get_output_embeddings()`` (every Hugging Face causal LM does; a head with a bias, a logit scale
or soft-capping is refused by ``bs_kernels.hf``); wrappers whose ``forward`` must run (DDP, a DeepSpeed engine) are
not unwrapped here. BS-T's top-k breaks ties towards the lower token id where ``torch.topk`` picks any: the loss is
the same, the gradient may differ at tied logits. Under autocast the hidden states and the head run in the autocast
dtype, as the model's own lm_head would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import unlearning as ul
from ._checks import IGNORE_INDEX
from .head import LMHead
from .hf import hidden_states_and_head
from .losses import shift_labels


@dataclass
class FusedOutput:
    """What a helper returns in place of the model's output."""

    last_hidden_state: torch.Tensor
    """The decoder's final hidden states [B, T, D]."""
    logits: None = None
    """Never built: the point of the fused losses."""
    loss: torch.Tensor | None = None
    """The loss, where the reference's output would hold one (``compute_mean_nll``); None otherwise."""


def _head(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, LMHead]:
    """(hidden [B, T, D], the lm_head: weight [V, D] with its bias and logit transform) of ``model`` on ``inputs``,
    in one compute dtype."""
    hidden, head = hidden_states_and_head(model, inputs["input_ids"], inputs.get("attention_mask"))
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        return hidden.to(dtype), head.to(dtype)
    return hidden.to(head.weight.dtype), head


def _reference_head(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]):
    with torch.no_grad():
        return _head(model, inputs)


def compute_batch_nll(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], *,
                      impl: str = "auto") -> tuple[torch.Tensor, FusedOutput]:
    """The summed NLL of each sequence's labelled tokens, [B] (0 for a row without any): ``compute_batch_nll``."""
    hidden, weight = _head(model, inputs)
    return -ul.sequence_logprob(hidden, weight, inputs["labels"], impl=impl), FusedOutput(hidden)


def compute_mean_nll(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], *,
                     impl: str = "auto") -> tuple[torch.Tensor, FusedOutput]:
    """``model(**inputs).loss``: Hugging Face's mean NLL over the batch's labelled tokens (GradAscent's
    ``-outputs.loss``, GradDiff's NLL retain term, the fork's BS-S)."""
    hidden, weight = _head(model, inputs)
    loss = ul.nll_loss(hidden, weight, inputs["labels"], reduction="token", impl=impl)
    return loss, FusedOutput(hidden, loss=loss)


def compute_kl_divergence(model: torch.nn.Module, target_model: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
                          *, impl: str = "auto") -> tuple[torch.Tensor, FusedOutput]:
    """KL(p_target || p_model) averaged over every one of the B x T positions (``kl_div(..., reduction="batchmean",
    log_target=True)`` over the flattened logits): ``compute_kl_divergence``."""
    t_hidden, t_weight = _reference_head(target_model, inputs)
    hidden, weight = _head(model, inputs)
    loss = ul.kl_loss(hidden, weight, None, t_hidden, t_weight, positions="all", impl=impl)
    return loss, FusedOutput(hidden)


def compute_dpo_loss(model: torch.nn.Module, ref_model: torch.nn.Module,
                     win_inputs: Mapping[str, torch.Tensor] | None = None,
                     lose_inputs: Mapping[str, torch.Tensor] | None = None, beta: float = 1.0, *,
                     impl: str = "auto") -> tuple[torch.Tensor, tuple[FusedOutput | None, FusedOutput | None]]:
    """-(2/beta) log sigmoid(beta (win log-ratio - lose log-ratio)), averaged over the rows, a log-ratio being
    log pi(y|x) - log pi_ref(y|x) summed over the answer tokens and 0 for an absent side: ``compute_dpo_loss``
    (NPO: ``lose_inputs`` only; DPO / IdkDPO: both, row i of one against row i of the other)."""
    if win_inputs is None and lose_inputs is None:
        raise ValueError("compute_dpo_loss needs win_inputs, lose_inputs or both; both are None")

    def log_ratio(inputs):
        nll, out = compute_batch_nll(model, inputs, impl=impl)
        with torch.no_grad():
            ref_nll, _ = compute_batch_nll(ref_model, inputs, impl=impl)
        return ref_nll - nll, out

    win, win_out = log_ratio(win_inputs) if win_inputs is not None else (None, None)
    lose, lose_out = log_ratio(lose_inputs) if lose_inputs is not None else (None, None)
    if lose is None:
        lose = torch.zeros_like(win)
    loss = ul.preference_loss(lose, win, beta=beta)
    return loss, (win_out, lose_out)


def compute_undial_loss(model: torch.nn.Module, ref_model: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
                        beta: float, *, reference_exact: bool = True,
                        impl: str = "auto") -> tuple[torch.Tensor, FusedOutput]:
    """UNDIAL: the cross-entropy to the reference model's softmax with the label's logit lowered by ``beta``:
    ``compute_undial_loss``. ``reference_exact`` (default): over every position that predicts a next token, a -100
    label lowering the logit of id V - 100, as the reference does; ``False``: over the answer tokens."""
    t_hidden, t_weight = _reference_head(ref_model, inputs)
    hidden, weight = _head(model, inputs)
    loss = ul.undial_loss(hidden, weight, inputs["labels"], t_hidden, t_weight, beta=beta,
                          positions="all" if reference_exact else "answer", impl=impl)
    return loss, FusedOutput(hidden)


def compute_wga_loss(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], beta: float, *,
                     impl: str = "auto") -> tuple[torch.Tensor, FusedOutput]:
    """WGA: the mean over answer tokens of sg[p(y)^beta] log p(y) (minimised): ``compute_wga_loss``. A batch with no
    answer token gives 0 where the reference's empty mean gives NaN."""
    hidden, weight = _head(model, inputs)
    return ul.wga_loss(hidden, weight, inputs["labels"], beta=beta, reduction="token", impl=impl), FusedOutput(hidden)


def compute_satimp_loss(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], beta1: float, beta2: float, *,
                        impl: str = "auto") -> tuple[torch.Tensor, FusedOutput]:
    """SatImp: the mean over answer tokens of sg[p^beta1 (1 - p)^beta2] log p(y) (minimised):
    ``compute_satimp_loss``. A batch with no answer token gives 0 where the reference's gives NaN."""
    hidden, weight = _head(model, inputs)
    loss = ul.satimp_loss(hidden, weight, inputs["labels"], beta1=beta1, beta2=beta2, reduction="token", impl=impl)
    return loss, FusedOutput(hidden)


def compute_batch_ceu(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], ignore_first_n_answer_tokens: int = 1,
                      *, impl: str = "auto") -> tuple[torch.Tensor, FusedOutput]:
    """CE-U: the cross-entropy to the model's own detached softmax with the label's logit at -inf, over the answer
    tokens but each answer's first n: ``compute_batch_ceu`` (src/trainer/unlearn/ceu.py)."""
    hidden, weight = _head(model, inputs)
    loss = ul.ceu_loss(hidden, weight, inputs["labels"], ignore_first=ignore_first_n_answer_tokens, impl=impl)
    return loss, FusedOutput(hidden)


def compute_bst_loss(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], lambda_bst: float = 0.2,
                     top_k: int = 20, *, reference_exact: bool = True,
                     impl: str = "auto") -> tuple[torch.Tensor, FusedOutput]:
    """BS-T's forget loss as the authors' fork computes it in ``BST.compute_loss`` (kemoulee/open-unlearning dev,
    src/trainer/unlearn/bst.py; defaults from configs/trainer/BST.yaml): the mean over each sequence's answer tokens
    of <(1 - lambda) e_y + lambda sg[q], log p>, q the softmax of the top-``top_k`` logits (all of them when
    ``top_k`` >= V), then the mean over sequences; minimised. ``reference_exact``: a row without answer tokens makes
    the loss (and its gradient) NaN, as the fork's 0 / 0 does; ``False`` leaves the row out."""
    hidden, head = _head(model, inputs)
    labels = inputs["labels"]
    loss = ul.bst_loss(hidden, head, labels, lam=lambda_bst, topk=min(top_k, head.weight.shape[0]),
                       reduction="sequence", impl=impl)
    if reference_exact:
        empty = ~(shift_labels(labels, IGNORE_INDEX) != IGNORE_INDEX).any(-1)
        loss = loss * torch.where(empty.any(), torch.full_like(loss, float("nan")), torch.ones_like(loss))
    return loss, FusedOutput(hidden)


def compute_bss_loss(model: torch.nn.Module, forget_inputs: Mapping[str, torch.Tensor],
                     augmented_inputs: Mapping[str, torch.Tensor] | None, lambda_bss: float = 0.5, *,
                     impl: str = "auto") -> tuple[torch.Tensor, FusedOutput]:
    """BS-S's forget loss as the authors' fork computes it in ``BSS.compute_loss`` (src/trainer/unlearn/bss.py;
    lambda_bss 0.5 from configs/trainer/BSS.yaml): (1 - lambda) (-mean NLL of the forget batch) + lambda (-mean NLL of
    the batch of the model's own generated answers), the latter 0 when ``augmented_inputs`` is None."""
    hidden, weight = _head(model, forget_inputs)
    targets = dict(hidden=hidden, weight=weight, labels=forget_inputs["labels"])
    if augmented_inputs is None:
        return (1.0 - lambda_bss) * ul.ga_loss(**targets, reduction="token", impl=impl), FusedOutput(hidden)
    a_hidden, a_weight = _head(model, augmented_inputs)
    beliefs = dict(hidden=a_hidden, weight=a_weight, labels=augmented_inputs["labels"])
    loss = ul.bss_loss(ul.ga_loss, targets, beliefs, lam=lambda_bss, reduction="token", impl=impl)
    return loss, FusedOutput(hidden)


def compute_pdu_forget_loss(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], *,
                            reference_exact: bool = True) -> tuple[torch.Tensor, FusedOutput]:
    """PDU's forget loss as ``PDU.compute_loss`` computes it (src/trainer/unlearn/pdu.py): the mean of
    (max_v z_v - mean_v z_v)^2 at the answer tokens' own positions (``reference_exact``), or, ``False``, at the
    positions that predict them."""
    hidden, weight = _head(model, inputs)
    return ul.pdu_loss(hidden, weight, inputs["labels"], shift=not reference_exact), FusedOutput(hidden)


def compute_activation_loss(activation1: torch.Tensor, activation2: torch.Tensor, mask: torch.Tensor, *,
                            reference_exact: bool = True) -> torch.Tensor:
    """RMU's activation loss (``RMU.compute_activation_loss``, src/trainer/unlearn/rmu.py): the squared error averaged
    over the hidden dimension, summed over each row's masked positions. ``reference_exact``: divided by every row's
    count at once (the reference's [B] / [B, 1] broadcast) and averaged over the [B, B] result; ``False``: each row by
    its own count, then the mean over rows (``bs_kernels.activation_mse``)."""
    if not reference_exact:
        return ul.activation_mse(activation1, activation2, mask)
    m = mask.to(torch.promote_types(activation1.dtype, torch.float32))
    sq = (((activation1 - activation2) ** 2) * m[..., None]).mean(-1).sum(-1)
    return (sq / m.sum(-1, keepdim=True)).mean()


__all__ = ["FusedOutput", "compute_activation_loss", "compute_batch_ceu", "compute_batch_nll", "compute_bss_loss",
           "compute_bst_loss", "compute_dpo_loss", "compute_kl_divergence", "compute_mean_nll",
           "compute_pdu_forget_loss", "compute_satimp_loss", "compute_undial_loss", "compute_wga_loss"]
