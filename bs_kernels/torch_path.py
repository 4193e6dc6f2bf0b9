"""The chunked driver of ``impl="torch"``: three (or four) GEMMs around the in-place row ops of ``torch_rows``.

Per chunk of C rows: one GEMM fills the reused [C, V] buffer with logits, ``torch_rows.rows_forward`` turns it into
``p - t`` in place (O(C k) temporaries), and the gradients take it from there with the scale ``-g`` folded into
the small operands, so no pass over [C, V] is spent on it:

    dL/dh_c  = -g * ((p - t) @ W)          ([C, D] result scaled row-wise after the GEMM)
    dL/dW   += (p - t)^T @ (-g * h_c)      ([C, D] operand scaled before the GEMM, accumulated with addmm_)
    dL/db   += (p - t)^T @ (-g)            (a head bias: one GEMV, accumulated in float32)

A transformed head (``head.py``) adds its bias in the logits GEMM (``addmm``), leaves the chain factor of its cap in
the chunk (``torch_rows``) and its scale s in -g, which becomes -g s.

That folding is free of error only in a float32 / float64 GEMM. In a bf16 / fp16 GEMM every scaled hidden element
would be rounded once more, and where dW's sums cancel that shows: at logits of magnitude 1e4 single dW entries came
out 6% off where PyTorch's own bf16 is 0.4% off (found by Liger's tests run against ours). There the chunk is scaled
instead, z <- -g (p - t) computed in float32 and rounded once, as PyTorch's own backward rounds its dL/dz, and the
two GEMMs take it unscaled: one pass over [C, V] more, in the dtypes where it buys precision
(tests/test_unlearning.py).

GEMM dtype. bf16 / fp16 inputs run their GEMMs natively on CUDA and on CPUs with bf16 (fp16) matrix instructions
(``avx512_bf16`` / ``amx_bf16``, ``avx512_fp16`` / ``amx_fp16``). Elsewhere the CPU libraries emulate them: on this
project's AVX2 machine a bf16 [256, 576] x [576, 8192] GEMM took 0.55-6.8 s depending on operand layout against
0.04 s in float32 (measured 2026-12-01). There the driver converts the weight to float32 once per call, each
hidden chunk as it goes, accumulates dL/dW in float32, and returns gradients in the input dtype; that costs
2 V D float32 (the weight copy and the accumulator, 226 MB at the SmolLM2 head) on top of the [C, V] buffer.
"""

from __future__ import annotations

import functools

import torch

from . import torch_rows
from ._chunked import chunks


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty elsewhere: then no low-precision GEMM is assumed native)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


_NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the torch path runs its GEMMs (and so its logits buffer) in for inputs of ``dtype``."""
    if device.type != "cpu" or dtype not in _NATIVE_FLAGS:
        return dtype
    return dtype if any(f in _cpu_flags() for f in _NATIVE_FLAGS[dtype]) else torch.float32


def _neg_g(g: torch.Tensor, labels: torch.Tensor, ignore_index: int, vocab: int, dtype: torch.dtype,
           logit_scale: float = 1.0):
    """-g s as a [C, 1] column in the GEMM dtype (float32 for a bf16 / fp16 one: it then scales the chunk itself);
    NaN for an out-of-range label (it poisons its gradients)."""
    _, _, bad = torch_rows._targets(labels, ignore_index, vocab)
    g = torch.where(bad, torch.full_like(g, float("nan")), g)
    return (-g * logit_scale).to(torch.promote_types(dtype, torch.float32))[:, None]


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _apply_grads(z, hg, w, neg, dh, dw, db=None):
    """dh <- neg * (z @ w), dw += z^T (neg * hg) and db += z^T neg, with z = p - t; dh may be in a wider dtype than
    z's. In a bf16 / fp16 GEMM, z itself is scaled first (module docstring): ``neg`` is then float32, so the product is
    rounded once."""
    if z.dtype in _LOW_PRECISION:
        z.mul_(neg)
        neg = None
    if dh is not None:
        if dh.dtype == z.dtype:
            out = torch.mm(z, w, out=dh)
        else:
            out = torch.mm(z, w)
        if neg is not None:
            out.mul_(neg)
        if out is not dh:
            dh.copy_(out)
    if dw is not None:
        dw.addmm_(z.t(), hg if neg is None else hg * neg)
    if db is not None:
        db.add_(z.sum(0, dtype=db.dtype) if neg is None else torch.mm(z.t(), neg).squeeze(1).to(db.dtype))


class _Setup:
    """What both passes share: the GEMM dtype, the weight (and bias) in it, the buffer, the dW (and dB)
    accumulators."""

    def __init__(self, hidden, weight, bias, rows, need_dw, need_db=False):
        self.gd = gemm_dtype(hidden.dtype, hidden.device)
        self.w = weight if weight.dtype == self.gd else weight.to(self.gd)
        self.b = None if bias is None else bias.to(self.gd)
        self.buf = torch.empty(rows, weight.shape[0], device=hidden.device, dtype=self.gd)
        self.dw = self.dw_acc = None
        if need_dw:
            self.dw = torch.zeros_like(weight)
            self.dw_acc = self.dw if self.gd == weight.dtype else torch.zeros_like(self.w)
        acc = torch.promote_types(self.gd, torch.float32)
        need_db = need_db and bias is not None
        self.db = torch.zeros(weight.shape[0], device=hidden.device, dtype=acc) if need_db else None

    def h(self, hidden, c0, c1):
        h = hidden[c0:c1]
        return h if h.dtype == self.gd else h.to(self.gd)

    def logits(self, h, z):
        """z <- h W^T (+ b): the chunk's raw logits."""
        if self.b is None:
            torch.mm(h, self.w.t(), out=z)
        else:
            torch.addmm(self.b, h, self.w.t(), out=z)

    def finish(self, bias):
        if self.dw is not None and self.dw_acc is not self.dw:
            self.dw.copy_(self.dw_acc)
        return self.dw, None if self.db is None else self.db.to(bias.dtype)


