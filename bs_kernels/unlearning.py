"""Every unlearning method's loss as a pure tensor function over hidden states and the lm_head weight, no logits held.

Each function takes model-shaped tensors, ``hidden [B, T, D]`` (the decoder's final hidden states), ``weight [V, D]``
(the lm_head; or an ``LMHead`` for a head with a bias, a logit scale or soft-capping, ``head.py``) and ``labels [B, T]`` (``ignore_index`` outside the answer), plus what its method needs (reference
log-probs, a teacher's hidden states and head, preferred answers), and returns a 0-d loss that is *minimised*. With
``shift=True`` (the default) position t is scored against ``labels[t + 1]``, the Hugging Face causal-LM convention, by
moving the labels, never by copying the activations. They run on the two fused primitives of this package
(``linear_token_scores`` / ``linear_weighted_score_sum``, ``linear_teacher_kl`` / ``linear_weighted_teacher_kl_sum``),
so memory beyond the returned gradients is one [C, V] chunk plus O(N k), never O(N V).

Reductions. A token-level loss is a weighted sum over answer tokens: ``reduction="token"`` divides by the number of
answer tokens, ``"sequence"`` averages within each sequence and then over the sequences that have answer tokens. The
denominators default to this batch's own counts; a trainer that splits a step over micro-batches or ranks passes the
step's global counts (``num_tokens``, ``num_sequences``, 0-d tensors on the device: no host sync) and sums the
micro-batch losses, which then equal the loss of the whole step exactly. Sequence-level losses (NPO, SimNPO, DPO)
are functions of whole-answer log-likelihoods: their ``reduction`` is ``"sequence"`` (the mean over sequences that
have answer tokens) or ``"none"`` (one value per sequence, 0 for a sequence without answer tokens).

    nll_loss       mean NLL: fine-tuning, and the NLL retain term                       (reduction default "token")
    ga_loss        gradient ascent: mean log-likelihood (minimised)                     ("sequence": the paper's)
    bst_loss       BS-T: soft target (1 - lam) e_y + lam sg[q], q the top-k beliefs     ("sequence": the fork's bst.py)
    wga_loss       WGA: GA with tokens weighted by sg[p(y)^beta]                        ("token": open-unlearning's)
    satimp_loss    SatImp: GA with tokens weighted by sg[p^beta1 (1 - p)^beta2]         ("token")
    npo_loss       NPO: -(2/beta) log sigmoid(-beta (log pi(y|x) - log pi_ref(y|x)))
    simnpo_loss    SimNPO: -(2/beta) log sigmoid(-(beta / |y|) log pi(y|x) - delta)
    dpo_loss       DPO / IdkDPO / AltPO: a preferred answer (K of them per row) against the forget answer
    undial_loss    UNDIAL: CE to the teacher's softmax with the label's logit lowered by beta   ("token")
    ceu_loss       CE-U: CE to the model's own detached softmax with the label removed            ("token")
    pdu_loss       PDU's logit-margin flattening (max_v z_v - mean_v z_v)^2                       ("token")
    kl_loss        the KL retain term KL(p_teacher || p_model), on answer tokens or every position
    bss_loss       BS-S: (1 - lam) L(targets) + lam L(beliefs) for any base loss L above
    activation_mse RMU's activation loss (no lm_head: decoder activations against a target)

On the CPU the losses run the lm_head GEMMs on the rows that carry weight only (the answer tokens: 42% of a TOFU
batch's rows with SmolLM2's chat template); on a GPU every row goes through the fused kernels, since selecting rows
by value (``nonzero``) is a host sync. ``impl="auto"`` picks the Triton kernels on CUDA and plain PyTorch elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ._checks import IGNORE_INDEX
from .head import LMHead, transform_logits
from .losses import shift_amount, shift_labels
from .teacher_kl import linear_weighted_teacher_kl_sum
from .token_scores import linear_token_scores, linear_weighted_score_sum

TOKEN_REDUCTIONS = ("sequence", "token")
SEQUENCE_REDUCTIONS = ("sequence", "none")
POSITIONS = ("answer", "all")
CEU_MASK = 1e4
"""CE-U's target sets the label's logit to -inf; the fused teacher KL takes a finite adjustment, and 1e4 gives the
label exp(-1e4) = 0 probability exactly in float32 for any logit range a model produces."""
MARGIN_CHUNK_BYTES = 96 * 2**20
"""Byte budget of the no-grad logits chunk of PDU's argmax pass (the fused primitives' default chunk)."""

Count = torch.Tensor | float | int | None
Head = torch.Tensor | LMHead
"""An lm_head: its weight [V, D], or an ``LMHead`` (weight, bias, logit scale, soft-cap: ``head.py``), which every
loss below takes in place of the weight."""


# ---- shared plumbing ----------------------------------------------------------------------------------------------


def as_head(weight: Head) -> LMHead:
    """``weight`` as an ``LMHead`` (a plain head for a bare weight tensor)."""
    if isinstance(weight, LMHead):
        return weight
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor [V, D] or an LMHead, got {type(weight).__name__}")
    return LMHead(weight)


def _teacher_options(head: LMHead) -> dict:
    """A teacher head's transform as the fused teacher KL takes it (``teacher_bias`` and so on)."""
    return {f"teacher_{k}": v for k, v in head.options().items()}


