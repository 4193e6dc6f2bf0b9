"""Triton row kernels of the teacher KL: values, log-sum-exps and ``dL/dz_s`` of one chunk of row pairs.

The same contract as ``teacher_kl.kl_rows`` / ``kl_grad_rows_from_stats`` (read ``teacher_kl.py``'s docstring for
the formula), fused so that each row pair (student row of the [C, V] student chunk, teacher row of the teacher
chunk) is read at most twice and only the student row is written:

* pass 1 streams both rows in ``BLOCK_V`` tiles and keeps, in registers, an online log-sum-exp of the student's
  tempered logits b, and for the teacher's adjusted, tempered logits a an online max m, sum ``l = sum e^(a - m)``
  and ``x = sum e^(a - m) c`` with ``c = a - b`` (KL) or ``c = b`` (CE), all three rescaled together whenever m
  grows. Then ``<p_t, c> = x / l``, and KL = x / l + lse(b) - lse(a), CE = lse(b) - x / l.
  The label's adjustment is one ``where`` on the tile that holds it; nothing sparse is written.
* pass 2 (``WRITE_GRAD``) overwrites the student row with ``g (p_s - p_t) / T``, a dense elementwise map of the two
  rows (the teacher row is only read).

Transformed heads (``head.py``) are the same maps on every load as in ``triton_rows``: each side's scale (a runtime
float) and soft-cap (``S_CAP`` / ``T_CAP``), and the student's chain factor ``s (1 - (z_s / c)^2)`` in pass 2.

Layers, as in Liger-Kernel: ``@triton.jit`` kernels, then the Python launchers that the chunked driver calls.
Launchers never read tensor values on the host. A label outside [0, V) that is not ``ignore_index`` yields a NaN
value and NaN gradients for its row instead of an out-of-bounds read.
"""

from __future__ import annotations

import itertools
from functools import partial

import torch
import triton
import triton.language as tl

from ._checks import IGNORE_INDEX, TEACHER_KINDS, triton_interpret
from .triton_rows import _head_grad, _head_logits


@triton.jit
def _teacher_tile(zt_row, offs, mask, y, gamma, inv_temp, t_scale, t_cap, HAS_GAMMA: tl.constexpr,
                  T_CAP: tl.constexpr):
    """The teacher's adjusted, tempered logits of one tile (0 past the end of the row: the caller masks)."""
    a = _head_logits(tl.load(zt_row + offs, mask=mask, other=0.0).to(tl.float32), t_scale, t_cap, T_CAP)
    if HAS_GAMMA:
        a = tl.where(offs == y, a - gamma, a)
    return a * inv_temp


@triton.jit
def _write_grad_row(zs_row, zt_row, V, y, gamma, inv_temp, lse_s, lse_t, g, s_scale, s_cap, t_scale, t_cap,
                    BLOCK_V: tl.constexpr, HAS_GAMMA: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr):
    """Overwrite the student row with g * (p_s - p_t) * dz_s/dx_s; ``g`` already carries the 1/T."""
    # Pass 1 (or the caller) read this row; order every overwrite after all of its threads' reads.
    tl.debug_barrier()
    for start in tl.range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = _head_logits(tl.load(zs_row + offs, mask=mask, other=0.0).to(tl.float32), s_scale, s_cap, S_CAP)
        b = z * inv_temp
        a = _teacher_tile(zt_row, offs, mask, y, gamma, inv_temp, t_scale, t_cap, HAS_GAMMA, T_CAP)
        # lanes past the row's end are finite and not stored
        dz = g * (tl.exp(b - lse_s) - tl.exp(a - lse_t)) * _head_grad(z, s_scale, s_cap, S_CAP)
        tl.store(zs_row + offs, dz.to(zs_row.dtype.element_ty), mask=mask)


