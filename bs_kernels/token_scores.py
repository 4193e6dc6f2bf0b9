"""Fused per-token scores from hidden states and the lm_head weight, never holding the [N, V] logits.

This is the one primitive every likelihood-based unlearning loss is built on (docs/guides/fused-losses.md):

    linear_token_scores(hidden [N, D], weight [V, D], labels [N]) -> s [N],   s_i = <t_i, log softmax(h_i W^T)>
    t_i = (1 - lam) e_{y_i} + lam sg[q_i],   q_i = softmax(h_i W^T) restricted to its top-k, renormalised.

Both public ops stream over N in chunks of C rows. For each chunk a cuBLAS GEMM writes the logits into one reused
[C, V] buffer, a row operation (Triton, or plain PyTorch) reduces each row and, when a gradient is needed,
overwrites the buffer in place with dL/dz; two more GEMMs turn that into dL/dhidden and dL/dweight.

* ``linear_weighted_score_sum``: the upstream gradient of every score is a weight known at forward time (GA,
  GradDiff, BS-T with the reference reduction, cross-entropy), so the gradients are produced *during* the forward:
  three GEMMs in all, and backward only scales them by the scalar upstream gradient.
* ``linear_token_scores``: any upstream gradient (NPO and SimNPO weight tokens by sequence-level quantities). The
  forward saves O(N k) statistics (log-sum-exp, top-k indices and q); backward recomputes the logits chunk by chunk:
  four GEMMs in all.

A head whose logits are not plain ``h W^T`` (``head.py``: a bias, a logit scale, Gemma-2's final soft-capping) is
scored on its transformed logits: the bias enters the logits GEMM, the transform and its chain rule the row pass.

Memory beyond inputs and returned gradients: one [C, V] buffer plus O(N k); never O(N V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import torch_path, torch_rows
from ._checks import IGNORE_INDEX, check_head, check_options, check_tensors
from ._chunked import (add_head_grads, check_chunk_size, chunk_rows, chunks, head_logits, keep_unit_grads,
                       scaled_grads, weighted_total)

# Default byte budget of the one logits buffer. With Llama-3 (V = 128256, bf16) this is C = 384 rows, so the whole
# op stays within 128 MiB of the returned gradients. The price: the dW GEMM has inner dimension C, which leaves it
# memory-bound on an H100 (~190 flop/byte against a ~295 ridge), and dW is accumulated in its own dtype (bf16 for
# bf16 weights, as Liger does: one rounding per chunk, ~1% relative error at N = 32768 vs ~0.2% for one rounding).
# Larger ``chunk_size`` trades memory for both; a GPU run of ``python -m benchmarks.bench_losses`` is what should
# set this (benchmarks/results/README.md lists what has been measured).
DEFAULT_CHUNK_BYTES = 96 * 2**20


@dataclass(frozen=True)
class _Opts:
    topk: int
    lam: float
    ignore_index: int
    impl: str
    chunk_size: int | None
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def use_topk(self) -> bool:
        return self.topk > 0 and self.lam > 0


def _rows_module(impl: str):
    if impl == "triton":
        from . import triton_rows  # imported lazily: the torch path must work where triton cannot import

        return triton_rows
    return torch_rows


def _chunk_rows(n: int, vocab: int, dtype: torch.dtype, chunk_size: int | None) -> int:
    return chunk_rows(n, vocab, dtype, chunk_size, DEFAULT_CHUNK_BYTES)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and statistics are float32, or float64 for float64 inputs (the torch path's exactness checks)."""
    return torch.promote_types(dtype, torch.float32)


