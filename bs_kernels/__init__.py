"""bs_kernels: fused per-token scores and unlearning losses straight from hidden states and the lm_head weight.

The primitive is ``linear_token_scores(hidden [N, D], weight [V, D], labels [N], *, topk, lam)`` -> float32 [N],
``s_i = <(1 - lam) e_{y_i} + lam sg[q_i], log softmax(h_i W^T)>``, differentiable w.r.t. hidden and weight and
never holding the [N, V] logits; the second, ``linear_teacher_kl``, compares the model's head with a frozen teacher's.
Heads whose logits are not plain ``h W^T`` (a bias, a logit scale, Gemma-2's final soft-capping) pass ``bias=``,
``logit_scale=``, ``softcap=`` to every op, or an ``LMHead`` in place of the weight to every loss (``head.py``).
Every unlearning method's loss is a pure function over them (``unlearning.py``: GA, NPO, SimNPO, WGA, SatImp, DPO,
UNDIAL, CE-U, PDU, BS-T, BS-S and the NLL / KL retain terms), and ``bs_kernels.open_unlearning`` holds drop-in
replacements for open-unlearning's loss helpers. Depends on torch and triton only; importing it changes no global
setting.
"""

from ._checks import IGNORE_INDEX
from .head import LMHead, transform_logits
from .losses import linear_cross_entropy, sequence_mean_weights, shift_labels
from .reference import naive_teacher_kl, naive_token_scores
from .teacher_kl import linear_teacher_kl, linear_weighted_teacher_kl_sum
from .token_scores import linear_token_scores, linear_weighted_score_sum
from .unlearning import (activation_mse, bss_loss, bst_loss, ceu_loss, dpo_loss, ga_loss, kl_loss, logit_margin,
                         mean_weights, nll_loss, npo_loss, pdu_loss, preference_loss, satimp_loss, sequence_logprob,
                         simnpo_loss, token_logprobs, undial_loss, wga_loss)

__all__ = [
    "IGNORE_INDEX",
    "LMHead",
    "activation_mse",
    "bss_loss",
    "bst_loss",
    "ceu_loss",
    "dpo_loss",
    "ga_loss",
    "kl_loss",
    "linear_cross_entropy",
    "linear_teacher_kl",
    "linear_token_scores",
    "linear_weighted_score_sum",
    "linear_weighted_teacher_kl_sum",
    "logit_margin",
    "mean_weights",
    "naive_teacher_kl",
    "naive_token_scores",
    "nll_loss",
    "npo_loss",
    "pdu_loss",
    "preference_loss",
    "satimp_loss",
    "sequence_logprob",
    "sequence_mean_weights",
    "shift_labels",
    "simnpo_loss",
    "token_logprobs",
    "transform_logits",
    "undial_loss",
    "wga_loss",
]
__version__ = "0.2.0"