def forward(hidden, weight, bias, labels, o, rows: int, *, token_weights=None, save_stats=False,
            need_dh=False, need_dw=False, need_db=False):
    """``token_scores._forward`` for ``impl="torch"``: scores, saved statistics, and (fused) dL/dh, dL/dW, dL/db."""
    n, vocab = hidden.shape[0], weight.shape[0]
    fused = token_weights is not None
    st = _Setup(hidden, weight, bias, rows, fused and need_dw, fused and need_db)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    scores = torch.empty(n, device=hidden.device, dtype=acc)
    lse = torch.empty(n, device=hidden.device, dtype=acc) if save_stats else None
    topi = (torch.empty(n, o.topk, device=hidden.device, dtype=torch.int32)
            if save_stats and o.use_topk else None)
    topq = torch.empty(n, o.topk, device=hidden.device, dtype=acc) if topi is not None else None
    dh = torch.empty_like(hidden) if fused and need_dh else None
    for c0, c1 in chunks(n, rows):
        h, z = st.h(hidden, c0, c1), st.buf[: c1 - c0]
        st.logits(h, z)
        s, l, ti, tq = torch_rows.rows_forward(z, labels[c0:c1], topk=o.topk, lam=o.lam, ignore_index=o.ignore_index,
                                               logit_scale=o.logit_scale, softcap=o.softcap)
        scores[c0:c1] = s
        if save_stats:
            lse[c0:c1] = l
            if topi is not None:
                topi[c0:c1], topq[c0:c1] = ti, tq
        if fused:
            neg = _neg_g(token_weights[c0:c1], labels[c0:c1], o.ignore_index, vocab, st.gd, o.logit_scale)
            _apply_grads(z, h, st.w, neg, None if dh is None else dh[c0:c1], st.dw_acc, st.db)
    return scores, (lse, topi, topq), dh, *st.finish(bias)


def backward_from_stats(hidden, weight, bias, labels, grad, stats, o, rows: int, need_dh: bool, need_dw: bool,
                        need_db: bool = False):
    """``token_scores._backward_from_stats`` for ``impl="torch"``: recompute each chunk, then two GEMMs."""
    lse, topi, topq = stats
    n, vocab = hidden.shape[0], weight.shape[0]
    st = _Setup(hidden, weight, bias, rows, need_dw, need_db)
    dh = torch.empty_like(hidden) if need_dh else None
    grad = grad.to(lse.dtype).contiguous()
    for c0, c1 in chunks(n, rows):
        h, z = st.h(hidden, c0, c1), st.buf[: c1 - c0]
        st.logits(h, z)
        torch_rows.rows_backward(z, labels[c0:c1], lse[c0:c1], None if topi is None else topi[c0:c1].long(),
                                 None if topq is None else topq[c0:c1], lam=o.lam, ignore_index=o.ignore_index,
                                 logit_scale=o.logit_scale, softcap=o.softcap)
        neg = _neg_g(grad[c0:c1], labels[c0:c1], o.ignore_index, vocab, st.gd, o.logit_scale)
        _apply_grads(z, h, st.w, neg, None if dh is None else dh[c0:c1], st.dw_acc, st.db)
    return (dh, *st.finish(bias))