def _forward(hidden, weight, bias, labels, o: _Opts, *, token_weights=None, save_stats=False,
             need_dh=False, need_dw=False, need_db=False):
    """One streaming pass. With ``token_weights`` it also returns dL/dhidden, dL/dweight and dL/dbias for
    L = sum w_i s_i."""
    n, vocab = hidden.shape[0], weight.shape[0]
    if o.impl == "torch":
        rows = _chunk_rows(n, vocab, torch_path.gemm_dtype(hidden.dtype, hidden.device), o.chunk_size)
        return torch_path.forward(hidden, weight, bias, labels, o, rows, token_weights=token_weights,
                                  save_stats=save_stats, need_dh=need_dh, need_dw=need_dw, need_db=need_db)
    rows_mod = _rows_module(o.impl)
    rows = _chunk_rows(n, vocab, hidden.dtype, o.chunk_size)
    buf = torch.empty(rows, vocab, device=hidden.device, dtype=hidden.dtype)
    acc = _acc_dtype(hidden.dtype)
    scores = torch.empty(n, device=hidden.device, dtype=acc)
    lse = torch.empty(n, device=hidden.device, dtype=acc) if save_stats else None
    topi = (torch.empty(n, o.topk, device=hidden.device, dtype=torch.int32)
            if save_stats and o.use_topk else None)
    topq = torch.empty(n, o.topk, device=hidden.device, dtype=acc) if topi is not None else None
    fused = token_weights is not None
    dh = torch.empty_like(hidden) if fused and need_dh else None
    dw = torch.zeros_like(weight) if fused and need_dw else None
    db = torch.zeros(vocab, device=hidden.device, dtype=acc) if fused and need_db and bias is not None else None
    for c0, c1 in chunks(n, rows):
        h, z = hidden[c0:c1], buf[: c1 - c0]
        head_logits(h, weight, bias, z)
        s, l, ti, tq = rows_mod.scores_rows(
            z, labels[c0:c1], topk=o.topk, lam=o.lam, ignore_index=o.ignore_index,
            grad=token_weights[c0:c1] if fused else None, save_stats=save_stats, logit_scale=o.logit_scale,
            softcap=o.softcap)
        scores[c0:c1] = s
        if save_stats:
            lse[c0:c1] = l
            if topi is not None:
                topi[c0:c1], topq[c0:c1] = ti, tq
        add_head_grads(z, h, weight, None if dh is None else dh[c0:c1], dw, db, acc)
    return scores, (lse, topi, topq), dh, dw, None if db is None else db.to(bias.dtype)


def _backward_from_stats(hidden, weight, bias, labels, grad, stats, o: _Opts, need_dh: bool, need_dw: bool,
                         need_db: bool):
    """Recompute each logits chunk, overwrite it with dL/dz from the saved statistics, and apply two GEMMs."""
    n, vocab = hidden.shape[0], weight.shape[0]
    if o.impl == "torch":
        rows = _chunk_rows(n, vocab, torch_path.gemm_dtype(hidden.dtype, hidden.device), o.chunk_size)
        return torch_path.backward_from_stats(hidden, weight, bias, labels, grad, stats, o, rows, need_dh, need_dw,
                                              need_db)
    rows_mod = _rows_module(o.impl)
    lse, topi, topq = stats
    rows = _chunk_rows(n, vocab, hidden.dtype, o.chunk_size)
    buf = torch.empty(rows, vocab, device=hidden.device, dtype=hidden.dtype)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    acc = _acc_dtype(hidden.dtype)
    db = torch.zeros(vocab, device=hidden.device, dtype=acc) if need_db and bias is not None else None
    grad = grad.to(acc).contiguous()
    for c0, c1 in chunks(n, rows):
        h, z = hidden[c0:c1], buf[: c1 - c0]
        head_logits(h, weight, bias, z)
        rows_mod.grad_rows_from_stats(
            z, labels[c0:c1], grad[c0:c1], lse[c0:c1],
            None if topi is None else topi[c0:c1], None if topq is None else topq[c0:c1],
            lam=o.lam, ignore_index=o.ignore_index, logit_scale=o.logit_scale, softcap=o.softcap)
        add_head_grads(z, h, weight, None if dh is None else dh[c0:c1], dw, db, acc)
    return dh, dw, None if db is None else db.to(bias.dtype)


class _TokenScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, o: _Opts):
        need = any(ctx.needs_input_grad[:3])
        scores, stats, _, _, _ = _forward(hidden, weight, bias, labels, o, save_stats=need)
        ctx.o = o
        if need:
            ctx.save_for_backward(hidden, weight, bias, labels, *stats)
        return scores

    @staticmethod
    def backward(ctx, grad_scores):
        hidden, weight, bias, labels, *stats = ctx.saved_tensors
        dh, dw, db = _backward_from_stats(hidden, weight, bias, labels, grad_scores, stats, ctx.o,
                                          *ctx.needs_input_grad[:3])
        return dh, dw, db, None, None


