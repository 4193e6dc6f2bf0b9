"""Fused teacher KL / soft-target cross-entropy between two lm_heads, never holding the [N, V] logits of either.

The second primitive of ``bs_kernels`` (the first is ``token_scores.py``): per token i, with a student
``(hidden [N, D], weight [V, D])`` and a frozen teacher ``(teacher_hidden [N, D_t], teacher_weight [V, D_t])`` that
share the vocabulary V but may differ in width,

    b_i = h_i W^T / T                      student logits at temperature T;        p_s = softmax(b_i)
    a_i = (h_t,i W_t^T - gamma e_{y_i}) / T  teacher logits, the label's lowered by gamma (UNDIAL); p_t = softmax(a_i)
    kind="kl":  KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)  = <p_t, a - b> + lse(b) - lse(a)
    kind="ce":  -sum_v p_t log p_s                              = lse(b) - <p_t, b>
    d value_i / d z_s,i = (p_s - p_t) / T  for both kinds (p_t sums to one and carries no gradient).

Either head may be transformed (``head.py``: a bias, a logit scale, soft-capping; the teacher's own options carry the
``teacher_`` prefix): b and a are then built from the transformed logits, and the student's gradient carries the chain
factor of its transform, ``s (1 - (z_s / c)^2)``.

Rows whose label is ``ignore_index`` give 0 and no gradient; ``labels=None`` scores every row (then gamma must be 0).
The KL form above is exact when student and teacher agree (0, not the difference of two rounded entropies), which
matters for a retain term that starts at zero.

Anatomy, as ``token_scores.py``: N is streamed in chunks of C rows; per chunk two GEMMs fill one reused [C, V]
buffer per side (student and teacher: two buffers, together within ``DEFAULT_CHUNK_BYTES``), a row operation
(Triton in ``triton_teacher_kl.py``, or the plain PyTorch ``kl_rows`` below) reduces each row pair and, when a
gradient is needed, overwrites the student buffer with dL/dz_s; two more GEMMs give dL/dhidden and dL/dweight.

* ``linear_weighted_teacher_kl_sum``: the upstream gradient of every token is a weight known now (a retain term, a
  distillation loss), so the gradients are produced during the forward: 4 GEMMs in all (3 student-sized, 1 teacher).
* ``linear_teacher_kl``: any upstream gradient; the forward saves two log-sum-exps per row (O(N)) and the backward
  recomputes both logits chunks: 6 GEMMs in all.

Memory beyond the inputs and the returned gradients: the two [C, V] buffers (plus, on the PyTorch path, a few
transient [C, V] float32 temporaries of the row operation) and O(N); never O(N V). The teacher gets no gradient
(its tensors are detached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import IGNORE_INDEX, check_head, check_teacher_options, check_teacher_tensors
from ._chunked import (add_head_grads, check_chunk_size, chunk_rows, chunks, head_logits, keep_unit_grads,
                       scaled_grads, weighted_total)
from .torch_rows import _transform_, cap_grad

# Byte budget of the two logits buffers together (student + teacher). Ours: the same 96 MiB as token_scores.py's
# single buffer, so swapping a CE retain term for a KL one does not raise the loss's memory; at Llama-3 (V = 128256,
# bf16) this is C = 192 rows per side. Untuned on hardware (the GPU benchmark owes it).
DEFAULT_CHUNK_BYTES = 96 * 2**20


@dataclass(frozen=True)
class _Opts:
    kind: str
    gamma: float
    temperature: float
    ignore_index: int
    impl: str
    chunk_size: int | None
    logit_scale: float = 1.0
    softcap: float | None = None
    teacher_logit_scale: float = 1.0
    teacher_softcap: float | None = None

    def heads(self) -> dict:
        """The transform options of both heads, as the row operations take them."""
        return {"logit_scale": self.logit_scale, "softcap": self.softcap,
                "teacher_logit_scale": self.teacher_logit_scale, "teacher_softcap": self.teacher_softcap}


# ---- the PyTorch row operations (the CPU path, and the reference the Triton kernels are held to) -------------------


def _active(labels: torch.Tensor | None, ignore_index: int, rows: int, vocab: int, device):
    """(active rows, labels clamped into range, rows with an out-of-range label); all-active without labels."""
    if labels is None:
        ones = torch.ones(rows, dtype=torch.bool, device=device)
        return ones, None, ~ones
    active = labels != ignore_index
    bad = active & ((labels < 0) | (labels >= vocab))
    y = torch.where(active & ~bad, labels, torch.zeros_like(labels)).long()
    return active, y, bad


def _acc(z: torch.Tensor) -> torch.Tensor:
    """``z`` in float32 (float64 stays float64); aliases ``z`` when it already is, so later in-place ops use it."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    return z if z.dtype == dtype else z.to(dtype)