def resolve_impl(impl: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA, ``"torch"`` elsewhere; ``"triton"`` / ``"torch"`` are kept."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got impl={impl!r}")
    return ("triton" if device.type == "cuda" else "torch") if impl == "auto" else impl


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {name}={value!r}")


def _model_shaped(hidden: torch.Tensor, labels: torch.Tensor, shift: bool | int, ignore_index: int):
    """(hidden [N, D], shifted labels [B, T] (a 1-D ``labels`` is one sequence)), validated."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError(f"hidden and labels must be torch.Tensors, got {type(hidden).__name__} and "
                         f"{type(labels).__name__}")
    if hidden.dim() < 2 or hidden.shape[:-1] != labels.shape or labels.dim() > 2:
        raise ValueError(f"hidden [B, T, D] (or [T, D]) and labels [B, T] (or [T]) must share leading dims, got hidden "
                         f"{tuple(hidden.shape)} and labels {tuple(labels.shape)}")
    y = shift_labels(labels, ignore_index, shift_amount(shift))
    return hidden.reshape(-1, hidden.shape[-1]), (y if y.dim() == 2 else y[None])


def _count(value: Count, default: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor | float:
    """A denominator: this batch's count (a 0-d tensor >= 1) when ``value`` is None, else the caller's: a 0-d tensor
    (cast to ``dtype``, on its own device: no copy) or a Python number, kept a number (no host-to-device copy)."""
    if value is None:
        return default.to(dtype).clamp_min(1)
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return float(value)


def _acc(t: torch.Tensor) -> torch.dtype:
    """The dtype of weights and per-token values for inputs of ``t``'s dtype: float32, float64 for float64."""
    return torch.promote_types(t.dtype, torch.float32)