@triton.jit
def _zero_row(row_ptr, V, BLOCK_V: tl.constexpr):
    for start in tl.range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        tl.store(row_ptr + offs, tl.zeros([BLOCK_V], dtype=row_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _kl_kernel(
    zs_ptr, stride_s, zt_ptr, stride_t, labels_ptr, grad_ptr,
    out_ptr, lse_s_ptr, lse_t_ptr,
    V, gamma, inv_temp, ignore_index, s_scale, s_cap, t_scale, t_cap,
    BLOCK_V: tl.constexpr, KIND_KL: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_GAMMA: tl.constexpr,
    WRITE_GRAD: tl.constexpr, SAVE_STATS: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    y = -1  # never an offset: no adjustment
    ok = row >= 0  # true; a tensor, so that both HAS_LABELS variants use it the same way
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        if label == ignore_index:
            tl.store(out_ptr + row, 0.0)
            if SAVE_STATS:
                tl.store(lse_s_ptr + row, 0.0)
                tl.store(lse_t_ptr + row, 0.0)
            if WRITE_GRAD:
                _zero_row(zs_row, V, BLOCK_V)
            return
        ok = (label >= 0) & (label < V)
        y = tl.where(ok, label, -1)

    # ---- pass 1: online log-sum-exp of b; online (max, sum, <e^(a - m), c>) of a ----
    m_s = float("-inf")
    l_s = 0.0
    m_t = float("-inf")
    l_t = 0.0
    x = 0.0
    for start in tl.range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        # Loaded as 0 past the end of the row, so that c stays finite there; the reductions mask with -inf.
        b = _head_logits(tl.load(zs_row + offs, mask=mask, other=0.0).to(tl.float32), s_scale, s_cap, S_CAP) * inv_temp
        a = _teacher_tile(zt_row, offs, mask, y, gamma, inv_temp, t_scale, t_cap, HAS_GAMMA, T_CAP)
        b_in = tl.where(mask, b, float("-inf"))
        a_in = tl.where(mask, a, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(b_in, 0))
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(b_in - m_s_new), 0)
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(a_in, 0))
        scale = tl.exp(m_t - m_t_new)
        w = tl.exp(a_in - m_t_new)
        if KIND_KL:
            c = a - b
        else:
            c = b
        x = x * scale + tl.sum(tl.where(w > 0, w * c, 0.0), 0)  # 0 log 0 = 0 at a -inf teacher logit
        l_t = l_t * scale + tl.sum(w, 0)
        m_t = m_t_new
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    if KIND_KL:
        value = x / l_t + lse_s - lse_t
    else:
        value = lse_s - x / l_t
    value = tl.where(ok, value, float("nan"))
    tl.store(out_ptr + row, value)
    if SAVE_STATS:
        tl.store(lse_s_ptr + row, lse_s)
        tl.store(lse_t_ptr + row, lse_t)

    # ---- pass 2: overwrite the student row with g (p_s - p_t) / T ----
    if WRITE_GRAD:
        g = tl.load(grad_ptr + row).to(tl.float32)
        g = tl.where(ok, g, float("nan")) * inv_temp  # a bad label poisons its gradient too, not only the value
        _write_grad_row(zs_row, zt_row, V, y, gamma, inv_temp, lse_s, lse_t, g, s_scale, s_cap, t_scale, t_cap,
                        BLOCK_V, HAS_GAMMA, S_CAP, T_CAP)


@triton.jit
def _kl_grad_from_stats_kernel(
    zs_ptr, stride_s, zt_ptr, stride_t, labels_ptr, grad_ptr, lse_s_ptr, lse_t_ptr,
    V, gamma, inv_temp, ignore_index, s_scale, s_cap, t_scale, t_cap,
    BLOCK_V: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_GAMMA: tl.constexpr, S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    y = -1
    ok = row >= 0  # true; a tensor, so that both HAS_LABELS variants use it the same way
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        if label == ignore_index:
            _zero_row(zs_row, V, BLOCK_V)
            return
        ok = (label >= 0) & (label < V)
        y = tl.where(ok, label, -1)
    g = tl.where(ok, tl.load(grad_ptr + row).to(tl.float32), float("nan")) * inv_temp
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    _write_grad_row(zs_row, zt_row, V, y, gamma, inv_temp, lse_s, lse_t, g, s_scale, s_cap, t_scale, t_cap,
                    BLOCK_V, HAS_GAMMA, S_CAP, T_CAP)


# The tl.constexpr flags each launcher below can set, with the values it can give them (BLOCK_V aside: a size, not a
# switch). One place to read them, for an ahead-of-time compile of every launchable variant. HAS_GAMMA implies
# HAS_LABELS.
KL_FLAGS = {"KIND_KL": (False, True), "HAS_LABELS": (False, True), "HAS_GAMMA": (False, True),
            "WRITE_GRAD": (False, True), "SAVE_STATS": (False, True), "S_CAP": (False, True), "T_CAP": (False, True)}
KL_GRAD_FROM_STATS_FLAGS = {"HAS_LABELS": (False, True), "HAS_GAMMA": (False, True), "S_CAP": (False, True),
                            "T_CAP": (False, True)}


def _heads(logit_scale, softcap, teacher_logit_scale, teacher_softcap) -> tuple[tuple, dict]:
    """The kernels' runtime head arguments (scale, cap per side; cap 1.0 when unused) and their cap flags."""
    args = (float(logit_scale), 1.0 if softcap is None else float(softcap), float(teacher_logit_scale),
            1.0 if teacher_softcap is None else float(teacher_softcap))
    return args, {"S_CAP": softcap is not None, "T_CAP": teacher_softcap is not None}


def _block_v(vocab: int, block_v: int | None, dtype: torch.dtype = torch.bfloat16, both_capped: bool = False) -> int:
    if block_v is not None:
        return block_v
    # Interpreter: one tile per row keeps CPU tests fast. GPU: 4096 values per row and tile over 8 warps (16 per
    # thread and row, two rows live); untuned on hardware yet. At 4096 on sm_80 these spilled (tools.kernel_check): a
    # V that is not a multiple of 16 (unaligned rows: scalar loads, one 64-bit address each), fp32 logits once the
    # soft-cap arguments joined, and fp16 KL with both the student's and the teacher's soft-cap (16 B); all
    # take 2048.
    if triton_interpret():
        return triton.next_power_of_2(vocab)
    wide = vocab % 16 == 0 and torch.empty((), dtype=dtype).element_size() < 4 and not both_capped
    return min(4096 if wide else 2048, triton.next_power_of_2(vocab))


def kl_rows(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None, *, kind: str, gamma: float,
            inv_temp: float, ignore_index: int, grad: torch.Tensor | None = None, save_stats: bool = False,
            logit_scale: float = 1.0, softcap: float | None = None, teacher_logit_scale: float = 1.0,
            teacher_softcap: float | None = None, block_v: int | None = None):
    """Triton twin of ``teacher_kl.kl_rows``: same arguments and returns; ``zt`` is only read.

    Ignored rows store 0 as their log-sum-exps (the backward kernel never reads them)."""
    rows, vocab = zs.shape
    dev = zs.device
    values = torch.empty(rows, device=dev, dtype=torch.float32)
    lse_s = torch.empty(rows, device=dev, dtype=torch.float32) if save_stats else None
    lse_t = torch.empty(rows, device=dev, dtype=torch.float32) if save_stats else None
    head_args, cap_flags = _heads(logit_scale, softcap, teacher_logit_scale, teacher_softcap)
    tile = _block_v(vocab, block_v, zs.dtype, both_capped=cap_flags["S_CAP"] and cap_flags["T_CAP"])
    if rows:
        _kl_kernel[(rows,)](
            zs, zs.stride(0), zt, zt.stride(0), values if labels is None else labels,
            values if grad is None else grad, values,
            values if lse_s is None else lse_s, values if lse_t is None else lse_t,
            vocab, float(gamma), float(inv_temp), ignore_index, *head_args,
            BLOCK_V=tile, KIND_KL=kind == "kl", HAS_LABELS=labels is not None,
            HAS_GAMMA=labels is not None and gamma != 0, WRITE_GRAD=grad is not None, SAVE_STATS=save_stats,
            **cap_flags, num_warps=8,
        )
    return values, lse_s, lse_t


def kl_grad_rows_from_stats(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None, grad: torch.Tensor,
                            lse_s: torch.Tensor, lse_t: torch.Tensor, *, gamma: float, inv_temp: float,
                            ignore_index: int, logit_scale: float = 1.0, softcap: float | None = None,
                            teacher_logit_scale: float = 1.0, teacher_softcap: float | None = None,
                            block_v: int | None = None) -> None:
    """Triton twin of ``teacher_kl.kl_grad_rows_from_stats``."""
    rows, vocab = zs.shape
    head_args, cap_flags = _heads(logit_scale, softcap, teacher_logit_scale, teacher_softcap)
    tile = _block_v(vocab, block_v, zs.dtype, both_capped=cap_flags["S_CAP"] and cap_flags["T_CAP"])
    if rows:
        _kl_grad_from_stats_kernel[(rows,)](
            zs, zs.stride(0), zt, zt.stride(0), grad if labels is None else labels, grad, lse_s, lse_t,
            vocab, float(gamma), float(inv_temp), ignore_index, *head_args,
            BLOCK_V=tile, HAS_LABELS=labels is not None,
            HAS_GAMMA=labels is not None and gamma != 0, **cap_flags, num_warps=8,
        )


def launch_cases(vocab: int, dtype: torch.dtype, *, labels_dtype: torch.dtype = torch.int64,
                 block_v: int | None = None, device: str | torch.device = "meta", rows: int = 16):
    """Every distinct launch this file's launchers can make at one vocabulary size and logits dtype, as
    ``[(label, call)]``; the contract of ``triton_rows.launch_cases`` (read its docstring): one case per combination
    of options that changes a constexpr (``KIND_KL``, ``HAS_LABELS``, ``HAS_GAMMA``, ``WRITE_GRAD``,
    ``SAVE_STATS``; ``S_CAP`` / ``T_CAP`` on a soft-capped student or teacher), on empty tensors that are only fit to
    compile with (``device="meta"``)."""
    zs = torch.empty(rows, vocab, dtype=dtype, device=device)
    zt = torch.empty(rows, vocab, dtype=dtype, device=device)
    labels = torch.empty(rows, dtype=labels_dtype, device=device)

    def f32():
        return torch.empty(rows, dtype=torch.float32, device=device)

    cases = []
    for with_labels, gamma in ((False, 0.0), (True, 0.0), (True, 1.0)):
        y = labels if with_labels else None
        opts = dict(gamma=gamma, inv_temp=0.5, ignore_index=IGNORE_INDEX, block_v=block_v)
        for kind in TEACHER_KINDS:
            for grad, save in itertools.product((False, True), repeat=2):
                cases.append((f"kl_rows(kind={kind!r}, labels={with_labels}, gamma={gamma}, grad={grad}, "
                              f"save_stats={save})",
                              partial(kl_rows, zs, zt, y, kind=kind, grad=f32() if grad else None, save_stats=save,
                                      **opts)))
        cases.append((f"kl_grad_rows_from_stats(labels={with_labels}, gamma={gamma})",
                      partial(kl_grad_rows_from_stats, zs, zt, y, f32(), f32(), f32(), **opts)))
    # Soft-capped heads (S_CAP, T_CAP): the student's, the teacher's, both; the KL forward with its gradient, the
    # stats-saving forward and the recomputing backward.
    opts = dict(gamma=0.0, inv_temp=0.5, ignore_index=IGNORE_INDEX, block_v=block_v)
    for caps in ({"softcap": 30.0}, {"teacher_softcap": 30.0}, {"softcap": 30.0, "teacher_softcap": 30.0}):
        tag = ", ".join(f"{k}=30" for k in caps)
        for grad, save in ((True, False), (False, True)):
            cases.append((f"kl_rows(kind='kl', labels=True, grad={grad}, save_stats={save}, {tag})",
                          partial(kl_rows, zs, zt, labels, kind="kl", grad=f32() if grad else None, save_stats=save,
                                  **opts, **caps)))
        cases.append((f"kl_grad_rows_from_stats(labels=True, {tag})",
                      partial(kl_grad_rows_from_stats, zs, zt, labels, f32(), f32(), f32(), **opts, **caps)))
    return cases