def _adjust_and_temper(a, y, active, gamma: float, inv_temp: float):
    """In place: the teacher's label logit lowered by gamma (active rows), then every logit times 1 / T."""
    if gamma and y is not None:
        a.scatter_add_(1, y[:, None], torch.where(active, -gamma, 0.0).to(a.dtype)[:, None])
    return a.mul_(inv_temp) if inv_temp != 1.0 else a


def _log_softmax_(x: torch.Tensor, want_probs: bool):
    """In place ``x <- log softmax(x)``; returns ``(lse [C], softmax(x) as a new tensor | None)``.

    Spelled out rather than ``torch.logsumexp`` + ``exp`` so that one exp pass serves both the sum and the
    probabilities: passes over the chunk are what the CPU path's time goes to."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row must not turn x - m into NaN
    e = x.sub_(m).exp()
    s = e.sum(-1, keepdim=True)
    log_s = s.log()
    x.sub_(log_s)
    return (m + log_s).squeeze(1), (e.div_(s) if want_probs else None)


def _row_grad(active, bad, grad, dtype, inv_temp: float):
    g = torch.where(active, grad.to(dtype), torch.zeros((), dtype=dtype, device=grad.device))
    return torch.where(bad, torch.full_like(g, float("nan")), g) * inv_temp  # a bad label poisons its gradient too


def _store(zs: torch.Tensor, dz: torch.Tensor) -> None:
    if dz.data_ptr() != zs.data_ptr():
        zs.copy_(dz)


def _head_(x: torch.Tensor, logit_scale: float, softcap: float | None) -> torch.Tensor:
    _transform_(x, logit_scale, softcap)
    return x


def kl_rows(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None, *, kind: str, gamma: float,
            inv_temp: float, ignore_index: int, grad: torch.Tensor | None = None, save_stats: bool = False,
            logit_scale: float = 1.0, softcap: float | None = None, teacher_logit_scale: float = 1.0,
            teacher_softcap: float | None = None):
    """Per-row KL or soft-target CE of a student chunk ``zs`` [C, V] against a teacher chunk ``zt`` [C, V] (raw
    logits of either head, transformed here).

    Both chunks are scratch: their contents afterwards are unspecified, except that with ``grad`` [C] ``zs`` holds
    ``grad[:, None] * (p_s - p_t) / T * dz_s/dx_s`` (zero on ignored rows). Returns ``(values [C], lse_s [C] | None,
    lse_t [C] | None)`` in float32 (float64 for float64 chunks); the log-sum-exps (of the tempered, adjusted logits)
    are what ``kl_grad_rows_from_stats`` needs. Ignored rows keep their true log-sum-exps, so that the backward
    computes exp(z - lse) <= 1 times a zero gradient on them, never inf * 0.
    """
    active, y, bad = _active(labels, ignore_index, zs.shape[0], zs.shape[1], zs.device)
    logp_s = _head_(_acc(zs), logit_scale, softcap)
    chain = cap_grad(logp_s, softcap) if grad is not None and softcap is not None else 1.0
    if inv_temp != 1.0:
        logp_s.mul_(inv_temp)
    lse_s, _ = _log_softmax_(logp_s, want_probs=False)
    logp_t = _adjust_and_temper(_head_(_acc(zt), teacher_logit_scale, teacher_softcap), y, active, gamma, inv_temp)
    lse_t, p_t = _log_softmax_(logp_t, want_probs=True)
    inner = logp_t.sub_(logp_s) if kind == "kl" else torch.neg(logp_s, out=logp_t)  # reuses log p_t's buffer
    # nansum drops 0 * (-inf) = NaN (0 log 0 = 0 at a -inf teacher logit); adding 0 * lse keeps a NaN or inf input
    # row NaN, as it should be.
    value = inner.mul_(p_t).nansum(-1) + 0.0 * (lse_s + lse_t)
    value = torch.where(active, value, torch.zeros_like(value))
    value = torch.where(bad, torch.full_like(value, float("nan")), value)
    if grad is not None:
        g = _row_grad(active, bad, grad, p_t.dtype, inv_temp * logit_scale)
        _store(zs, logp_s.exp_().sub_(p_t).mul_(g[:, None]).mul_(chain))
    if not save_stats:
        return value, None, None
    return value, lse_s, lse_t


def kl_grad_rows_from_stats(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None, grad: torch.Tensor,
                            lse_s: torch.Tensor, lse_t: torch.Tensor, *, gamma: float, inv_temp: float,
                            ignore_index: int, logit_scale: float = 1.0, softcap: float | None = None,
                            teacher_logit_scale: float = 1.0, teacher_softcap: float | None = None) -> None:
    """Overwrite recomputed raw logits ``zs`` with dL/dx_s (``kl_rows``' contract) from the saved log-sum-exps."""
    active, y, bad = _active(labels, ignore_index, zs.shape[0], zs.shape[1], zs.device)
    p_t = _adjust_and_temper(_head_(_acc(zt), teacher_logit_scale, teacher_softcap), y, active, gamma, inv_temp)
    p_t = p_t.sub_(lse_t[:, None]).exp_()
    p_s = _head_(_acc(zs), logit_scale, softcap)
    chain = cap_grad(p_s, softcap) if softcap is not None else 1.0
    if inv_temp != 1.0:
        p_s.mul_(inv_temp)
    p_s = p_s.sub_(lse_s[:, None]).exp_()
    g = _row_grad(active, bad, grad, p_t.dtype, inv_temp * logit_scale)
    _store(zs, p_s.sub_(p_t).mul_(g[:, None]).mul_(chain))


# ---- the chunked driver -------------------------------------------------------------------------------------------


def _rows_module(impl: str):
    if impl == "triton":
        from . import triton_teacher_kl  # lazily: the torch path must work where triton cannot import

        return triton_teacher_kl
    return _TorchRows


class _TorchRows:
    kl_rows = staticmethod(kl_rows)
    kl_grad_rows_from_stats = staticmethod(kl_grad_rows_from_stats)


def _buffers(hidden, weight, o: _Opts):
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = chunk_rows(n, vocab, hidden.dtype, o.chunk_size, DEFAULT_CHUNK_BYTES // 2)  # two buffers
    zs = torch.empty(rows, vocab, device=hidden.device, dtype=hidden.dtype)
    zt = torch.empty(rows, vocab, device=hidden.device, dtype=hidden.dtype)
    return rows, zs, zt


def _forward(hidden, weight, bias, t_hidden, t_weight, t_bias, labels, o: _Opts, *, token_weights=None,
             save_stats=False, need_dh=False, need_dw=False, need_db=False):
    """One streaming pass. With ``token_weights`` it also returns dL/dhidden, dL/dweight, dL/dbias of
    L = sum w_i value_i."""
    rows_mod = _rows_module(o.impl)
    n = hidden.shape[0]
    rows, zs_buf, zt_buf = _buffers(hidden, weight, o)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    values = torch.empty(n, device=hidden.device, dtype=acc)
    lse_s = torch.empty(n, device=hidden.device, dtype=acc) if save_stats else None
    lse_t = torch.empty(n, device=hidden.device, dtype=acc) if save_stats else None
    fused = token_weights is not None
    dh = torch.empty_like(hidden) if fused and need_dh else None
    dw = torch.zeros_like(weight) if fused and need_dw else None
    db = torch.zeros(weight.shape[0], device=hidden.device, dtype=acc) if fused and need_db and bias is not None \
        else None
    for c0, c1 in chunks(n, rows):
        h, zs, zt = hidden[c0:c1], zs_buf[: c1 - c0], zt_buf[: c1 - c0]
        head_logits(h, weight, bias, zs)
        head_logits(t_hidden[c0:c1], t_weight, t_bias, zt)
        v, ls, lt = rows_mod.kl_rows(
            zs, zt, None if labels is None else labels[c0:c1], kind=o.kind, gamma=o.gamma,
            inv_temp=1.0 / o.temperature, ignore_index=o.ignore_index,
            grad=token_weights[c0:c1] if fused else None, save_stats=save_stats, **o.heads())
        values[c0:c1] = v
        if save_stats:
            lse_s[c0:c1], lse_t[c0:c1] = ls, lt
        add_head_grads(zs, h, weight, None if dh is None else dh[c0:c1], dw, db, acc)
    return values, (lse_s, lse_t), dh, dw, None if db is None else db.to(bias.dtype)


def _backward_from_stats(hidden, weight, bias, t_hidden, t_weight, t_bias, labels, grad, lse_s, lse_t, o: _Opts,
                         need_dh: bool, need_dw: bool, need_db: bool):
    """Recompute both logits chunks, overwrite the student's with dL/dz_s, and apply two GEMMs."""
    rows_mod = _rows_module(o.impl)
    n = hidden.shape[0]
    rows, zs_buf, zt_buf = _buffers(hidden, weight, o)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    db = torch.zeros(weight.shape[0], device=hidden.device, dtype=lse_s.dtype) if need_db and bias is not None \
        else None
    grad = grad.to(lse_s.dtype).contiguous()
    for c0, c1 in chunks(n, rows):
        h, zs, zt = hidden[c0:c1], zs_buf[: c1 - c0], zt_buf[: c1 - c0]
        head_logits(h, weight, bias, zs)
        head_logits(t_hidden[c0:c1], t_weight, t_bias, zt)
        rows_mod.kl_grad_rows_from_stats(
            zs, zt, None if labels is None else labels[c0:c1], grad[c0:c1], lse_s[c0:c1], lse_t[c0:c1],
            gamma=o.gamma, inv_temp=1.0 / o.temperature, ignore_index=o.ignore_index, **o.heads())
        add_head_grads(zs, h, weight, None if dh is None else dh[c0:c1], dw, db, lse_s.dtype)
    return dh, dw, None if db is None else db.to(bias.dtype)


class _TeacherKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, labels, o: _Opts):
        need = any(ctx.needs_input_grad[:3])
        values, (lse_s, lse_t), _, _, _ = _forward(hidden, weight, bias, t_hidden, t_weight, t_bias, labels, o,
                                                   save_stats=need)
        ctx.o = o
        if need:
            ctx.save_for_backward(hidden, weight, bias, t_hidden, t_weight, t_bias, labels, lse_s, lse_t)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        hidden, weight, bias, t_hidden, t_weight, t_bias, labels, lse_s, lse_t = ctx.saved_tensors
        dh, dw, db = _backward_from_stats(hidden, weight, bias, t_hidden, t_weight, t_bias, labels, grad_values,
                                          lse_s, lse_t, ctx.o, *ctx.needs_input_grad[:3])
        return dh, dw, db, None, None, None, None, None


class _WeightedTeacherKLSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, labels, token_weights, o: _Opts):
        w = token_weights.detach().to(torch.promote_types(hidden.dtype, torch.float32)).contiguous()
        values, _, dh, dw, db = _forward(hidden, weight, bias, t_hidden, t_weight, t_bias, labels, o,
                                         token_weights=w, need_dh=ctx.needs_input_grad[0],
                                         need_dw=ctx.needs_input_grad[1], need_db=ctx.needs_input_grad[2])
        loss = weighted_total(w, values)
        keep_unit_grads(ctx, dh, dw, db)
        ctx.mark_non_differentiable(values)
        return loss, values

    @staticmethod
    def backward(ctx, grad_loss, _grad_values):
        return (*scaled_grads(ctx, grad_loss, "linear_weighted_teacher_kl_sum"), None, None, None, None, None, None)


