"""The naive full-logits formulation: the test oracle and the "plain PyTorch" benchmark provider.

This is what a user writes without this package: materialise ``logits = h W^T`` [N, V], take ``log_softmax``, pick
the top-k beliefs, and let autograd differentiate. It holds O(N V) memory (47 GiB at Llama-3 scale, N = 32768), which
is exactly why the chunked ops exist; keep shapes small when you call it.
"""

from __future__ import annotations

import torch

from ._checks import IGNORE_INDEX
from .torch_rows import stable_topk


def naive_token_scores(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, topk: int = 0,
                       lam: float = 0.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``s_i = <(1 - lam) e_y + lam sg[q_i], log softmax(h_i W^T)>``, differentiable by autograd, [N] float32+.

    Computed in the dtype of ``hidden`` promoted to at least float32 (float64 stays float64).
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden @ weight.t()).to(dtype)
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
                     gamma: float = 0.0, temperature: float = 1.0,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Full-logits ``KL(p_t || p_s)`` (``kind="kl"``) or ``-sum p_t log p_s`` (``"ce"``) per row, [N] float32+.

    ``p_s = softmax(h W^T / T)``, ``p_t = softmax((h_t W_t^T - gamma e_y) / T)`` with the teacher detached; rows whose
    label is ``ignore_index`` give 0. Differentiable by autograd w.r.t. the student's hidden and weight.
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    zs = (hidden @ weight.t()).to(dtype) / temperature
    zt = (teacher_hidden @ teacher_weight.t()).detach().to(dtype)
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
