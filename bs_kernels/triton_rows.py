"""Triton row kernels: scores, top-k beliefs and ``dL/dz`` for one chunk of logits, in two passes over each row.

The same contract as ``torch_rows.py`` (read that docstring for the formula), fused so that each row of the
[C, V] logits chunk is read twice and written once:

* pass 1 streams the row in ``BLOCK_V`` tiles and keeps an online max / sum-exp (log-sum-exp) and, when
  ``HAS_TOPK``, a running top-k *with indices* in registers. ``tl.topk`` returns values only and rounds k to a
  power of two, so the kernel keeps its own buffer of ``K_PAD`` slots (slots >= k are disabled by holding +inf):
  a tile is merged only while its largest entry beats the buffer's smallest, one insertion at a time. After the
  first tile, real LM rows rarely trigger a merge, so the common-case cost is one max per tile.
  Ties are broken towards the lower vocabulary index, like ``torch_rows.stable_topk``.
* pass 2 (``WRITE_GRAD``) overwrites the row with the dense part ``-g p``; after a barrier the k + 1 sparse
  entries of the target are written exactly as ``g (t_j - p_j)``, from logits held in registers, so nothing is
  read back from the (possibly bf16) buffer.

A transformed head (``head.py``) is one more map on every load: ``z = c tanh(s x / c)`` (``HAS_CAP``) or ``z = s x``
(``logit_scale`` is a runtime float, 1 for a plain head), so the top-k, the softmax and the target are those of z;
pass 2 writes ``dL/dx = g (t - p) s (1 - (z/c)^2)``. The tanh is spelled with ``exp`` (``_softcap``): the interpreter
has no libdevice, and the tests then run exactly the GPU code.

Layers, as in Liger-Kernel: ``@triton.jit`` kernels, then the Python launchers that the chunked driver calls.
Launchers never read tensor values on the host. A label outside [0, V) that is not ``ignore_index`` yields a NaN
score and NaN gradients for its row (the loss turns NaN) instead of an out-of-bounds read.
"""

from __future__ import annotations

import itertools
from functools import partial

import torch
import triton
import triton.language as tl

from ._checks import IGNORE_INDEX, MAX_TRITON_TOPK, triton_interpret


@triton.jit
def _softcap(x, cap):
    """cap * tanh(x / cap), as (1 - e) / (1 + e) with e = exp(-2|x| / cap): no overflow, saturates to +-cap; its
    absolute error, ~1e-7 cap, is that of rounding a logit of size cap to float32."""
    e = tl.exp(-2.0 * tl.abs(x) / cap)
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(x < 0, -t, t)


@triton.jit
def _head_logits(x, scale, cap, HAS_CAP: tl.constexpr):
    """The head's transform of raw logits x (``head.transform_logits``)."""
    if HAS_CAP:
        return _softcap(x * scale, cap)
    return x * scale


@triton.jit
def _head_grad(z, scale, cap, HAS_CAP: tl.constexpr):
    """dz/dx of the head's transform, from z: s (1 - (z / c)^2), or s."""
    if HAS_CAP:
        u = z / cap
        return scale * tl.maximum(1.0 - u * u, 0.0)
    return scale + tl.zeros_like(z)  # z's shape in both branches (the compiler requires it); never 0 * inf