class _WeightedScoreSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weights, o: _Opts):
        w = token_weights.detach().to(_acc_dtype(hidden.dtype)).contiguous()
        scores, _, dh, dw, db = _forward(hidden, weight, bias, labels, o, token_weights=w,
                                         need_dh=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1],
                                         need_db=ctx.needs_input_grad[2])
        loss = weighted_total(w, scores)
        keep_unit_grads(ctx, dh, dw, db)
        ctx.mark_non_differentiable(scores)
        return loss, scores

    @staticmethod
    def backward(ctx, grad_loss, _grad_scores):
        return (*scaled_grads(ctx, grad_loss, "linear_weighted_score_sum"), None, None, None)


def _prepare(hidden, weight, labels, topk, lam, ignore_index, impl, bias, logit_scale, softcap, chunk_size,
             token_weights=None):
    check_options(topk=topk, lam=lam, ignore_index=ignore_index, impl=impl,
                  vocab=weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None)
    check_tensors(hidden, weight, labels, impl=impl, ignore_index=ignore_index, token_weights=token_weights)
    check_head(logit_scale=logit_scale, softcap=softcap, bias=bias, weight=weight)
    check_chunk_size(chunk_size)  # before any work
    o = _Opts(topk, float(lam), ignore_index, impl, chunk_size, float(logit_scale),
              None if softcap is None else float(softcap))
    return hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), labels.contiguous(), o


def linear_token_scores(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, topk: int = 0,
                        lam: float = 0.0, ignore_index: int = IGNORE_INDEX, impl: str = "triton",
                        chunk_size: int | None = None, bias: torch.Tensor | None = None, logit_scale: float = 1.0,
                        softcap: float | None = None) -> torch.Tensor:
    """Per-token scores ``s_i = <t_i, log softmax(z_i)>`` as float32 [N] (float64 for float64 inputs), z_i the
    head's logits ``h_i W^T`` (or their transform, below), without materialising the [N, V] logits.

    Args:
        hidden: [N, D] final hidden states (fp32 / bf16 / fp16; fp64 with ``impl="torch"``).
        weight: [V, D] lm_head weight, same dtype and device as ``hidden``.
        labels: [N] int64/int32 target ids; ``ignore_index`` rows score 0 and get no gradient.
        topk: size k of the belief set H_k (0 allowed only with ``lam == 0``).
        lam: mass lambda in [0, 1] moved from the label onto the model's top-k beliefs; 0 gives log p(y).
        impl: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"torch"`` (plain PyTorch, chunked).
        chunk_size: rows per logits chunk; default fits a ~96 MiB buffer.
        bias: optional [V] head bias (same dtype and device as ``weight``), added to ``h W^T``.
        logit_scale: s > 0 multiplying the logits (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``).
        softcap: c > 0 for ``z = c tanh(s x / c)`` (Gemma-2's ``final_logit_softcapping``), or None.

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` for any upstream gradient. When the upstream gradient
    is a weight known now (a weighted sum of scores), ``linear_weighted_score_sum`` saves one GEMM.
    """
    hidden, weight, bias, labels, o = _prepare(hidden, weight, labels, topk, lam, ignore_index, impl, bias,
                                               logit_scale, softcap, chunk_size)
    return _TokenScores.apply(hidden, weight, bias, labels, o)


def linear_weighted_score_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              token_weights: torch.Tensor, *, topk: int = 0, lam: float = 0.0,
                              ignore_index: int = IGNORE_INDEX, impl: str = "triton",
                              chunk_size: int | None = None, bias: torch.Tensor | None = None,
                              logit_scale: float = 1.0,
                              softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i w_i s_i, s.detach())`` with gradients computed in the forward pass: three GEMMs in all.

    ``token_weights`` [N] are treated as constants (detached). The backward only rescales the stored gradients,
    in place, so it supports one backward pass per forward. Same arguments as ``linear_token_scores`` otherwise.
    """
    hidden, weight, bias, labels, o = _prepare(hidden, weight, labels, topk, lam, ignore_index, impl, bias,
                                               logit_scale, softcap, chunk_size, token_weights)
    return _WeightedScoreSum.apply(hidden, weight, bias, labels, token_weights, o)