def _prepare(hidden, weight, teacher_hidden, teacher_weight, labels, kind, gamma, temperature, ignore_index, impl,
             chunk_size, heads: dict, token_weights=None):
    check_teacher_options(kind=kind, gamma=gamma, temperature=temperature, ignore_index=ignore_index, impl=impl,
                          has_labels=labels is not None)
    check_teacher_tensors(hidden, weight, teacher_hidden, teacher_weight, labels, impl=impl,
                          ignore_index=ignore_index, token_weights=token_weights)
    for prefix, w in (("", weight), ("teacher_", teacher_weight)):
        check_head(logit_scale=heads[f"{prefix}logit_scale"], softcap=heads[f"{prefix}softcap"],
                   bias=heads[f"{prefix}bias"], weight=w, prefix=prefix)
    check_chunk_size(chunk_size)  # before any work
    cap = (lambda c: None if c is None else float(c))
    o = _Opts(kind, float(gamma), float(temperature), ignore_index, impl, chunk_size, float(heads["logit_scale"]),
              cap(heads["softcap"]), float(heads["teacher_logit_scale"]), cap(heads["teacher_softcap"]))
    bias, t_bias = heads["bias"], heads["teacher_bias"]
    tensors = (hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
               teacher_hidden.detach().contiguous(), teacher_weight.detach().contiguous(),
               None if t_bias is None else t_bias.detach().contiguous(),
               None if labels is None else labels.contiguous())
    return tensors, o


