"""Plain PyTorch row operations on one chunk of logits: the reference for the Triton kernels and the CPU path.

The chunked driver computes a chunk of logits ``z = h W^T`` with a GEMM and hands it to a row operation, which
turns each row into its score and, when asked, overwrites the chunk in place with the gradient direction.
``triton_rows.py`` holds the fused Triton version with the same contract, and the tests hold the two to each other.

Per row i, with p = softmax(z_i), y = labels[i]:
    H_k   = the k largest entries of z_i; ties broken towards the lower vocabulary index (a stable order)
    q     = softmax of z_i restricted to H_k                        (stop-gradient)
    t     = (1 - lam) e_y + lam q                                   (soft target)
    s_i   = <t, log p>  = (1 - lam) log p_y + lam sum_{j in H_k} q_j log p_j
    ds/dz = t - p        (t sums to one), so dL/dz_i = g_i (t - p)
With lam = 0 (or topk = 0) the score is log p(y) and no top-k is computed.
A transformed head (``head.py``: ``z = c tanh(s x / c)`` or ``z = s x`` of the GEMM's ``x``) is scored on z: the chunk
is transformed in place first, and the gradient direction carries the chain factor ``1 - (z / c)^2`` (the scale s is
the caller's to fold into g, like g itself).

Like a fused kernel, a row op here holds nothing of the chunk's size but the chunk itself: every temporary is
O(C k) (C rows, k beliefs), so the [C, V] buffer is read a few times and written once, in its own dtype:

* top-k without a [C, V] scan of integers: ``stable_topk`` takes the maximum of every 64-wide block of the row,
  keeps the k best blocks (the top-k can only live there, unless it ties with a block left out) and runs
  ``torch.topk`` on those k * 64 candidates; only rows whose k-th value is tied (at the boundary or with a block
  left out) are redone exactly, on those rows alone.
* softmax in place (``aten._softmax.out`` with the buffer as both input and output), so the chunk becomes p;
  log-sum-exp comes back from p at the argmax (lse = z_max - log p_max, p_max >= 1/V, so it is as exact as p),
  or, for a bf16/fp16 buffer, from a float32 log-sum-exp over 16-row slices.
* the target's k + 1 sparse entries are then overwritten with p_j - t_j computed in float32 from logits read
  before the softmax, so nothing sparse is rounded twice. The chunk then holds ``p - t``: the driver folds the
  scale -g into the [C, D] operands of its two GEMMs instead of spending a pass over [C, V] on it.
* a soft-capped head's chain factor is recovered from p itself, ``z = log p + lse``, in 16-row float32 slices, so it
  costs no second [C, V] buffer: |z| <= c keeps p >= e^(-2c) / V above float32's smallest normal for caps up to
  ~37 (Gemma-2's is 30), and an entry whose p underflows has a gradient below it either way (written as 0).
"""

from __future__ import annotations

import torch

BLOCK = 64  # width of the blocks whose maxima pre-select the top-k candidates (ours: 768 blocks for V = 49152)
_LSE_ROWS = 16  # rows per float32 slice when a low-precision buffer's log-sum-exp is accumulated in float32
_EXACT_ROWS = 64  # rows per slice of the exact tie path: its [R, V] boolean masks stay at 2 x 64 x V bytes


def _exact_topk_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [R, k] of the k largest entries of each row of ``x``, ties to the lower index.

    With each row's k-th largest value from ``torch.topk``, everything above it is taken, and of the entries equal to
    it the first ``k - above`` in index order: ``nonzero`` lists the tied positions row by row in index order, so
    each one's rank within its row is its offset from the row's first. Two boolean masks and O(nnz) index work, no
    integer scan of the row. A row whose count does not add up (NaN entries compare false everywhere) keeps
    ``torch.topk``'s in-range choice."""
    rows = x.shape[0]
    top = torch.topk(x, k, dim=-1)
    kth = top.values[:, -1:]
    above, tied = x > kth, x == kth
    need = k - above.sum(-1)
    ra, ca = above.nonzero(as_tuple=True)
    rt, ct = tied.nonzero(as_tuple=True)
    counts = torch.bincount(rt, minlength=rows)
    keep = torch.arange(rt.numel(), device=x.device) - (counts.cumsum(0) - counts)[rt] < need[rt]
    r, c = torch.cat([ra, rt[keep]]), torch.cat([ca, ct[keep]])
    ok = torch.bincount(r, minlength=rows) == k
    if not bool(ok.all()):
        m = ok[r]
        r, c = r[m], c[m]
    idx = top.indices.clone()
    idx[ok] = c[torch.sort(r, stable=True).indices].view(-1, k)
    return idx


