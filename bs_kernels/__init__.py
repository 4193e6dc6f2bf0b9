"""bs_kernels: fused per-token scores and unlearning losses straight from hidden states and the lm_head weight.

The primitive is ``linear_token_scores(hidden [N, D], weight [V, D], labels [N], *, topk, lam)`` -> float32 [N],
``s_i = <(1 - lam) e_{y_i} + lam sg[q_i], log softmax(h_i W^T)>``, differentiable w.r.t. hidden and weight and
never holding the [N, V] logits. Heads whose logits are not plain ``h W^T`` (a bias, a logit scale, Gemma-2's final
soft-capping) pass ``bias=``, ``logit_scale=``, ``softcap=`` to every op (``head.py``). Every likelihood-based
unlearning loss (GA, NPO, SimNPO, WGA, BS-T) is a small function of these scores. Depends on torch and triton only;
importing it changes no global setting.
"""

from ._checks import IGNORE_INDEX
from .head import LMHead, transform_logits
from .losses import bst_loss, ga_loss, linear_cross_entropy, sequence_mean_weights, shift_labels
from .reference import naive_teacher_kl, naive_token_scores
from .teacher_kl import linear_teacher_kl, linear_weighted_teacher_kl_sum
from .token_scores import linear_token_scores, linear_weighted_score_sum

__all__ = [
    "IGNORE_INDEX",
    "LMHead",
    "bst_loss",
    "ga_loss",
    "linear_cross_entropy",
    "linear_teacher_kl",
    "linear_token_scores",
    "linear_weighted_score_sum",
    "linear_weighted_teacher_kl_sum",
    "naive_teacher_kl",
    "naive_token_scores",
    "sequence_mean_weights",
    "shift_labels",
    "transform_logits",
]
__version__ = "0.1.0"