def linear_teacher_kl(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, labels: torch.Tensor | None = None, *, kind: str = "kl",
                      gamma: float = 0.0, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                      impl: str = "triton", chunk_size: int | None = None, bias: torch.Tensor | None = None,
                      logit_scale: float = 1.0, softcap: float | None = None,
                      teacher_bias: torch.Tensor | None = None, teacher_logit_scale: float = 1.0,
                      teacher_softcap: float | None = None) -> torch.Tensor:
    """Per-token ``KL(p_t || p_s)`` (``kind="kl"``) or soft-target CE ``-sum p_t log p_s`` (``kind="ce"``), float32 [N]
    (float64 for float64 inputs), without materialising the [N, V] logits of the student or the teacher.

    Args:
        hidden: [N, D] student hidden states (fp32 / bf16 / fp16; fp64 with ``impl="torch"``).
        weight: [V, D] student lm_head weight, same dtype and device as ``hidden``.
        teacher_hidden: [N, D_t] teacher hidden states (same dtype and device; D_t may differ from D).
        teacher_weight: [V, D_t] teacher lm_head weight (same V). The teacher is detached: it gets no gradient.
        labels: optional [N] int64/int32 ids; rows equal to ``ignore_index`` give 0 and no gradient, and ``gamma``
            is subtracted from the teacher's logit at the label. ``None`` scores every row.
        gamma: UNDIAL's adjustment ``z_t[y] -= gamma`` (0: none; needs ``labels`` otherwise).
        temperature: both heads' logits are divided by it (after the adjustment); the gradient carries the 1/T,
            and no T^2 factor is applied (multiply the loss yourself for Hinton-style distillation).
        impl: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"torch"`` (plain PyTorch, chunked).
        chunk_size: rows per chunk; default fits both [C, V] buffers in ~96 MiB.
        bias: optional [V] student head bias (``linear_token_scores``; ``bs_kernels.head``).
        logit_scale: s > 0 multiplying the student's logits.
        softcap: c > 0 soft-capping the student's logits, or None.
        teacher_bias: optional [V] teacher head bias.
        teacher_logit_scale: s > 0 multiplying the teacher's logits.
        teacher_softcap: c > 0 soft-capping the teacher's logits, or None.

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` for any upstream gradient. When the upstream gradient
    is a weight known now, ``linear_weighted_teacher_kl_sum`` saves two GEMMs.
    """
    heads = {"bias": bias, "logit_scale": logit_scale, "softcap": softcap, "teacher_bias": teacher_bias,
             "teacher_logit_scale": teacher_logit_scale, "teacher_softcap": teacher_softcap}
    tensors, o = _prepare(hidden, weight, teacher_hidden, teacher_weight, labels, kind, gamma, temperature,
                          ignore_index, impl, chunk_size, heads)
    return _TeacherKL.apply(*tensors, o)


