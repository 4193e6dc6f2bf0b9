"""The fused per-token scores against their references: values AND gradients w.r.t. hidden and weight.

Three layers of checks, each against something simpler than itself:
* the naive full-logits reference against the formula written out row by row in float64;
* the chunked PyTorch path against the naive reference in float64;
* the Triton kernels (CPU interpreter here, CUDA when present) against the PyTorch path in float32, at the awkward
  shape N = 37, D = 48, V = 1003 with ~20% ignored labels, ties, labels inside and outside the top-k.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bs_kernels as bk
from bs_kernels import torch_rows

N, D, V = 37, 48, 1003
KS = (1, 5, 20)
LAMS = (0.0, 0.2, 1.0)


def make_problem(dtype=torch.float32, device="cpu", seed=0, n=N, d=D, v=V):
    """Hidden, weight and labels with ties in the logits and labels both inside and outside the top-k."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    # Duplicated vocabulary rows give exactly tied logits; row 0 leans hard on token 7 so that its tie group
    # {7, 11, 400, 999} straddles the k = 1 and k = 5 boundaries.
    for dup in (11, 400, 999):
        weight[dup] = weight[7]
    hidden[0] = 6.0 * weight[7] * d**0.5
    logits = hidden @ weight.t()
    labels = torch.randint(0, v, (n,), generator=g)
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    labels[1::4] = order[1::4, 0]  # the argmax: inside every top-k
    labels[2::4] = order[2::4, 3]  # rank 4: inside top-5/20, outside top-1
    labels[0] = 400  # a tied token: inside the top-5 only through the tie-break
    ignored = torch.rand(n, generator=g) < 0.2
    ignored[0] = False
    labels[ignored] = -100
    return (hidden.to(dtype).to(device), weight.to(dtype).to(device), labels.to(device))


def grads(fn, hidden, weight, upstream):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w)
    dh, dw = torch.autograd.grad((out * upstream).sum(), (h, w))
    return out.detach(), dh, dw


def formula_row(z: torch.Tensor, y: int, k: int, lam: float) -> float:
    """The BS-T score of one row, written out literally from the paper's definition (float64)."""
    logp = z - torch.logsumexp(z, 0)
    if lam == 0:
        return float(logp[y])
    ranked = sorted(range(z.numel()), key=lambda j: (-float(z[j]), j))[:k]
    q = torch.softmax(z[ranked], 0)
    t = torch.zeros_like(z)
    t[y] += 1 - lam
    t[ranked] += lam * q
    return float((t * logp).sum())


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("lam", LAMS)
def test_reference_equals_formula_fp64(k, lam):
    hidden, weight, labels = make_problem(torch.float64)
    ref = bk.naive_token_scores(hidden, weight, labels, topk=k, lam=lam)
    logits = hidden @ weight.t()
    for i in range(N):
        want = 0.0 if labels[i] == -100 else formula_row(logits[i], int(labels[i]), k, lam)
        assert abs(float(ref[i]) - want) < 1e-12, (i, float(ref[i]), want)


@pytest.mark.parametrize("lam", LAMS)
def test_reference_gradient_is_target_minus_softmax(lam):
    """With q stop-gradient, d s_i / d z_i = t_i - p_i: the identity every kernel's backward relies on."""
    hidden, weight, labels = make_problem(torch.float64)
    k = 5
    z = (hidden @ weight.t()).requires_grad_()
    active = labels != -100
    y = torch.where(active, labels, 0)
    logp = torch.log_softmax(z, -1)
    score = logp.gather(1, y[:, None]).squeeze(1)
    if lam:
        tv, ti = torch_rows.stable_topk(z.detach(), k)
        score = (1 - lam) * score + lam * (torch.softmax(tv, -1) * logp.gather(1, ti)).sum(-1)
    (dz,) = torch.autograd.grad(torch.where(active, score, 0).sum(), z)
    want = z.detach().clone()
    torch_rows.scores_rows(want, labels, topk=k, lam=lam, ignore_index=-100, grad=torch.ones(N, dtype=z.dtype))
    torch.testing.assert_close(dz, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("lam", LAMS)
def test_torch_impl_matches_reference_fp64(k, lam):
    hidden, weight, labels = make_problem(torch.float64)
    upstream = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = grads(lambda h, w: bk.naive_token_scores(h, w, labels, topk=k, lam=lam), hidden, weight, upstream)
    out = grads(lambda h, w: bk.linear_token_scores(h, w, labels, topk=k, lam=lam, impl="torch", chunk_size=8),
                hidden, weight, upstream)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("lam", LAMS)
def test_triton_matches_torch(k, lam, triton_device):
    hidden, weight, labels = make_problem(torch.float32, triton_device)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(triton_device)
    ref = grads(lambda h, w: bk.linear_token_scores(h, w, labels, topk=k, lam=lam, impl="torch", chunk_size=8),
                hidden, weight, upstream)
    out = grads(lambda h, w: bk.linear_token_scores(h, w, labels, topk=k, lam=lam, impl="triton", chunk_size=8),
                hidden, weight, upstream)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ("torch", "triton"))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("lam", LAMS)