@triton.jit
def _dense_then_sparse_grad(row_ptr, V, lse, g, y, zy, y_coef, y_in_top, top_idx, top_z, top_coef, top_valid,
                            scale, cap, BLOCK_V: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_CAP: tl.constexpr):
    """Write g * (t - p) * dz/dx over one row: dense -g p dz/dx first, then the exact values at the target's
    support."""
    # The caller read z_y and the top-k logits from this row; no thread may overwrite them before all have.
    tl.debug_barrier()
    for start in tl.range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = _head_logits(tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32), scale, cap, HAS_CAP)
        dz = -g * tl.exp(z - lse) * _head_grad(z, scale, cap, HAS_CAP)
        tl.store(row_ptr + offs, dz.to(row_ptr.dtype.element_ty), mask=mask)
    # Other threads of this program wrote the dense values; order the sparse overwrite after them.
    tl.debug_barrier()
    gy = g * _head_grad(zy, scale, cap, HAS_CAP)
    if HAS_TOPK:
        top_zv = tl.where(top_valid, top_z, 0.0)
        val = g * _head_grad(top_zv, scale, cap, HAS_CAP) * (
            top_coef - tl.exp(tl.where(top_valid, top_z - lse, float("-inf"))))
        tl.store(row_ptr + top_idx, val.to(row_ptr.dtype.element_ty), mask=top_valid)
        tl.store(row_ptr + y, (gy * (y_coef - tl.exp(zy - lse))).to(row_ptr.dtype.element_ty), mask=~y_in_top)
    else:
        tl.store(row_ptr + y, (gy * (1.0 - tl.exp(zy - lse))).to(row_ptr.dtype.element_ty))


@triton.jit
def _zero_row(row_ptr, V, BLOCK_V: tl.constexpr):
    for start in tl.range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        tl.store(row_ptr + offs, tl.zeros([BLOCK_V], dtype=row_ptr.dtype.element_ty), mask=offs < V)


