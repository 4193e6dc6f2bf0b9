"""The naive full-logits formulation: the test oracle and the "plain PyTorch" benchmark provider.

This is what a user writes without this package: materialise ``logits = h W^T`` [N, V], take ``log_softmax``, pick
the top-k beliefs, and let autograd differentiate. It holds O(N V) memory (47 GiB at Llama-3 scale, N = 32768), which
is exactly why the chunked ops exist; keep shapes small when you call it.
"""

from __future__ import annotations

import torch

from ._checks import IGNORE_INDEX
from .head import transform_logits
from .torch_rows import stable_topk


def _logits(hidden, weight, bias, logit_scale, softcap, dtype):
    """The head's logits in ``dtype``: the GEMM in the inputs' dtype, the transform in ``dtype``."""
    x = torch.nn.functional.linear(hidden, weight, bias).to(dtype)
    return transform_logits(x, logit_scale=logit_scale, softcap=softcap)


def naive_token_scores(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, topk: int = 0,
                       lam: float = 0.0, ignore_index: int = IGNORE_INDEX, bias: torch.Tensor | None = None,
                       logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """``s_i = <(1 - lam) e_y + lam sg[q_i], log softmax(z_i)>``, differentiable by autograd, [N] float32+, with
    ``z_i`` the head's logits (``h_i W^T``, or their transform by ``bias``, ``logit_scale``, ``softcap``: ``head.py``).

    Computed in the dtype of ``hidden`` promoted to at least float32 (float64 stays float64).
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = _logits(hidden, weight, bias, logit_scale, softcap, dtype)
    logp = torch.log_softmax(logits, dim=-1)
    active = labels != ignore_index
    y = torch.where(active, labels, torch.zeros_like(labels)).long()
    score = logp.gather(1, y[:, None]).squeeze(1)
    if lam > 0 and topk > 0:
        top_z, top_idx = stable_topk(logits.detach(), topk)
        q = torch.softmax(top_z, dim=-1)
        score = (1 - lam) * score + lam * (q * logp.gather(1, top_idx)).sum(-1)
    return torch.where(active, score, torch.zeros_like(score))


def naive_teacher_kl(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                     teacher_weight: torch.Tensor, labels: torch.Tensor | None = None, *, kind: str = "kl",
                     gamma: float = 0.0, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                     bias: torch.Tensor | None = None, logit_scale: float = 1.0, softcap: float | None = None,
                     teacher_bias: torch.Tensor | None = None, teacher_logit_scale: float = 1.0,
                     teacher_softcap: float | None = None) -> torch.Tensor:
    """Full-logits ``KL(p_t || p_s)`` (``kind="kl"``) or ``-sum p_t log p_s`` (``"ce"``) per row, [N] float32+.

    ``p_s = softmax(z_s / T)``, ``p_t = softmax((z_t - gamma e_y) / T)`` with the teacher detached, z_s and z_t the two
    heads' logits (``h W^T`` or their transforms, ``head.py``); rows whose label is ``ignore_index`` give 0.
    Differentiable by autograd w.r.t. the student's hidden, weight and bias.
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    zs = _logits(hidden, weight, bias, logit_scale, softcap, dtype) / temperature
    zt = _logits(teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap, dtype).detach()
    active = torch.ones(zs.shape[0], dtype=torch.bool, device=zs.device)
    if labels is not None:
        active = labels != ignore_index
        if gamma:
            y = torch.where(active, labels, torch.zeros_like(labels)).long()
            zt = zt - gamma * torch.nn.functional.one_hot(y, zt.shape[1]).to(dtype)
    logp_s = torch.log_softmax(zs, dim=-1)
    logp_t = torch.log_softmax(zt / temperature, dim=-1)
    p_t = logp_t.exp()
    inner = logp_t - logp_s if kind == "kl" else -logp_s
    value = torch.where(p_t > 0, p_t * inner, torch.zeros_like(p_t)).sum(-1)  # 0 log 0 = 0
    return torch.where(active, value, torch.zeros_like(value))