def test_weighted_sum_matches_scores(impl, k, lam, triton_device):
    """The three-GEMM path (gradients in the forward) equals weights * linear_token_scores, values and grads."""
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, labels = make_problem(torch.float32, device)
    w = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(device)
    ref = grads(lambda h, wt: bk.linear_token_scores(h, wt, labels, topk=k, lam=lam, impl="torch"),
                hidden, weight, w)
    h = hidden.clone().requires_grad_()
    wt = weight.clone().requires_grad_()
    loss, scores = bk.linear_weighted_score_sum(h, wt, labels, w, topk=k, lam=lam, impl=impl, chunk_size=8)
    assert not scores.requires_grad
    (3.0 * loss).backward()  # a non-unit upstream gradient is applied to the stored gradients
    torch.testing.assert_close(loss, (ref[0] * w).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, 3.0 * ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wt.grad, 3.0 * ref[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", (1, 5, 20, 64))
@pytest.mark.parametrize("block_v", (64, 1024))
def test_triton_rows_with_heavy_ties_and_many_tiles(k, block_v, triton_device):
    """Integer-valued logits tie everywhere, the k-boundary included; small tiles force cross-tile merges."""
    from bs_kernels import triton_rows

    g = torch.Generator().manual_seed(3)
    z = torch.randint(-3, 4, (9, V), generator=g).float()
    z[4] = torch.arange(V, dtype=torch.float32) / V  # ascending: every tile beats the buffer (worst case)
    z[5] = 0.0  # all equal
    labels = torch.randint(0, V, (9,), generator=g)
    labels[2] = -100
    labels[3] = int(torch.sort(z[3], descending=True, stable=True).indices[0])
    upstream = torch.randn(9, generator=g)
    want_z, got_z = z.clone(), z.clone().to(triton_device)
    want = torch_rows.scores_rows(want_z, labels, topk=k, lam=0.2, ignore_index=-100, grad=upstream,
                                  save_stats=True)
    got = triton_rows.scores_rows(got_z, labels.to(triton_device), topk=k, lam=0.2, ignore_index=-100,
                                  grad=upstream.to(triton_device), save_stats=True, block_v=block_v)
    active = labels != -100
    for a, b in zip(got[:2], want[:2]):  # scores and log-sum-exp
        torch.testing.assert_close(a.cpu()[active], b[active], rtol=1e-5, atol=1e-6)
    # the top-k set comes back in no particular order: compare (index, q) pairs sorted by index
    got_i, order = got[2].cpu().sort(dim=-1)
    want_i, want_order = want[2].sort(dim=-1)
    assert torch.equal(got_i[active], want_i[active])
    torch.testing.assert_close(got[3].cpu().gather(1, order)[active], want[3].gather(1, want_order)[active])
    torch.testing.assert_close(got_z.cpu(), want_z, rtol=1e-5, atol=1e-6)
    assert torch.all(got_z.cpu()[2] == 0)  # the ignored row's gradient is exactly zero


def test_lambda0_equals_cross_entropy(triton_device):
    hidden, weight, labels = make_problem(torch.float32, triton_device)
    for impl in ("torch", "triton"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        h2 = hidden.clone().requires_grad_()
        w2 = weight.clone().requires_grad_()
        ours = bk.linear_cross_entropy(h, w, labels, impl=impl)
        want = F.cross_entropy(h2 @ w2.t(), labels, ignore_index=-100)
        ours.backward()
        want.backward()
        torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)
        per_token = bk.linear_token_scores(hidden, weight, labels, lam=0.0, impl=impl)
        torch.testing.assert_close(-per_token, F.cross_entropy(hidden @ weight.t(), labels, reduction="none"),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ("torch", "triton"))
def test_bst_loss_reference_reduction(impl, triton_device):
    """bst_loss on [B, T, D] with shift = mean over answer tokens per sequence, then mean over sequences."""
    device = triton_device if impl == "triton" else "cpu"
    B, T = 3, 9
    hidden, weight, _ = make_problem(torch.float32, device, n=B * T)
    hidden = hidden.view(B, T, D)
    labels = torch.full((B, T), -100, dtype=torch.long)
    labels[0, 4:] = torch.arange(5) + 3
    labels[1, 2:6] = torch.arange(4) + 100
    # sequence 2 has no answer token after the shift: it must not enter the mean over sequences
    labels[2, 0] = 17
    labels = labels.to(device)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = bk.bst_loss(h, w, labels, lam=0.2, topk=5, impl=impl)
    loss.backward()

    h2 = hidden.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    per_seq = []
    for b in range(2):
        s = bk.naive_token_scores(h2[b, :-1], w2, labels[b, 1:], topk=5, lam=0.2)
        per_seq.append(s.sum() / (labels[b, 1:] != -100).sum())
    want = torch.stack(per_seq).mean()
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)
    # lam = 0 is exactly gradient ascent with the same reduction
    torch.testing.assert_close(bk.bst_loss(hidden, weight, labels, lam=0.0, topk=5, impl=impl),
                               bk.ga_loss(hidden, weight, labels, impl=impl))


def test_frozen_inputs_get_no_gradient():
    hidden, weight, labels = make_problem(torch.float32)
    h = hidden.clone().requires_grad_()
    loss, _ = bk.linear_weighted_score_sum(h, weight, labels, torch.ones(N), topk=5, lam=0.2, impl="torch")
    loss.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    w = weight.clone().requires_grad_()
    bk.linear_token_scores(hidden, w, labels, topk=5, lam=0.2, impl="torch").sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_fused_backward_runs_once():
    hidden, weight, labels = make_problem(torch.float32)
    h = hidden.clone().requires_grad_()
    loss, _ = bk.linear_weighted_score_sum(h, weight, labels, torch.ones(N), impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def test_never_allocates_full_logits():
    """No tensor of N x V elements is ever created, forward or backward, on either path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    MaxNumel.biggest = max(MaxNumel.biggest, t.numel())
            return out

    n, chunk = 96, 8
    hidden, weight, labels = make_problem(torch.float32, n=n)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with MaxNumel():
        bk.linear_token_scores(h, w, labels, topk=20, lam=0.2, impl="torch", chunk_size=chunk).sum().backward()
        loss, _ = bk.linear_weighted_score_sum(h, w, labels, torch.ones(n), topk=20, lam=0.2, impl="torch",
                                               chunk_size=chunk)
        loss.backward()
    # the largest tensors are the gradients themselves ([V, D]) or one chunk of logits ([chunk, V])
    assert MaxNumel.biggest <= max(V * D, n * D, chunk * V) < n * V


def test_low_precision_error_bounded_by_torch_same_dtype():
    """bf16 on the torch path: |ours - fp64 truth| <= |plain torch bf16 - fp64 truth| + tol (CCE's criterion)."""
    hidden, weight, labels = make_problem(torch.float64)
    truth = bk.naive_token_scores(hidden, weight, labels, topk=5, lam=0.2)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    plain = bk.naive_token_scores(hb, wb, labels, topk=5, lam=0.2).double()
    ours = bk.linear_token_scores(hb, wb, labels, topk=5, lam=0.2, impl="torch").double()
    assert ours.dtype == torch.float64
    assert (ours - truth).abs().max() <= (plain - truth).abs().max() + 1e-2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN in, by design
def test_all_nan_row_stays_in_its_row(triton_device):
    """A row that never fills the top-k buffer (all NaN, e.g. after divergence) must not index past its row."""
    from bs_kernels import triton_rows

    z = torch.randn(3, 64).to(triton_device)
    z[1] = float("nan")
    labels = torch.tensor([1, 2, 3], device=triton_device)
    grad = torch.ones(3, device=triton_device)
    s, _, topi, _ = triton_rows.scores_rows(z, labels, topk=4, lam=0.2, ignore_index=-100, grad=grad,
                                            save_stats=True)
    assert bool((topi >= 0).all() and (topi < 64).all())
    assert torch.isnan(s[1]) and torch.isfinite(s[[0, 2]]).all()
    assert torch.isfinite(z[[0, 2]]).all()  # neighbours untouched


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_out_of_range_label_poisons_its_gradient(triton_device):
    from bs_kernels import triton_rows

    z = torch.randn(2, 50).to(triton_device)
    labels = torch.tensor([3, 77], device=triton_device)  # 77 >= V: only reachable on CUDA, where nothing checks
    s, *_ = triton_rows.scores_rows(z, labels, topk=5, lam=0.2, ignore_index=-100,
                                    grad=torch.ones(2, device=triton_device))
    assert torch.isnan(s[1]) and torch.isnan(z[1]).all() and torch.isfinite(z[0]).all()