def linear_weighted_teacher_kl_sum(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                                   teacher_weight: torch.Tensor, token_weights: torch.Tensor,
                                   labels: torch.Tensor | None = None, *, kind: str = "kl", gamma: float = 0.0,
                                   temperature: float = 1.0, ignore_index: int = IGNORE_INDEX, impl: str = "triton",
                                   chunk_size: int | None = None, bias: torch.Tensor | None = None,
                                   logit_scale: float = 1.0, softcap: float | None = None,
                                   teacher_bias: torch.Tensor | None = None, teacher_logit_scale: float = 1.0,
                                   teacher_softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i w_i value_i, value.detach())`` with the gradients computed in the forward pass: four GEMMs in all.

    ``token_weights`` [N] are constants (detached); the backward only rescales the stored gradients, in place, so it
    supports one backward pass per forward. Same arguments as ``linear_teacher_kl`` otherwise.
    """
    heads = {"bias": bias, "logit_scale": logit_scale, "softcap": softcap, "teacher_bias": teacher_bias,
             "teacher_logit_scale": teacher_logit_scale, "teacher_softcap": teacher_softcap}
    tensors, o = _prepare(hidden, weight, teacher_hidden, teacher_weight, labels, kind, gamma, temperature,
                          ignore_index, impl, chunk_size, heads, token_weights)
    return _WeightedTeacherKLSum.apply(*tensors, token_weights, o)