def _exact_topk(x: torch.Tensor, k: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k with ties to the lower index by a scan of the whole row (``_exact_topk_rows``), of every row of ``x`` or
    of ``rows`` alone, in slices of ``_EXACT_ROWS`` rows so that its masks (and the copies of indexed rows) stay
    small."""
    n = x.shape[0] if rows is None else rows.numel()
    parts = []
    for r0 in range(0, n, _EXACT_ROWS):
        xs = x[r0:r0 + _EXACT_ROWS] if rows is None else x[rows[r0:r0 + _EXACT_ROWS]]
        idx = _exact_topk_rows(xs, k)
        parts.append((xs.gather(1, idx), idx))
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of 2-D ``x``, ties broken towards the lower index (the rule the Triton kernel follows).

    Returns ``(values, indices)`` [R, k] in no particular order. The top-k is taken among the entries of the
    64-wide blocks (``BLOCK``) with the largest maxima, 2k of them at LM vocabularies; a row whose k-th value ties
    is settled exactly among those candidates in index order when nothing left out can reach it, else by a scan of
    its whole row (a k-th value equal to the largest block maximum left out: every row of an all-equal input). On
    SmolLM2-135M-Instruct's logits at the 1222 tokens of TOFU forget10's first 24 question + answer rows, k = 20:
    in bf16, 38% of the rows tie among the candidates and none with a block left out; in fp32, no row ties.
    Temporaries are O(R k), plus two [64, V] boolean masks for the rows scanned whole.
    """
    rows, vocab = x.shape
    if k >= vocab:
        idx = torch.arange(vocab, device=x.device).expand(rows, vocab)
        return x.clone(), idx.contiguous()
    nb = vocab // BLOCK
    if nb <= k + 1:  # too few blocks for the pre-selection to save anything
        return _exact_topk(x, k)
    # k blocks would do; up to k spare ones (while the candidates stay within a quarter of the row) make a tie with
    # a block left out rare where a coarse dtype ties often
    kept = min(2 * k, max(k, nb // 4), nb - 1)
    blocks = x[:, : nb * BLOCK].view(rows, nb, BLOCK)
    bmax, bidx = torch.topk(blocks.amax(-1), kept + 1, dim=-1, sorted=True)
    bound = bmax[:, kept]  # largest block maximum left out: every entry outside the candidates is <= bound
    sel = bidx[:, :kept]
    # the candidates' values [R, kept * BLOCK (+ the ragged tail)]; their vocabulary indices only where needed
    cand_v = blocks.gather(1, sel[:, :, None].expand(rows, kept, BLOCK)).view(rows, kept * BLOCK)
    if vocab > nb * BLOCK:
        cand_v = torch.cat([cand_v, x[:, nb * BLOCK:]], 1)

    def vocab_index(j: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary indices of candidate positions ``j`` [R', m] (of rows ``r``, else of every row)."""
        s = sel if r is None else sel[r]
        in_blocks = j < kept * BLOCK
        blocked = s.gather(1, (j // BLOCK).clamp_max_(kept - 1)) * BLOCK + j % BLOCK
        return torch.where(in_blocks, blocked, j - kept * BLOCK + nb * BLOCK)

    v, j = torch.topk(cand_v, k + 1, dim=-1, sorted=True)
    i = vocab_index(j)
    kth = v[:, k - 1]
    ok = ~torch.isnan(kth)
    outside = ok & (kth <= bound)  # an entry left out may equal the k-th value: scan the whole row
    inside = ok & ~outside & (kth == v[:, k])  # a tie at the boundary, among the candidates only
    v, i = v[:, :k].contiguous(), i[:, :k].contiguous()
    width = cand_v.shape[1]
    tied_rows = inside.nonzero()[:, 0]
    for r0 in range(0, tied_rows.numel(), _EXACT_ROWS):  # slices keep the [R', width] index tensors small
        r = tied_rows[r0:r0 + _EXACT_ROWS]
        ci, order = torch.sort(vocab_index(torch.arange(width, device=x.device).expand(r.numel(), width), r), dim=-1)
        cv = cand_v[r].gather(1, order)  # the candidates in index order, so the rule's order is the index's
        local = _exact_topk_rows(cv, k)
        i[r], v[r] = ci.gather(1, local), cv.gather(1, local)
    if bool(outside.any()):
        r = outside.nonzero()[:, 0]
        v[r], i[r] = _exact_topk(x, k, r)
    return v, i


def _targets(labels: torch.Tensor, ignore_index: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(active rows, labels clamped into range for gathers, rows whose label is out of range)."""
    active = labels != ignore_index
    out_of_range = active & ((labels < 0) | (labels >= vocab))
    y = torch.where(active & ~out_of_range, labels, torch.zeros_like(labels)).long()
    return active, y, out_of_range


def _transform_(z: torch.Tensor, logit_scale: float, softcap: float | None) -> None:
    """z <- the head's transform of the raw logits z, in place (``head.transform_logits``)."""
    if softcap is not None:
        z.mul_(logit_scale / softcap).tanh_().mul_(softcap)
    elif logit_scale != 1.0:
        z.mul_(logit_scale)


def cap_grad(z: torch.Tensor, softcap: float | None) -> torch.Tensor | float:
    """``1 - (z / softcap)^2``: dz/dx of a soft-capped head divided by its scale, from z (1 without a cap)."""
    return 1.0 if softcap is None else 1.0 - (z / softcap).square().clamp_max(1.0)


def _chain_dense_(z: torch.Tensor, lse: torch.Tensor, softcap: float | None) -> None:
    """z <- p * (1 - (z/c)^2) in place for a chunk holding p = softmax(z), with z = log p + lse; float32 16-row
    slices. An underflowed p gives log 0 = -inf, whose clamped factor 0 keeps the entry 0, not NaN."""
    if softcap is None:
        return
    for r0 in range(0, z.shape[0], _LSE_ROWS):
        sl = slice(r0, r0 + _LSE_ROWS)
        p = z[sl].to(lse.dtype)
        factor = torch.log(p).add_(lse[sl, None]).div_(softcap).square_().clamp_(max=1.0).neg_().add_(1.0)
        z[sl] = p.mul_(factor)


def _softmax_(z: torch.Tensor) -> None:
    """z <- softmax(z) over the last dim, in place (the CPU/CUDA kernels run row by row, so aliasing is safe)."""
    torch.ops.aten._softmax.out(z, -1, False, out=z)


def _lse_low_precision(z: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    out = torch.empty(z.shape[0], device=z.device, dtype=acc)
    for r0 in range(0, z.shape[0], _LSE_ROWS):
        out[r0:r0 + _LSE_ROWS] = torch.logsumexp(z[r0:r0 + _LSE_ROWS].to(acc), dim=-1)
    return out


def _exp_minus_(z: torch.Tensor, lse: torch.Tensor) -> None:
    """z <- exp(z - lse) in place: p with the forward's log-sum-exp (float32 16-row slices for a bf16/fp16 z)."""
    if z.dtype == lse.dtype:
        z.sub_(lse[:, None]).exp_()
        return
    for r0 in range(0, z.shape[0], _LSE_ROWS):
        sl = slice(r0, r0 + _LSE_ROWS)
        z[sl] = torch.exp(z[sl].to(lse.dtype) - lse[sl, None])


def _put_rows(z: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
    """z[r, cols[r, j]] <- vals[r, j]. On a contiguous z as an ``index_put_`` on its flat view: the CPU's
    ``scatter_`` converts a whole bf16 z to float32 and back (192 MiB and 0.12 s for a [1024, 49152] chunk,
    torch 2.13), where this writes the few entries alone."""
    vals = vals.to(z.dtype)
    if not z.is_contiguous():
        z.scatter_(1, cols, vals)
        return
    flat = cols + torch.arange(z.shape[0], device=z.device)[:, None] * z.shape[1]
    z.view(-1).index_put_((flat.view(-1),), vals.reshape(-1))


def _write_sparse(z, lse, y, zy, topi, topz, q, lam, active, softcap=None) -> None:
    """Overwrite the target's support with (p_j - t_j) (1 - (z_j/c)^2) (float32 from saved logits) and zero the
    ignored rows."""
    acc = lse.dtype
    if topi is None:
        _put_rows(z, y[:, None], ((torch.exp(zy - lse) - 1.0) * cap_grad(zy, softcap))[:, None])
    else:
        is_y = topi == y[:, None]
        coef_top = lam * q + (1.0 - lam) * is_y.to(acc)
        # If y is in H_k its own column repeats the value written there, so the two writes agree.
        coef_y = (1.0 - lam) + lam * (q * is_y.to(acc)).sum(-1)
        val = torch.cat([torch.exp(topz - lse[:, None]) - coef_top, (torch.exp(zy - lse) - coef_y)[:, None]], 1)
        val = val * cap_grad(torch.cat([topz, zy[:, None]], 1), softcap)
        _put_rows(z, torch.cat([topi, y[:, None]], 1), val)
    if not bool(active.all()):
        z.index_fill_(0, (~active).nonzero()[:, 0], 0.0)


def rows_forward(z: torch.Tensor, labels: torch.Tensor, *, topk: int, lam: float, ignore_index: int,
                 logit_scale: float = 1.0, softcap: float | None = None):
    """Scores of a chunk of raw logits ``z`` [C, V], which is overwritten with ``(p - t) (1 - (z/c)^2)`` (zero on
    ignored rows; the factor is 1 without a cap), p and t those of the transformed logits.

    Returns ``(scores, lse, top-k indices int64 [C, k] | None, q [C, k] | None)``, float32 (float64 for float64
    logits); a row with an out-of-range label scores NaN. ``dL/dx = -g s (p - t) (1 - (z/c)^2)`` for upstream
    gradient g and scale s.
    """
    _transform_(z, logit_scale, softcap)
    acc = torch.promote_types(z.dtype, torch.float32)
    use_topk = topk > 0 and lam > 0
    active, y, bad = _targets(labels, ignore_index, z.shape[-1])
    zy = z.gather(1, y[:, None]).squeeze(1).to(acc)
    if use_topk:
        topz, topi = stable_topk(z, topk)
        topz = topz.to(acc)
        zmax, amax = topz.max(-1)
        amax = topi.gather(1, amax[:, None]).squeeze(1)
    else:
        topz = topi = None
        zmax, amax = z.max(-1)
        zmax = zmax.to(acc)
    lse = _lse_low_precision(z, acc) if z.dtype.itemsize < 4 else None
    _softmax_(z)
    if lse is None:
        lse = zmax - torch.log(z.gather(1, amax[:, None]).squeeze(1))
    score = zy - lse
    q = None
    if use_topk:
        q = torch.softmax(topz, dim=-1)
        score = (1.0 - lam) * score + lam * (q * (topz - lse[:, None])).sum(-1)
    score = torch.where(active, score, torch.zeros_like(score))
    score = torch.where(bad, torch.full_like(score, float("nan")), score)
    _chain_dense_(z, lse, softcap)
    _write_sparse(z, lse, y, zy, topi, topz, q, lam, active, softcap)
    return score, lse, topi, q


def rows_backward(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, topi: torch.Tensor | None,
                  q: torch.Tensor | None, *, lam: float, ignore_index: int, logit_scale: float = 1.0,
                  softcap: float | None = None) -> None:
    """Overwrite recomputed raw logits ``z`` [C, V] with ``(p - t) (1 - (z/c)^2)``, t rebuilt from the saved
    statistics (``rows_forward``'s contract)."""
    _transform_(z, logit_scale, softcap)
    acc = lse.dtype
    active, y, _ = _targets(labels, ignore_index, z.shape[-1])
    zy = z.gather(1, y[:, None]).squeeze(1).to(acc)
    topz = None if topi is None else z.gather(1, topi).to(acc)
    _exp_minus_(z, lse)
    _chain_dense_(z, lse, softcap)
    _write_sparse(z, lse, y, zy, topi, topz, q, lam, active, softcap)


def _scale_rows(z: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    """z <- -g z: turns p - t into g (t - p); an out-of-range label makes its row NaN."""
    _, _, bad = _targets(labels, ignore_index, z.shape[-1])
    g = torch.where(bad, torch.full_like(grad, float("nan")), grad)
    z.mul_((-g)[:, None].to(z.dtype))


def scores_rows(z: torch.Tensor, labels: torch.Tensor, *, topk: int, lam: float, ignore_index: int,
                grad: torch.Tensor | None = None, save_stats: bool = False, logit_scale: float = 1.0,
                softcap: float | None = None):
    """Scores of a chunk of raw logits ``z`` [C, V], the contract ``triton_rows.scores_rows`` shares.

    If ``grad`` [C] is given, ``z`` is overwritten with dL/dx = ``grad[:, None] * (t - p) * dz/dx`` (zero on ignored
    rows; ``dz/dx = logit_scale (1 - (z/softcap)^2)``); otherwise ``z`` is left as it was. Returns ``(scores [C],
    lse [C] | None, top-k indices int32 [C, k] | None, q [C, k] | None)``, float32 (float64 for float64 logits);
    the statistics are returned when ``save_stats`` and are what ``grad_rows_from_stats`` needs to rebuild t. The
    chunked driver calls ``rows_forward`` directly.
    """
    work = z if grad is not None else z.clone()
    score, lse, topi, q = rows_forward(work, labels, topk=topk, lam=lam, ignore_index=ignore_index,
                                       logit_scale=logit_scale, softcap=softcap)
    if grad is not None:
        _scale_rows(z, grad.to(lse.dtype) * logit_scale, labels, ignore_index)
    if not save_stats:
        return score, None, None, None
    return score, lse, (None if topi is None else topi.to(torch.int32)), q


def grad_rows_from_stats(z: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor, lse: torch.Tensor,
                         topi: torch.Tensor | None, q: torch.Tensor | None, *, lam: float, ignore_index: int,
                         logit_scale: float = 1.0, softcap: float | None = None) -> None:
    """Overwrite recomputed raw logits ``z`` [C, V] with dL/dx (``scores_rows``' contract), t rebuilt from saved
    statistics."""
    rows_backward(z, labels, lse, None if topi is None else topi.long(), q, lam=lam, ignore_index=ignore_index,
                  logit_scale=logit_scale, softcap=softcap)
    _scale_rows(z, grad.to(lse.dtype) * logit_scale, labels, ignore_index)