@triton.jit(do_not_specialize=["k"])  # k = 1 or a multiple of 16 would each compile another variant
def _scores_kernel(
    logits_ptr, stride_row, labels_ptr, grad_ptr,
    scores_ptr, lse_ptr, topi_ptr, topq_ptr,
    V, k, lam, ignore_index, scale, cap,
    BLOCK_V: tl.constexpr, K_PAD: tl.constexpr,
    HAS_TOPK: tl.constexpr, WRITE_GRAD: tl.constexpr, SAVE_STATS: tl.constexpr, HAS_CAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        tl.store(scores_ptr + row, 0.0)
        if SAVE_STATS:
            tl.store(lse_ptr + row, 0.0)
        if WRITE_GRAD:
            _zero_row(row_ptr, V, BLOCK_V)
        return
    label_ok = (label >= 0) & (label < V)
    y = tl.where(label_ok, label, 0)

    # ---- pass 1: online log-sum-exp and running top-k with indices ----
    m = float("-inf")
    s = 0.0
    slot = tl.arange(0, K_PAD)
    top_valid = slot < k
    top_z = tl.where(top_valid, float("-inf"), float("inf"))
    # In-bounds from the start (k <= V), so a row that never fills the buffer (all NaN) still indexes its own row.
    # int32 (V < 2^31): int64 indices cost the registers that made ptxas spill at K_PAD >= 64 (tools.kernel_check).
    top_idx = slot
    for start in tl.range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
        x = tl.where(offs < V, _head_logits(x, scale, cap, HAS_CAP), float("-inf"))
        x_max = tl.max(x, 0)
        m_new = tl.maximum(m, x_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
        if HAS_TOPK:
            floor = tl.min(top_z, 0)
            while x_max > floor:
                # Insert the tile's best (lowest index on ties) in place of the buffer's worst (highest index on
                # ties). Later tiles only hold higher indices, so an equal value never displaces a buffered one.
                arg = tl.argmax(x, 0, tie_break_left=True)
                evict = tl.argmax(tl.where(top_z == floor, top_idx, -1), 0, tie_break_left=True)
                top_z = tl.where(slot == evict, x_max, top_z)
                top_idx = tl.where(slot == evict, start + arg, top_idx)
                x = tl.where(tl.arange(0, BLOCK_V) == arg, float("-inf"), x)
                floor = tl.min(top_z, 0)
                x_max = tl.max(x, 0)
    lse = m + tl.log(s)
    zy = _head_logits(tl.load(row_ptr + y).to(tl.float32), scale, cap, HAS_CAP)
    score = zy - lse
    q = tl.zeros([K_PAD], dtype=tl.float32)
    top_coef = tl.zeros([K_PAD], dtype=tl.float32)
    y_in_top = False
    if HAS_TOPK:
        e = tl.where(top_valid, tl.exp(top_z - tl.max(tl.where(top_valid, top_z, float("-inf")), 0)), 0.0)
        q = e / tl.sum(e, 0)
        is_y = top_valid & (top_idx == y)
        y_in_top = tl.sum(is_y.to(tl.int32), 0) > 0
        score = (1.0 - lam) * score + lam * tl.sum(q * tl.where(top_valid, top_z - lse, 0.0), 0)
        top_coef = lam * q + tl.where(is_y, 1.0 - lam, 0.0)
    score = tl.where(label_ok, score, float("nan"))
    tl.store(scores_ptr + row, score)
    if SAVE_STATS:
        tl.store(lse_ptr + row, lse)
        if HAS_TOPK:
            tl.store(topi_ptr + row * k + slot, top_idx.to(tl.int32), mask=top_valid)
            tl.store(topq_ptr + row * k + slot, q, mask=top_valid)

    # ---- pass 2: overwrite the row with g * (t - p) ----
    if WRITE_GRAD:
        g = tl.load(grad_ptr + row).to(tl.float32)
        g = tl.where(label_ok, g, float("nan"))  # a bad label poisons its gradient too, not only the loss
        _dense_then_sparse_grad(row_ptr, V, lse, g, y, zy, 1.0 - lam, y_in_top, top_idx, top_z, top_coef, top_valid,
                                scale, cap, BLOCK_V, HAS_TOPK, HAS_CAP)


@triton.jit(do_not_specialize=["k"])
def _grad_from_stats_kernel(
    logits_ptr, stride_row, labels_ptr, grad_ptr, lse_ptr, topi_ptr, topq_ptr,
    V, k, lam, ignore_index, scale, cap,
    BLOCK_V: tl.constexpr, K_PAD: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_CAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        _zero_row(row_ptr, V, BLOCK_V)
        return
    label_ok = (label >= 0) & (label < V)
    y = tl.where(label_ok, label, 0)
    lse = tl.load(lse_ptr + row)
    g = tl.where(label_ok, tl.load(grad_ptr + row).to(tl.float32), float("nan"))
    slot = tl.arange(0, K_PAD)
    top_valid = slot < k
    # Read the sparse logits before the dense pass overwrites them.
    zy = _head_logits(tl.load(row_ptr + y).to(tl.float32), scale, cap, HAS_CAP)
    top_idx = tl.zeros([K_PAD], dtype=tl.int64)
    top_z = tl.zeros([K_PAD], dtype=tl.float32)
    top_coef = tl.zeros([K_PAD], dtype=tl.float32)
    y_in_top = False
    if HAS_TOPK:
        top_idx = tl.load(topi_ptr + row * k + slot, mask=top_valid, other=0).to(tl.int64)
        q = tl.load(topq_ptr + row * k + slot, mask=top_valid, other=0.0)
        top_z = _head_logits(tl.load(row_ptr + top_idx, mask=top_valid, other=0.0).to(tl.float32), scale, cap,
                             HAS_CAP)
        is_y = top_valid & (top_idx == y)
        y_in_top = tl.sum(is_y.to(tl.int32), 0) > 0
        top_coef = lam * q + tl.where(is_y, 1.0 - lam, 0.0)
    _dense_then_sparse_grad(row_ptr, V, lse, g, y, zy, 1.0 - lam, y_in_top, top_idx, top_z, top_coef, top_valid,
                            scale, cap, BLOCK_V, HAS_TOPK, HAS_CAP)


# The tl.constexpr flags each launcher below can set, with the values it can give them (BLOCK_V and K_PAD aside:
# sizes, not switches). One place to read them, for an ahead-of-time compile of every launchable variant.
SCORES_FLAGS = {"HAS_TOPK": (False, True), "WRITE_GRAD": (False, True), "SAVE_STATS": (False, True),
                "HAS_CAP": (False, True)}
GRAD_FROM_STATS_FLAGS = {"HAS_TOPK": (False, True), "HAS_CAP": (False, True)}


# Registers per thread of the scores kernel. Left to itself, ptxas trades a few spilled bytes (8-16) for a fourth
# block per SM in some variants and not in others; with this budget no variant spills, and the reference k = 20 fits
# 64 registers (4 blocks of 8 warps per SM), k > 32 72 (3 blocks). Checked by tools.kernel_check.
MAX_REGS = 72


def _block_v(vocab: int, block_v: int | None) -> int:
    if block_v is not None:
        return block_v
    # Interpreter: one tile per row keeps CPU tests fast. GPU: 4096 fp32 values per tile over 8 warps (16 per
    # thread); to be tuned with the loss benchmark on a GPU (benchmarks/README.md).
    # A V that is not a multiple of 16 leaves rows unaligned: scalar loads, each with its own 64-bit address, and
    # 16 of them per thread spilled on sm_80 (tools.kernel_check); 2048 holds 8 per thread.
    if triton_interpret():
        return triton.next_power_of_2(vocab)
    return min(4096 if vocab % 16 == 0 else 2048, triton.next_power_of_2(vocab))


def _k_pad(topk: int) -> int:
    # Two buffer sizes: 32 (one warp's lanes, so the buffer's reductions stay in-warp shuffles) for the reference
    # k = 20 and any k <= 32, and the limit above it; two variants to compile instead of four.
    return 32 if topk <= 32 else triton.next_power_of_2(MAX_TRITON_TOPK)


def scores_rows(z: torch.Tensor, labels: torch.Tensor, *, topk: int, lam: float, ignore_index: int,
                grad: torch.Tensor | None = None, save_stats: bool = False, logit_scale: float = 1.0,
                softcap: float | None = None, block_v: int | None = None):
    """Triton twin of ``torch_rows.scores_rows``: same arguments, same returns, same in-place gradient."""
    rows, vocab = z.shape
    use_topk = topk > 0 and lam > 0
    k = topk if use_topk else 0  # without top-k the kernel ignores k: one compiled variant whatever topk is
    dev = z.device
    scores = torch.empty(rows, device=dev, dtype=torch.float32)
    lse = torch.empty(rows, device=dev, dtype=torch.float32) if save_stats else scores
    topi = torch.empty(rows, topk, device=dev, dtype=torch.int32) if save_stats and use_topk else None
    topq = torch.empty(rows, topk, device=dev, dtype=torch.float32) if save_stats and use_topk else None
    if rows:
        _scores_kernel[(rows,)](
            z, z.stride(0), labels, scores if grad is None else grad,
            scores, lse, scores if topi is None else topi, scores if topq is None else topq,
            vocab, k, float(lam), ignore_index, float(logit_scale), 1.0 if softcap is None else float(softcap),
            BLOCK_V=_block_v(vocab, block_v), K_PAD=_k_pad(k),
            HAS_TOPK=use_topk, WRITE_GRAD=grad is not None, SAVE_STATS=save_stats, HAS_CAP=softcap is not None,
            num_warps=8, maxnreg=MAX_REGS,
        )
    if not save_stats:
        return scores, None, None, None
    return scores, lse, topi, topq


def grad_rows_from_stats(z: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor, lse: torch.Tensor,
                         topi: torch.Tensor | None, q: torch.Tensor | None, *, lam: float, ignore_index: int,
                         logit_scale: float = 1.0, softcap: float | None = None, block_v: int | None = None) -> None:
    """Triton twin of ``torch_rows.grad_rows_from_stats``."""
    rows, vocab = z.shape
    topk = 0 if topi is None else topi.shape[1]
    if rows:
        _grad_from_stats_kernel[(rows,)](
            z, z.stride(0), labels, grad, lse, lse if topi is None else topi, lse if q is None else q,
            vocab, topk, float(lam), ignore_index, float(logit_scale), 1.0 if softcap is None else float(softcap),
            BLOCK_V=_block_v(vocab, block_v), K_PAD=_k_pad(topk), HAS_TOPK=topi is not None,
            HAS_CAP=softcap is not None, num_warps=8,
        )


# One top-k size per buffer size K_PAD (k itself is not specialised): the reference k = 20, and the limit.
LAUNCH_TOPKS = (20, MAX_TRITON_TOPK)


def launch_cases(vocab: int, dtype: torch.dtype, *, labels_dtype: torch.dtype = torch.int64,
                 block_v: int | None = None, device: str | torch.device = "meta", rows: int = 16):
    """Every distinct launch this file's launchers can make at one vocabulary size and logits dtype, as
    ``[(label, call)]``: each ``call()`` runs a launcher on empty tensors of ``device`` (``"meta"``: no memory).

    One case per combination of launcher options that changes a constexpr of a kernel (``HAS_TOPK``, ``K_PAD``,
    ``WRITE_GRAD``, ``SAVE_STATS``; ``HAS_CAP`` on the launches a soft-capped head makes) or a specialisation Triton
    makes of an integer argument. ``tools.kernel_check``
    records the launches these calls make and compiles each ahead of time for the GPUs the kernels will meet; it
    fails while a boolean constexpr is only ever launched one way, so a new flag belongs here too. The tensors hold
    no data: on a real device the calls would read garbage, so use them only to compile (``device="meta"``).
    """
    z = torch.empty(rows, vocab, dtype=dtype, device=device)
    labels = torch.empty(rows, dtype=labels_dtype, device=device)

    def f32(*shape):
        return torch.empty(*shape, dtype=torch.float32, device=device)

    cases = []
    for topk, lam in [(0, 0.0)] + [(k, 0.2) for k in LAUNCH_TOPKS]:
        for grad, save in itertools.product((False, True), repeat=2):
            cases.append((f"scores_rows(topk={topk}, lam={lam}, grad={grad}, save_stats={save})",
                          partial(scores_rows, z, labels, topk=topk, lam=lam, ignore_index=IGNORE_INDEX,
                                  grad=f32(rows) if grad else None, save_stats=save, block_v=block_v)))
        topi = torch.empty(rows, topk, dtype=torch.int32, device=device) if topk else None
        cases.append((f"grad_rows_from_stats(topk={topk}, lam={lam})",
                      partial(grad_rows_from_stats, z, labels, f32(rows), f32(rows), topi, f32(rows, topk) if topk
                              else None, lam=lam, ignore_index=IGNORE_INDEX, block_v=block_v)))
    # A soft-capped head (Gemma-2: HAS_CAP) on the launches a training step makes: scores with the gradient, with and
    # without top-k, the stats-saving forward and the recomputing backward.
    for topk, lam in ((0, 0.0), (LAUNCH_TOPKS[0], 0.2)):
        for grad, save in ((True, False), (False, True)):
            cases.append((f"scores_rows(topk={topk}, lam={lam}, grad={grad}, save_stats={save}, softcap=30)",
                          partial(scores_rows, z, labels, topk=topk, lam=lam, ignore_index=IGNORE_INDEX,
                                  grad=f32(rows) if grad else None, save_stats=save, softcap=30.0, block_v=block_v)))
        topi = torch.empty(rows, topk, dtype=torch.int32, device=device) if topk else None
        cases.append((f"grad_rows_from_stats(topk={topk}, lam={lam}, softcap=30)",
                      partial(grad_rows_from_stats, z, labels, f32(rows), f32(rows), topi, f32(rows, topk) if topk
                              else None, lam=lam, ignore_index=IGNORE_INDEX, softcap=30.0, block_v=block_v)))
    return cases