def mean_weights(labels: torch.Tensor, reduction: str = "sequence", *, num_tokens: Count = None,
                 num_sequences: Count = None, ignore_index: int = IGNORE_INDEX,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Token weights (``dtype``, shape of ``labels`` [B, T] or [T]) whose weighted sum of per-token values is their
    mean.

    ``"token"``: 1 / ``num_tokens`` on every labelled position (default: the labelled positions here). ``"sequence"``:
    1 / (the sequence's labelled positions x ``num_sequences``) (default: the sequences here with one or more). Labels
    are taken as given (shift them first); computed on their device without host syncs.
    """
    _check_choice("reduction", reduction, TOKEN_REDUCTIONS)
    lab = labels if labels.dim() >= 2 else labels[None]
    active = (lab != ignore_index).to(dtype)
    if reduction == "token":
        out = active / _count(num_tokens, active.sum(), dtype)
    else:
        per_seq = active.sum(-1, keepdim=True)
        out = active / per_seq.clamp_min(1) / _count(num_sequences, (per_seq > 0).sum(), dtype)
    return out.reshape(labels.shape)


def _cpu_rows(rows: torch.Tensor) -> torch.Tensor | None:
    """On the CPU, the indices where the boolean ``rows`` [N] holds (None if none does: then every row runs, each
    weighing 0); None on a GPU, where selecting by value is a host sync."""
    if rows.device.type != "cpu":
        return None
    keep = rows.nonzero().squeeze(1)
    return keep if keep.numel() else None


def _weighted(h, weight: Head, y, tw, *, topk=0, lam=0.0, ignore_index, impl, chunk_size):
    """sum_i tw_i s_i on the three-GEMM path, over the rows with a nonzero weight on the CPU."""
    head = as_head(weight)
    keep = _cpu_rows(tw != 0)
    if keep is not None:
        h, y, tw = h[keep], y[keep], tw[keep]
    loss, _ = linear_weighted_score_sum(h, head.weight, y, tw, topk=topk, lam=lam, ignore_index=ignore_index,
                                        impl=resolve_impl(impl, h.device), chunk_size=chunk_size, **head.options())
    return loss


def _scores(h, weight: Head, y, *, ignore_index, impl, chunk_size) -> torch.Tensor:
    """Per-token log p(y) [N] for any upstream gradient (0 and no gradient where ``y`` is ignored)."""
    impl, head = resolve_impl(impl, h.device), as_head(weight)
    keep = _cpu_rows(y != ignore_index)
    kw = {"ignore_index": ignore_index, "impl": impl, "chunk_size": chunk_size, **head.options()}
    if keep is None:
        return linear_token_scores(h, head.weight, y, **kw)
    kept = linear_token_scores(h[keep], head.weight, y[keep], **kw)
    return kept.new_zeros(y.numel()).index_copy(0, keep, kept)


# ---- per-token scores and whole-answer log-likelihoods ------------------------------------------------------------


def token_logprobs(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, *, shift: bool | int = True,
                   ignore_index: int = IGNORE_INDEX, impl: str = "auto",
                   chunk_size: int | None = None) -> torch.Tensor:
    """log p(y_t) per position, float32 with the shape of the (shifted) ``labels``, 0 where ignored; differentiable
    for any upstream gradient (four GEMMs: the logits are recomputed in backward)."""
    h, y = _model_shaped(hidden, labels, shift, ignore_index)
    s = _scores(h, weight, y.reshape(-1), ignore_index=ignore_index, impl=impl, chunk_size=chunk_size)
    return s.view(labels.shape)


def sequence_logprob(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, *, shift: bool | int = True,
                     ignore_index: int = IGNORE_INDEX, impl: str = "auto",
                     chunk_size: int | None = None) -> torch.Tensor:
    """log pi(y|x) = sum of log p over each sequence's answer tokens, [B] float32 (0 for a row without any):
    open-unlearning's ``compute_batch_nll`` negated, without the [B, T, V] logits."""
    s = token_logprobs(hidden, weight, labels, shift=shift, ignore_index=ignore_index, impl=impl,
                       chunk_size=chunk_size)
    return s.sum(-1) if s.dim() == 2 else s.sum()[None]


# ---- losses over the fused per-token scores -------------------------------------------------------------------------


def ga_loss(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, *, reduction: str = "sequence",
            num_tokens: Count = None, num_sequences: Count = None, ignore_index: int = IGNORE_INDEX,
            shift: bool | int = True, impl: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """Gradient ascent, minimised: the mean answer log-likelihood. ``"sequence"`` is the paper's formula (default);
    ``"token"`` is open-unlearning's GradAscent (``-model(**forget).loss``)."""
    return bst_loss(hidden, weight, labels, lam=0.0, topk=0, reduction=reduction, num_tokens=num_tokens,
                    num_sequences=num_sequences, ignore_index=ignore_index, shift=shift, impl=impl,
                    chunk_size=chunk_size)


def nll_loss(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, *, reduction: str = "token",
             num_tokens: Count = None, num_sequences: Count = None, ignore_index: int = IGNORE_INDEX,
             shift: bool | int = True, impl: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """The mean answer NLL (fine-tuning, and the NLL retain term); ``"token"`` (default) is Hugging Face's
    ``model(**inputs).loss``."""
    h, y = _model_shaped(hidden, labels, shift, ignore_index)
    tw = mean_weights(y, reduction, num_tokens=num_tokens, num_sequences=num_sequences, ignore_index=ignore_index,
                      dtype=_acc(h))
    return _weighted(h, weight, y.reshape(-1), -tw.reshape(-1), ignore_index=ignore_index, impl=impl,
                     chunk_size=chunk_size)


def bst_loss(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, *, lam: float = 0.2, topk: int = 20,
             reduction: str = "sequence", num_tokens: Count = None, num_sequences: Count = None,
             ignore_index: int = IGNORE_INDEX, shift: bool | int = True, impl: str = "auto",
             chunk_size: int | None = None) -> torch.Tensor:
    """BS-T forget loss, minimised: the mean of s_i = <(1 - lam) e_y + lam sg[q_i], log p_i> over answer tokens, q_i
    the model's softmax on its top-``topk`` tokens, renormalised (its beliefs). Defaults lam 0.2, k 20 and the
    per-sequence mean are the paper's and the authors' fork's (kemoulee/open-unlearning dev, configs/trainer/BST.yaml,
    src/trainer/unlearn/bst.py); ``lam=0`` is exactly ``ga_loss``."""
    h, y = _model_shaped(hidden, labels, shift, ignore_index)
    tw = mean_weights(y, reduction, num_tokens=num_tokens, num_sequences=num_sequences, ignore_index=ignore_index,
                      dtype=_acc(h))
    return _weighted(h, weight, y.reshape(-1), tw.reshape(-1), topk=topk, lam=lam, ignore_index=ignore_index,
                     impl=impl, chunk_size=chunk_size)


def _weighted_logprob_mean(hidden, weight, labels, token_factor: Callable[[torch.Tensor], torch.Tensor], *,
                           reduction, num_tokens, num_sequences, ignore_index, shift, impl, chunk_size):
    """mean over answer tokens of sg[f(log p)] log p (WGA, SatImp)."""
    h, y = _model_shaped(hidden, labels, shift, ignore_index)
    tw = mean_weights(y, reduction, num_tokens=num_tokens, num_sequences=num_sequences, ignore_index=ignore_index,
                      dtype=_acc(h))
    s = _scores(h, weight, y.reshape(-1), ignore_index=ignore_index, impl=impl, chunk_size=chunk_size)
    return (token_factor(s.detach()) * s * tw.reshape(-1)).sum()


def wga_loss(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, *, beta: float = 1.0,
             reduction: str = "token", num_tokens: Count = None, num_sequences: Count = None,
             ignore_index: int = IGNORE_INDEX, shift: bool | int = True, impl: str = "auto",
             chunk_size: int | None = None) -> torch.Tensor:
    """WGA, minimised: the mean over answer tokens of sg[p(y_i)^beta] log p(y_i) (beta 1 and the token mean:
    open-unlearning configs/trainer/WGA.yaml and src/trainer/utils.py ``compute_wga_loss``)."""
    return _weighted_logprob_mean(hidden, weight, labels, lambda s: torch.exp(beta * s), reduction=reduction,
                                  num_tokens=num_tokens, num_sequences=num_sequences, ignore_index=ignore_index,
                                  shift=shift, impl=impl, chunk_size=chunk_size)


def satimp_loss(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, *, beta1: float = 5.0,
                beta2: float = 1.0, reduction: str = "token", num_tokens: Count = None, num_sequences: Count = None,
                ignore_index: int = IGNORE_INDEX, shift: bool | int = True, impl: str = "auto",
                chunk_size: int | None = None) -> torch.Tensor:
    """SatImp, minimised: the mean over answer tokens of sg[p^beta1 (1 - p)^beta2] log p(y_i) (Yang et al. 2025,
    arXiv:2505.11953; beta1 5, beta2 1: open-unlearning configs/trainer/SatImp.yaml, ``compute_satimp_loss``)."""

    def factor(s):
        p = s.exp()
        return p**beta1 * (1.0 - p) ** beta2

    return _weighted_logprob_mean(hidden, weight, labels, factor, reduction=reduction, num_tokens=num_tokens,
                                  num_sequences=num_sequences, ignore_index=ignore_index, shift=shift, impl=impl,
                                  chunk_size=chunk_size)


# ---- sequence-level losses ----------------------------------------------------------------------------------------


def _reduce_sequences(per_seq: torch.Tensor, keep: torch.Tensor, reduction: str, num_sequences: Count):
    _check_choice("reduction", reduction, SEQUENCE_REDUCTIONS)
    per_seq = torch.where(keep, per_seq, torch.zeros_like(per_seq))
    if reduction == "none":
        return per_seq
    return per_seq.sum() / _count(num_sequences, keep.sum(), per_seq.dtype)


def _answer_logprob(hidden, weight, labels, *, shift, ignore_index, impl, chunk_size):
    """(log pi(y|x) [B], answer tokens per row [B])."""
    h, y = _model_shaped(hidden, labels, shift, ignore_index)
    s = _scores(h, weight, y.reshape(-1), ignore_index=ignore_index, impl=impl, chunk_size=chunk_size)
    return s.view(y.shape).sum(-1), (y != ignore_index).sum(-1)


def _reference(name: str, ref: Any, rows: int, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(ref, torch.Tensor) or ref.shape != (rows,):
        shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
        raise ValueError(f"{name} must be a tensor of shape ({rows},), one log-prob per sequence, got {shape}")
    return ref.to(device=like.device, dtype=like.dtype)


def preference_loss(lose_logratio: torch.Tensor, win_logratio: torch.Tensor | None = None, *, beta: float = 0.1,
                    keep: torch.Tensor | None = None, reduction: str = "sequence",
                    num_sequences: Count = None) -> torch.Tensor:
    """The DPO objective over log-ratios log pi - log pi_ref: -(2/beta) log sigmoid(beta (win - lose)), with no
    winner (NPO) -(2/beta) log sigmoid(-beta lose) (open-unlearning ``compute_dpo_loss``). ``lose_logratio`` [B];
    ``win_logratio`` [B] or [B, K] (K preferred answers per row, the loss averaged over them: AltPO); ``keep`` [B]
    the rows that count (rows with answer tokens)."""
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise ValueError(f"beta must be a float > 0, got beta={beta!r}")
    if win_logratio is None:
        per = -(2.0 / beta) * F.logsigmoid(-beta * lose_logratio)
    else:
        win = win_logratio if win_logratio.dim() == 2 else win_logratio[:, None]
        per = (-(2.0 / beta) * F.logsigmoid(beta * (win - lose_logratio[:, None]))).mean(-1)
    keep = torch.ones_like(per, dtype=torch.bool) if keep is None else keep
    return _reduce_sequences(per, keep, reduction, num_sequences)


def npo_loss(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, ref_logprob: torch.Tensor, *,
             beta: float = 0.1, reduction: str = "sequence", num_sequences: Count = None,
             ignore_index: int = IGNORE_INDEX, shift: bool | int = True, impl: str = "auto",
             chunk_size: int | None = None) -> torch.Tensor:
    """NPO, minimised: -(2/beta) log sigmoid(-beta (log pi(y|x) - log pi_ref(y|x))), log pi summed over each answer's
    tokens; ``ref_logprob`` [B] the reference model's (``sequence_logprob`` of it, computed once). beta 0.1: Zhang et
    al. 2024; open-unlearning configs/trainer/NPO.yaml."""
    logp, n = _answer_logprob(hidden, weight, labels, shift=shift, ignore_index=ignore_index, impl=impl,
                              chunk_size=chunk_size)
    ref = _reference("ref_logprob", ref_logprob, logp.shape[0], logp)
    return preference_loss(logp - ref, beta=beta, keep=n > 0, reduction=reduction, num_sequences=num_sequences)


def simnpo_loss(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, *, beta: float = 4.5,
                delta: float = 0.0, reduction: str = "sequence", num_sequences: Count = None,
                ignore_index: int = IGNORE_INDEX, shift: bool | int = True, impl: str = "auto",
                chunk_size: int | None = None) -> torch.Tensor:
    """SimNPO, minimised: -(2/beta) log sigmoid(-(beta/|y|) log pi(y|x) - delta), no reference model (beta 4.5,
    delta 0: open-unlearning configs/trainer/SimNPO.yaml; its code writes beta (NLL/|y| - delta'), delta = beta
    delta')."""
    logp, n = _answer_logprob(hidden, weight, labels, shift=shift, ignore_index=ignore_index, impl=impl,
                              chunk_size=chunk_size)
    per = -(2.0 / beta) * F.logsigmoid(-beta * logp / n.clamp_min(1) - delta)
    return _reduce_sequences(per, n > 0, reduction, num_sequences)


def dpo_loss(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, ref_logprob: torch.Tensor,
             win_hidden: torch.Tensor, win_labels: torch.Tensor, win_ref_logprob: torch.Tensor, *, beta: float = 0.1,
             reduction: str = "sequence", num_sequences: Count = None, ignore_index: int = IGNORE_INDEX,
             shift: bool | int = True, impl: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """DPO with the forget answer rejected, minimised: -(2/beta) log sigmoid(beta ((log pi(w|x) - log pi_ref(w|x)) -
    (log pi(y|x) - log pi_ref(y|x)))). ``hidden`` / ``labels`` / ``ref_logprob`` [B] are the forget answers';
    ``win_*`` the preferred answers', K per forget row grouped by row ([B K, T_w, D]: IdkDPO has K = 1, AltPO averages
    over its K alternates). beta 0.1: open-unlearning configs/trainer/DPO.yaml."""
    lose, n = _answer_logprob(hidden, weight, labels, shift=shift, ignore_index=ignore_index, impl=impl,
                              chunk_size=chunk_size)
    win, _ = _answer_logprob(win_hidden, weight, win_labels, shift=shift, ignore_index=ignore_index, impl=impl,
                             chunk_size=chunk_size)
    if win.shape[0] % lose.shape[0]:
        raise ValueError(f"win_hidden has {win.shape[0]} rows, not a multiple of the {lose.shape[0]} forget rows "
                         "(K preferred answers per forget row, grouped by row)")
    lose_ratio = lose - _reference("ref_logprob", ref_logprob, lose.shape[0], lose)
    win_ratio = win - _reference("win_ref_logprob", win_ref_logprob, win.shape[0], win)
    return preference_loss(lose_ratio, win_ratio.view(lose.shape[0], -1), beta=beta, keep=n > 0,
                           reduction=reduction, num_sequences=num_sequences)


# ---- losses against a target distribution: a teacher's (UNDIAL, KL) or the model's own (CE-U) ----------------------


def _teacher_sum(h, weight: Head, t_h, t_weight: Head, y, tw, *, kind, gamma, ignore_index, impl, chunk_size):
    """sum_i tw_i value_i of the fused teacher KL / soft-target CE, over the rows with a nonzero weight on the CPU."""
    head, teacher = as_head(weight), as_head(t_weight).to(h.dtype)
    keep = _cpu_rows(tw != 0)
    if keep is not None:
        h, t_h, tw = h[keep], t_h[keep], tw[keep]
        y = None if y is None else y[keep]
    loss, _ = linear_weighted_teacher_kl_sum(h, head.weight, t_h.to(h.dtype), teacher.weight, tw, y, kind=kind,
                                             gamma=gamma, ignore_index=ignore_index, impl=resolve_impl(impl, h.device),
                                             chunk_size=chunk_size, **head.options(), **_teacher_options(teacher))
    return loss


def _teacher_rows(name: str, teacher_hidden: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    if not isinstance(teacher_hidden, torch.Tensor) or teacher_hidden.shape[:-1] != hidden.shape[:-1]:
        shape = tuple(teacher_hidden.shape) if isinstance(teacher_hidden, torch.Tensor) else type(teacher_hidden)
        raise ValueError(f"{name} must have the leading dims of hidden {tuple(hidden.shape[:-1])}, got {shape}")
    return teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])


def undial_loss(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: Head, *, beta: float = 10.0, positions: str = "answer",
                reduction: str = "token", num_tokens: Count = None, num_sequences: Count = None,
                ignore_index: int = IGNORE_INDEX, shift: bool | int = True, impl: str = "auto",
                chunk_size: int | None = None) -> torch.Tensor:
    """UNDIAL, minimised: -sum_v softmax(z_teacher - beta e_y)_v log p(v), the cross-entropy to the frozen teacher's
    distribution with the label's logit lowered by ``beta`` (Dong et al. 2024, arXiv:2402.10052; beta 10:
    open-unlearning configs/trainer/UNDIAL.yaml). ``teacher_hidden`` [B, T, D_t] and ``teacher_weight`` [V, D_t] are
    the initial model's (detached).

    ``positions="answer"`` (ours) scores the answer tokens. ``"all"`` is open-unlearning's ``compute_undial_loss``:
    every position that predicts a next token, prompt and padding included, each averaged in; at a position whose
    label is ``ignore_index`` the reference lowers the teacher's logit at that negative id read as Python indexing
    reads it (-100 -> V - 100), and so does ``"all"``, to give its numbers."""
    _check_choice("positions", positions, POSITIONS)
    h, y = _model_shaped(hidden, labels, shift, ignore_index)
    t_h = _teacher_rows("teacher_hidden", teacher_hidden, hidden)
    if positions == "all":
        vocab, k = as_head(weight).weight.shape[0], shift_amount(shift)
        if ignore_index < 0 and -ignore_index > vocab:
            raise ValueError(f"positions='all' lowers the teacher's logit at id {ignore_index} + V as the reference "
                             f"does, which needs V >= {-ignore_index}; got V={vocab}")
        scored = torch.ones_like(y, dtype=torch.bool)
        if k:
            scored[:, y.shape[1] - min(k, y.shape[1]):] = False  # no next token to predict
        y = torch.where(y == ignore_index, torch.full_like(y, ignore_index % vocab), y)
        y = torch.where(scored, y, torch.full_like(y, ignore_index))
        tw = mean_weights(torch.where(scored, 0, ignore_index), reduction, num_tokens=num_tokens,
                          num_sequences=num_sequences, ignore_index=ignore_index,
                      dtype=_acc(h))
    else:
        tw = mean_weights(y, reduction, num_tokens=num_tokens, num_sequences=num_sequences, ignore_index=ignore_index,
                      dtype=_acc(h))
    return _teacher_sum(h, weight, t_h, teacher_weight, y.reshape(-1), tw.reshape(-1), kind="ce", gamma=beta,
                        ignore_index=ignore_index, impl=impl, chunk_size=chunk_size)


def drop_first_answer_tokens(labels: torch.Tensor, n: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels`` [B, T] with each row's first ``n`` labelled positions set to ``ignore_index``."""
    active = labels != ignore_index
    return labels.masked_fill(active & (active.cumsum(-1) <= n), ignore_index)


def ceu_loss(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, *, ignore_first: int = 1,
             reduction: str = "token", num_tokens: Count = None, num_sequences: Count = None,
             ignore_index: int = IGNORE_INDEX, shift: bool | int = True, impl: str = "auto",
             chunk_size: int | None = None) -> torch.Tensor:
    """CE-U, minimised: -sum_v t_v log p(v), t = sg[softmax(z)] with the label's logit at -inf, the mean over answer
    tokens but each answer's first ``ignore_first`` (Yang et al. 2025, arXiv:2503.01224; open-unlearning
    src/trainer/unlearn/ceu.py and configs/trainer/CEU.yaml: 1, dropped from the unshifted labels as there).
    ``num_tokens`` counts the kept tokens."""
    if isinstance(ignore_first, bool) or not isinstance(ignore_first, int) or ignore_first < 0:
        raise ValueError(f"ignore_first must be an int >= 0, got ignore_first={ignore_first!r}")
    if isinstance(labels, torch.Tensor):
        labels = drop_first_answer_tokens(labels if labels.dim() == 2 else labels[None], ignore_first,
                                          ignore_index).reshape(labels.shape)
    h, y = _model_shaped(hidden, labels, shift, ignore_index)
    tw = mean_weights(y, reduction, num_tokens=num_tokens, num_sequences=num_sequences, ignore_index=ignore_index,
                      dtype=_acc(h))
    return _teacher_sum(h, weight, h.detach(), as_head(weight).detach(), y.reshape(-1), tw.reshape(-1), kind="ce",
                        gamma=CEU_MASK, ignore_index=ignore_index, impl=impl, chunk_size=chunk_size)


def kl_loss(hidden: torch.Tensor, weight: Head, labels: torch.Tensor | None, teacher_hidden: torch.Tensor,
            teacher_weight: Head, *, positions: str = "answer", reduction: str = "token",
            num_tokens: Count = None, num_sequences: Count = None, ignore_index: int = IGNORE_INDEX,
            shift: bool | int = True, impl: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """The KL retain term KL(p_teacher || p_model), minimised, teacher frozen (the initial model's ``teacher_hidden``
    [B, T, D_t] and ``teacher_weight`` [V, D_t]). ``positions="answer"`` (ours): the positions that predict answer
    tokens. ``"all"``: every one of the B x T positions, prompt, padding and the last included, ``labels`` unused
    (open-unlearning ``compute_kl_divergence``: ``kl_div(..., reduction="batchmean")`` over the flattened logits);
    ``num_tokens`` then counts positions."""
    _check_choice("positions", positions, POSITIONS)
    t_h = _teacher_rows("teacher_hidden", teacher_hidden, hidden)
    if positions == "all":
        if hidden.dim() < 2:
            raise ValueError(f"hidden must be [B, T, D] or [T, D], got shape {tuple(hidden.shape)}")
        every = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
        tw = mean_weights(every, reduction, num_tokens=num_tokens, num_sequences=num_sequences,
                          ignore_index=ignore_index, dtype=_acc(hidden))
        h, y = hidden.reshape(-1, hidden.shape[-1]), None
    else:
        h, y2 = _model_shaped(hidden, labels, shift, ignore_index)
        tw = mean_weights(y2, reduction, num_tokens=num_tokens, num_sequences=num_sequences, ignore_index=ignore_index,
                      dtype=_acc(h))
        y = y2.reshape(-1)
    return _teacher_sum(h, weight, t_h, teacher_weight, y, tw.reshape(-1), kind="kl", gamma=0.0,
                        ignore_index=ignore_index, impl=impl, chunk_size=chunk_size)


# ---- PDU's logit margin, BS-S's mixture, RMU's activations --------------------------------------------------------


def _mean_logit(h: torch.Tensor, head: LMHead) -> torch.Tensor:
    return head.logits(h).to(_acc(h)).mean(-1)


def logit_margin(hidden: torch.Tensor, weight: Head) -> torch.Tensor:
    """max_v z_v - mean_v z_v [N] of the head's logits z (h [N, D]), float32 (float64 for float64), differentiable,
    never holding [N, V]: the argmax comes from a chunked no-grad pass (``MARGIN_CHUNK_BYTES`` of logits at a time),
    then max = the transform of ``<h, W[argmax]> + b[argmax]`` (the max's gradient is its argmax logit's) and, for a
    linear head (z = s (h W^T + b)), ``mean = s (<h, the mean of W's rows> + mean b)``. A soft-capped head's mean is
    not linear in h: it is taken chunk by chunk, each chunk's logits recomputed in the backward (activation
    checkpointing), so one chunk is held at a time."""
    from torch.utils.checkpoint import checkpoint

    head = as_head(weight)
    w, b = head.weight, head.bias
    rows = max(1, MARGIN_CHUNK_BYTES // (w.shape[0] * w.element_size()))
    chunks = range(0, hidden.shape[0], rows)
    with torch.no_grad():
        idx = torch.cat([head.logits(hidden[i:i + rows]).argmax(-1) for i in chunks]) if len(chunks) else \
            torch.zeros(0, dtype=torch.long, device=hidden.device)
    acc = _acc(hidden)
    x_max = (hidden.to(acc) * w[idx].to(acc)).sum(-1) + (0.0 if b is None else b[idx].to(acc))
    z_max = transform_logits(x_max, logit_scale=head.logit_scale, softcap=head.softcap)
    if head.softcap is None:
        mean = hidden.to(acc) @ w.mean(0, dtype=acc) + (0.0 if b is None else b.to(acc).mean())
        return z_max - head.logit_scale * mean
    if not len(chunks):
        return z_max
    return z_max - torch.cat([checkpoint(_mean_logit, hidden[i:i + rows], head, use_reentrant=False) for i in chunks])


def pdu_loss(hidden: torch.Tensor, weight: Head, labels: torch.Tensor, *, reduction: str = "token",
             num_tokens: Count = None, num_sequences: Count = None, ignore_index: int = IGNORE_INDEX,
             shift: bool | int = True) -> torch.Tensor:
    """PDU's forget loss, minimised: the mean of (max_v z_v - mean_v z_v)^2 (logit-margin flattening; Entesari et
    al. 2025, arXiv:2506.05314). ``shift=True`` (ours) scores the positions that predict answer tokens; ``shift=False``
    the answer tokens' own positions, as open-unlearning src/trainer/unlearn/pdu.py does."""
    h, y = _model_shaped(hidden, labels, shift, ignore_index)
    tw = mean_weights(y, reduction, num_tokens=num_tokens, num_sequences=num_sequences, ignore_index=ignore_index,
                      dtype=_acc(h))
    tw = tw.reshape(-1)
    keep = _cpu_rows(tw != 0)
    if keep is not None:
        h, tw = h[keep], tw[keep]
    return (logit_margin(h, weight) ** 2 * tw).sum()


def bss_loss(base: Callable[..., torch.Tensor], targets: Mapping[str, Any], beliefs: Mapping[str, Any], *,
             lam: float = 0.5, **options: Any) -> torch.Tensor:
    """BS-S's forget loss: ``(1 - lam) base(**targets, **options) + lam base(**beliefs, **options)``, ``base`` any loss
    of this module (BS-T is the paper's strongest; the authors' fork trains GA with the token mean), ``targets`` and
    ``beliefs`` its tensors for the forget answers and for the model's own sampled answers to the same prompts (e.g.
    ``dict(hidden=..., weight=..., labels=...)``, plus ``ref_logprob`` for NPO). lam 0.5: the paper and the fork's
    configs/trainer/BSS.yaml ``lambda_bss``."""
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got lam={lam!r}")
    return (1.0 - lam) * base(**targets, **options) + lam * base(**beliefs, **options)


def activation_mse(activation: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                   num_sequences: Count = None) -> torch.Tensor:
    """RMU's activation loss: the squared error averaged over the hidden dimension, then over each sequence's masked
    positions (``mask`` [B, T], e.g. its answer tokens), then over the sequences that have any. ``target`` broadcasts
    against ``activation`` [B, T, D] (RMU's steering vector c u, or the frozen model's activations)."""
    m = mask.float()
    sq = ((activation.float() - target.float()) ** 2).mean(-1)
    per_seq = (sq * m).sum(-1) / m.sum(-1).clamp_min(1)
    return per_seq.sum() / _count(num_sequences, (m.sum(-1) > 0).sum(), per_seq.dtype)
