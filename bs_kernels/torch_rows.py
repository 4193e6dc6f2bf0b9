"""Plain PyTorch row operations on one chunk of logits: the reference for the Triton kernels and the CPU path.

The chunked driver in ``token_scores.py`` computes a chunk of logits ``z = h W^T`` with a GEMM and hands it to a row
operation, which turns each row into its score and, when asked, overwrites the chunk in place with ``dL/dz``.
This file holds the PyTorch version of those row operations; ``triton_rows.py`` holds the fused Triton version with
the same contract, and the tests hold the two to each other.

Per row i, with p = softmax(z_i), y = labels[i]:
    H_k   = the k largest entries of z_i; ties broken towards the lower vocabulary index (a stable order)
    q     = softmax of z_i restricted to H_k                        (stop-gradient)
    t     = (1 - lam) e_y + lam q                                   (soft target)
    s_i   = <t, log p>  = (1 - lam) log p_y + lam sum_{j in H_k} q_j log p_j
    ds/dz = t - p        (t sums to one), so dL/dz_i = g_i (t - p)
With lam = 0 (or topk = 0) the score is log p(y) and no top-k is computed.
"""

from __future__ import annotations

import torch


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of 2-D ``x``, ties broken towards the lower index (the rule the Triton kernel follows).

    Returns ``(values, indices)`` [R, k] in ascending index order. Costs one ``topk`` for the k-th value, then
    keeps everything above it plus the lowest-indexed entries equal to it: O(V) per row, no full sort.
    """
    kth = torch.topk(x, k, dim=-1).values[:, -1:]
    above = x > kth
    tied = x == kth
    sel = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    idx = sel.nonzero()[:, 1].view(x.shape[0], k)
    return x.gather(1, idx), idx


def _targets(labels: torch.Tensor, ignore_index: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(active rows, labels clamped into range for gathers, rows whose label is out of range)."""
    active = labels != ignore_index
    out_of_range = active & ((labels < 0) | (labels >= vocab))
    y = torch.where(active & ~out_of_range, labels, torch.zeros_like(labels)).long()
    return active, y, out_of_range


def scores_rows(z: torch.Tensor, labels: torch.Tensor, *, topk: int, lam: float, ignore_index: int,
                grad: torch.Tensor | None = None, save_stats: bool = False):
    """Scores of a chunk of logits ``z`` [C, V]; see the module docstring for the formula.

    If ``grad`` [C] is given, ``z`` is overwritten with ``grad[:, None] * (t - p)`` (zero on ignored rows).
    Returns ``(scores fp32 [C], lse fp32 [C] | None, top-k indices int32 [C, k] | None, q fp32 [C, k] | None)``;
    the statistics are returned when ``save_stats`` and are what ``grad_rows_from_stats`` needs to rebuild t.
    """
    x = z.to(torch.promote_types(z.dtype, torch.float32))
    use_topk = topk > 0 and lam > 0
    active, y, bad = _targets(labels, ignore_index, x.shape[-1])
    lse = torch.logsumexp(x, dim=-1)
    logp_y = x.gather(1, y[:, None]).squeeze(1) - lse
    topi = q = None
    if use_topk:
        topv, topi = stable_topk(x, topk)
        q = torch.softmax(topv, dim=-1)
        score = (1.0 - lam) * logp_y + lam * (q * (topv - lse[:, None])).sum(-1)
    else:
        score = logp_y
    score = torch.where(active, score, torch.zeros_like(score))
    score = torch.where(bad, torch.full_like(score, float("nan")), score)
    if grad is not None:
        _write_grad(z, x, lse, y, active, grad, topi, q, lam, bad)
    if not save_stats:
        return score, None, None, None
    return score, lse, (topi.to(torch.int32) if use_topk else None), q


def grad_rows_from_stats(z: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor, lse: torch.Tensor,
                         topi: torch.Tensor | None, q: torch.Tensor | None, *, lam: float, ignore_index: int) -> None:
    """Overwrite recomputed logits ``z`` [C, V] with ``grad[:, None] * (t - p)``, t rebuilt from saved statistics."""
    active, y, bad = _targets(labels, ignore_index, z.shape[-1])
    x = z.to(torch.promote_types(z.dtype, torch.float32))
    _write_grad(z, x, lse, y, active, grad, None if topi is None else topi.long(), q, lam, bad)


def _write_grad(z, x, lse, y, active, grad, topi, q, lam, bad=None) -> None:
    g = torch.where(active, grad.to(x.dtype), torch.zeros_like(grad, dtype=x.dtype))
    if bad is not None:  # out-of-range labels poison their gradient, as in the Triton kernel
        g = torch.where(bad, torch.full_like(g, float("nan")), g)
    t = torch.zeros_like(x)
    t.scatter_(1, y[:, None], (1.0 - lam) if topi is not None else 1.0)
    if topi is not None:
        t.scatter_add_(1, topi, lam * q)
    dz = g[:, None] * (t - torch.exp(x - lse[:, None]))
    z.copy_(dz)
