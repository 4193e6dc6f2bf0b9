"""The fused teacher KL / soft-target CE against its references: values AND gradients w.r.t. the student's hidden
and weight.

Layers of checks, each against something simpler than itself:
* the full-logits reference ``naive_teacher_kl`` against the formula written out row by row in float64 (and
  against ``F.kl_div``);
* the chunked PyTorch path against the reference in float64;
* the Triton kernels (CPU interpreter here, CUDA when present) against the PyTorch path in float32,
at the awkward shape N = 37, D = 24, teacher D = 40, V = 1031, chunks of 8 rows (not dividing N), ~20% ignored rows,
with the UNDIAL adjustment gamma and a temperature. A GPU tier (marked ``gpu``, skipped without CUDA) checks bf16 /
fp32 at a real vocabulary against plain PyTorch's own error, and the memory bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bs_kernels as bk
from bs_kernels import teacher_kl

N, D, DT, V = 37, 24, 40, 1031
KINDS = ("kl", "ce")
# (gamma, temperature): plain; UNDIAL's adjustment (its TOFU default is 10, a large one: the label's teacher
# probability all but vanishes); adjustment and temperature together.
SETTINGS = ((0.0, 1.0), (10.0, 1.0), (2.5, 2.0))


def make_problem(dtype=torch.float32, device="cpu", seed=0, n=N, d=D, dt=DT, v=V):
    """Student and teacher heads of different widths whose distributions overlap (the teacher is a perturbed copy
    of the student through a random projection), labels at the teacher's argmax and elsewhere, ~20% ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    proj = torch.randn(d, dt, generator=g, dtype=torch.float64) / d**0.5
    t_hidden = hidden @ proj + 0.3 * torch.randn(n, dt, generator=g, dtype=torch.float64)
    t_weight = weight @ torch.linalg.pinv(proj).t() + 0.1 * torch.randn(v, dt, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1::3] = (t_hidden @ t_weight.t()).argmax(-1)[1::3]  # the teacher's favourite: gamma matters most there
    ignored = torch.rand(n, generator=g) < 0.2
    ignored[:2] = False
    labels[ignored] = -100
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return cast(hidden), cast(weight), cast(t_hidden), cast(t_weight), labels.to(device)


def grads(fn, hidden, weight, upstream):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w)
    dh, dw = torch.autograd.grad((out * upstream).sum(), (h, w))
    return out.detach(), dh, dw


def formula_row(zs: torch.Tensor, zt: torch.Tensor, y: int | None, kind: str, gamma: float, temp: float) -> float:
    """One row written out literally from the definition (float64): KL(p_t || p_s) or -sum p_t log p_s."""
    zt = zt.clone()
    if y is not None:
        zt[y] -= gamma
    p_s = torch.exp(zs / temp) / torch.exp(zs / temp).sum()
    p_t = torch.exp(zt / temp) / torch.exp(zt / temp).sum()
    if kind == "kl":
        return float(sum(p_t[v] * (torch.log(p_t[v]) - torch.log(p_s[v])) for v in range(zs.numel())))
    return float(-sum(p_t[v] * torch.log(p_s[v]) for v in range(zs.numel())))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma, temp", SETTINGS)
def test_reference_equals_formula_fp64(kind, gamma, temp):
    hidden, weight, th, tw, labels = make_problem(torch.float64, n=9, v=97)
    ref = bk.naive_teacher_kl(hidden, weight, th, tw, labels, kind=kind, gamma=gamma, temperature=temp)
    zs, zt = hidden @ weight.t(), th @ tw.t()
    for i in range(9):
        want = 0.0 if labels[i] == -100 else formula_row(zs[i], zt[i], int(labels[i]), kind, gamma, temp)
        assert abs(float(ref[i]) - want) < 1e-12, (i, float(ref[i]), want)


def test_reference_kl_equals_torch_kl_div():
    hidden, weight, th, tw, _ = make_problem(torch.float64)
    ref = bk.naive_teacher_kl(hidden, weight, th, tw)
    want = F.kl_div(torch.log_softmax(hidden @ weight.t(), -1), torch.log_softmax(th @ tw.t(), -1),
                    reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma, temp", SETTINGS)
def test_reference_gradient_is_student_minus_teacher(kind, gamma, temp):
    """d value_i / d z_s,i = (p_s - p_t) / T for both kinds: the identity every kernel's backward relies on."""
    hidden, weight, th, tw, labels = make_problem(torch.float64)
    zs = (hidden @ weight.t()).requires_grad_()
    # the reference on logits: hidden = z_s, weight = identity over a V-wide "hidden"
    ref = bk.naive_teacher_kl(zs, torch.eye(V, dtype=torch.float64), th, tw, labels, kind=kind, gamma=gamma,
                              temperature=temp)
    (dz,) = torch.autograd.grad(ref.sum(), zs)
    want = zs.detach().clone()
    teacher_kl.kl_rows(want, th @ tw.t(), labels, kind=kind, gamma=gamma, inv_temp=1 / temp, ignore_index=-100,
                       grad=torch.ones(N, dtype=torch.float64))
    torch.testing.assert_close(dz, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma, temp", SETTINGS)
@pytest.mark.parametrize("with_labels", (True, False))
def test_torch_impl_matches_reference_fp64(kind, gamma, temp, with_labels):
    hidden, weight, th, tw, labels = make_problem(torch.float64)
    labels = labels if with_labels else None
    gamma = gamma if with_labels else 0.0
    upstream = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    opts = dict(kind=kind, gamma=gamma, temperature=temp)
    ref = grads(lambda h, w: bk.naive_teacher_kl(h, w, th, tw, labels, **opts), hidden, weight, upstream)
    out = grads(lambda h, w: bk.linear_teacher_kl(h, w, th, tw, labels, **opts, impl="torch", chunk_size=8),
                hidden, weight, upstream)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma, temp", SETTINGS)
def test_triton_matches_torch(kind, gamma, temp, triton_device):
    hidden, weight, th, tw, labels = make_problem(torch.float32, triton_device)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(triton_device)
    opts = dict(kind=kind, gamma=gamma, temperature=temp, chunk_size=8)
    ref = grads(lambda h, w: bk.linear_teacher_kl(h, w, th, tw, labels, **opts, impl="torch"), hidden, weight,
                upstream)
    out = grads(lambda h, w: bk.linear_teacher_kl(h, w, th, tw, labels, **opts, impl="triton"), hidden, weight,
                upstream)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_triton_without_labels_matches_torch(kind, triton_device):
    """labels=None scores every row (the kernels' HAS_LABELS=False variant), at a temperature."""
    hidden, weight, th, tw, _ = make_problem(torch.float32, triton_device)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(triton_device)
    opts = dict(kind=kind, temperature=2.0, chunk_size=8)
    ref = grads(lambda h, w: bk.linear_teacher_kl(h, w, th, tw, **opts, impl="torch"), hidden, weight, upstream)
    out = grads(lambda h, w: bk.linear_teacher_kl(h, w, th, tw, **opts, impl="triton"), hidden, weight, upstream)
    assert torch.all(ref[0] != 0)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ("torch", "triton"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma, temp", SETTINGS[::2])
def test_weighted_sum_matches_values(impl, kind, gamma, temp, triton_device):
    """The four-GEMM path (gradients in the forward) equals weights * linear_teacher_kl, values and gradients."""
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, th, tw, labels = make_problem(torch.float32, device)
    w = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(device)
    opts = dict(kind=kind, gamma=gamma, temperature=temp)
    ref = grads(lambda h, wt: bk.linear_teacher_kl(h, wt, th, tw, labels, **opts, impl="torch"), hidden, weight, w)
    h = hidden.clone().requires_grad_()
    wt = weight.clone().requires_grad_()
    loss, values = bk.linear_weighted_teacher_kl_sum(h, wt, th, tw, w, labels, **opts, impl=impl, chunk_size=8)
    assert not values.requires_grad
    (3.0 * loss).backward()  # a non-unit upstream gradient is applied to the stored gradients
    torch.testing.assert_close(loss, (ref[0] * w).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, 3.0 * ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wt.grad, 3.0 * ref[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_v", (64,))
def test_triton_rows_across_many_tiles(kind, block_v, triton_device):
    """Small tiles force the online rescaling: one row's teacher maximum sits in the last tile, one row's student
    maximum in the first; the label (adjusted by gamma) is in a middle tile; V is not a multiple of the tile."""
    from bs_kernels import triton_teacher_kl

    g = torch.Generator().manual_seed(3)
    zs = 3 * torch.randn(6, V, generator=g, dtype=torch.float64)
    zt = 3 * torch.randn(6, V, generator=g, dtype=torch.float64)
    zt[0] = torch.arange(V, dtype=torch.float64) / 50  # ascending: every tile raises the teacher's max
    zs[1, 0] = 40.0
    labels = torch.tensor([500, 3, -100, V - 1, 0, 700])
    upstream = torch.randn(6, generator=g, dtype=torch.float64)
    opts = dict(kind=kind, gamma=4.0, inv_temp=0.5, ignore_index=-100)
    want_zs = zs.clone()
    want = teacher_kl.kl_rows(want_zs, zt.clone(), labels, **opts, grad=upstream, save_stats=True)
    got_zs, got_zt = zs.float().to(triton_device), zt.float().to(triton_device)
    got = triton_teacher_kl.kl_rows(got_zs, got_zt, labels.to(triton_device), **opts,
                                    grad=upstream.float().to(triton_device), save_stats=True, block_v=block_v)
    active = labels != -100
    for a, b in zip(got, want):  # values and both log-sum-exps
        torch.testing.assert_close(a.cpu().double()[active], b[active], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_zs.cpu().double(), want_zs, rtol=1e-5, atol=1e-6)
    assert torch.all(got_zs.cpu()[2] == 0)  # the ignored row's gradient is exactly zero
    assert torch.equal(got_zt.cpu(), zt.float())  # the teacher chunk is only read
    # the backward-from-statistics kernel rebuilds the same gradient
    again = zs.float().to(triton_device)
    triton_teacher_kl.kl_grad_rows_from_stats(again, got_zt, labels.to(triton_device),
                                              upstream.float().to(triton_device), got[1], got[2], gamma=4.0,
                                              inv_temp=0.5, ignore_index=-100, block_v=block_v)
    torch.testing.assert_close(again.cpu().double(), want_zs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ("torch", "triton"))
def test_student_equal_to_teacher_gives_zero(impl, triton_device):
    """KL of a head against itself is 0 with a zero gradient (not a difference of two rounded entropies), and the
    soft-target CE is then the entropy of the shared distribution."""
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, _, _, labels = make_problem(torch.float32, device)
    h = hidden.clone().requires_grad_()
    loss, kl = bk.linear_weighted_teacher_kl_sum(h, weight, hidden, weight, torch.ones(N, device=device), labels,
                                                 impl=impl)
    loss.backward()
    assert float(kl.abs().max()) < 1e-5
    assert float(h.grad.abs().max()) < 1e-6
    ce = bk.linear_teacher_kl(hidden, weight, hidden, weight, labels, kind="ce", impl=impl)
    logp = torch.log_softmax((hidden @ weight.t()).double(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    entropy[labels == -100] = 0
    torch.testing.assert_close(ce.double(), entropy, rtol=1e-5, atol=1e-5)


def test_gamma_moves_teacher_mass_off_the_label():
    """With UNDIAL's adjustment the target puts less mass on the label, so the student is pulled *down* there: the
    gradient of the KL w.r.t. the student's label logit, (p_s - p_t)[y], grows with gamma."""
    hidden, weight, _, _, labels = make_problem(torch.float64)
    active = labels != -100
    y = torch.where(active, labels, 0)
    slopes = []
    for gamma in (0.0, 1.0, 10.0):
        z = (hidden @ weight.t()).requires_grad_()
        kl = bk.linear_teacher_kl(z, torch.eye(V, dtype=torch.float64), hidden, weight, labels, gamma=gamma,
                                  impl="torch")
        (dz,) = torch.autograd.grad(kl.sum(), z)
        slopes.append(dz.gather(1, y[:, None]).squeeze(1)[active])
    assert torch.all(slopes[0].abs() < 1e-10)  # student == teacher: no pull at all
    assert torch.all(slopes[1] > 0) and torch.all(slopes[2] > slopes[1])


@pytest.mark.parametrize("impl", ("torch", "triton"))
def test_ignored_rows_score_zero_and_get_no_gradient(impl, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, th, tw, labels = make_problem(torch.float32, device)
    ignored = labels == -100
    assert ignored.any()
    h = hidden.clone().requires_grad_()
    out = bk.linear_teacher_kl(h, weight, th, tw, labels, gamma=2.0, impl=impl, chunk_size=8)
    out.sum().backward()
    assert torch.all(out[ignored] == 0) and torch.all(out[~ignored] > 0)
    assert torch.all(h.grad[ignored] == 0) and torch.all(h.grad[~ignored].abs().sum(-1) > 0)


def test_teacher_gets_no_gradient():
    hidden, weight, th, tw, labels = make_problem(torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    th, tw = th.clone().requires_grad_(), tw.clone().requires_grad_()
    bk.linear_teacher_kl(h, w, th, tw, labels, impl="torch").sum().backward()
    assert th.grad is None and tw.grad is None
    assert h.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_fused_backward_runs_once():
    hidden, weight, th, tw, labels = make_problem(torch.float32)
    h = hidden.clone().requires_grad_()
    loss, _ = bk.linear_weighted_teacher_kl_sum(h, weight, th, tw, torch.ones(N), labels, impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def test_never_allocates_full_logits():
    """No tensor of N x V elements is ever created, forward or backward, on either entry point of the torch path."""
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
    hidden, weight, th, tw, labels = make_problem(torch.float32, n=n)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with MaxNumel():
        bk.linear_teacher_kl(h, w, th, tw, labels, gamma=1.0, temperature=2.0, impl="torch",
                             chunk_size=chunk).sum().backward()
        loss, _ = bk.linear_weighted_teacher_kl_sum(h, w, th, tw, torch.ones(n), labels, kind="ce", impl="torch",
                                                    chunk_size=chunk)
        loss.backward()
    # the largest tensors are the gradients ([V, D]), the teacher's weight ([V, D_t]) or one chunk ([chunk, V])
    assert MaxNumel.biggest <= max(V * DT, n * DT, chunk * V) < n * V


def test_low_precision_error_bounded_by_torch_same_dtype():
    """bf16 on the torch path: |ours - fp64 truth| <= |plain torch bf16 - fp64 truth| + tol (CCE's criterion)."""
    hidden, weight, th, tw, labels = make_problem(torch.float64)
    truth = bk.naive_teacher_kl(hidden, weight, th, tw, labels, gamma=2.0)
    args = [t.bfloat16() for t in (hidden, weight, th, tw)]
    plain = bk.naive_teacher_kl(*args, labels, gamma=2.0).double()
    ours = bk.linear_teacher_kl(*args, labels, gamma=2.0, impl="torch").double()
    assert (ours - truth).abs().max() <= (plain - truth).abs().max() + 1e-2


# ---- bad arguments: a ValueError naming the argument, before any work -------------------------------------------

def _inputs(**over):
    base = dict(hidden=torch.randn(6, 8), weight=torch.randn(50, 8), teacher_hidden=torch.randn(6, 12),
                teacher_weight=torch.randn(50, 12), labels=torch.randint(0, 50, (6,)))
    base.update(over)
    return base


@pytest.mark.parametrize("over, match", [
    (dict(kind="js"), "kind"),
    (dict(kind=None), "kind"),
    (dict(gamma=float("nan")), "gamma"),
    (dict(gamma="1"), "gamma"),
    (dict(gamma=1.0, labels=None), "labels must be given"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(impl="cuda"), "impl"),
    (dict(ignore_index=None), "ignore_index"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(hidden=torch.randn(6, 9)), "D="),
    (dict(teacher_hidden=torch.randn(6, 13)), "teacher_hidden has D=13"),
    (dict(teacher_weight=torch.randn(51, 12)), "V=51"),
    (dict(teacher_hidden=torch.randn(7, 12)), "N=7"),
    (dict(hidden=torch.randn(2, 6, 8)), "hidden must be 2-D"),
    (dict(teacher_weight=torch.randn(50)), "teacher_weight must be 2-D"),
    (dict(teacher_hidden=torch.randn(6, 12, dtype=torch.float64)), "teacher_hidden dtype"),
    (dict(weight=torch.randn(50, 8).bfloat16()), "weight dtype"),
    (dict(teacher_weight=torch.randn(50, 12, device="meta")), "teacher_weight is on meta"),
    (dict(labels=torch.zeros(6)), "labels must be int64"),
    (dict(labels=torch.randint(0, 50, (5,))), "labels must have shape"),
    (dict(labels=torch.tensor([0, 1, 50, 2, 3, 4])), r"labels\[2\]=50"),
    (dict(teacher_hidden=[[0.0]]), "teacher_hidden must be a torch.Tensor"),
])
def test_bad_arguments(over, match):
    tensors = _inputs(**{k: v for k, v in over.items() if k in _inputs()})
    opts = {"impl": "torch", **{k: v for k, v in over.items() if k not in _inputs()}}
    with pytest.raises(ValueError, match=match):
        bk.linear_teacher_kl(**tensors, **opts)


@pytest.mark.parametrize("w, match", [
    (torch.ones(5), "token_weights must have shape"),
    (torch.ones(6, dtype=torch.int64), "floating point"),
])
def test_bad_token_weights(w, match):
    with pytest.raises(ValueError, match=match):
        bk.linear_weighted_teacher_kl_sum(**{**_inputs(), "token_weights": w}, impl="torch")


# ---- GPU tier: a real vocabulary in bf16 / fp32, and the memory bound (skipped without CUDA) -------------------

GPU_D, GPU_DT, GPU_V = 2048, 1024, 128256


def gpu_problem(n, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, GPU_D, device="cuda", generator=g)
    weight = torch.randn(GPU_V, GPU_D, device="cuda", generator=g) / GPU_D**0.5 * 4  # a realistic logit spread
    t_hidden = torch.randn(n, GPU_DT, device="cuda", generator=g)
    t_weight = torch.randn(GPU_V, GPU_DT, device="cuda", generator=g) / GPU_DT**0.5 * 4
    labels = torch.randint(0, GPU_V, (n,), device="cuda", generator=g)
    labels[torch.rand(n, device="cuda", generator=g) < 0.2] = -100
    return *(t.to(dtype) for t in (hidden, weight, t_hidden, t_weight)), labels


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_error_within_torch_same_dtype(dtype):
    """|ours - fp64 truth| <= |plain torch same dtype - fp64 truth| + tol, for the loss and both gradients."""
    hidden, weight, th, tw, labels = gpu_problem(512, dtype)
    w = (labels != -100).float() / (labels != -100).sum()

    def naive(h, wt, t_h, t_w):
        return (bk.naive_teacher_kl(h, wt, t_h, t_w, labels, gamma=2.0) * w.to(torch.promote_types(h.dtype,
                                                                                              torch.float32))).sum()

    def run(fn, *tensors):
        h, wt = (t.detach().clone().requires_grad_() for t in tensors[:2])
        loss = fn(h, wt, *tensors[2:])
        return [loss.double(), *(g.double() for g in torch.autograd.grad(loss, (h, wt)))]

    truth = run(naive, *(t.double() for t in (hidden, weight, th, tw)))
    plain = run(naive, hidden, weight, th, tw)
    fused = run(lambda h, wt, t_h, t_w: bk.linear_weighted_teacher_kl_sum(h, wt, t_h, t_w, w, labels, gamma=2.0)[0],
                hidden, weight, th, tw)
    recompute = run(lambda h, wt, t_h, t_w: (bk.linear_teacher_kl(h, wt, t_h, t_w, labels, gamma=2.0) * w).sum(),
                    hidden, weight, th, tw)
    for name, ours in (("fused", fused), ("recompute", recompute)):
        for what, o, p, t in zip(("loss", "dhidden", "dweight"), ours, plain, truth):
            ours_err, torch_err = (o - t).abs().max().item(), (p - t).abs().max().item()
            assert ours_err <= torch_err + 1e-3 * t.abs().max().item() + 1e-6, (name, what, ours_err, torch_err)


@pytest.mark.gpu
def test_gpu_peak_memory_is_gradients_plus_one_chunk():
    """Both [C, V] buffers together stay within DEFAULT_CHUNK_BYTES; beyond the gradients: that plus O(N)."""
    hidden, weight, th, tw, labels = gpu_problem(8192, torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    w = (labels != -100).float() / (labels != -100).sum()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = bk.linear_weighted_teacher_kl_sum(hidden, weight, th, tw, w, labels)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    torch.cuda.synchronize()
    beyond = torch.cuda.max_memory_allocated() - base - dh.numel() * 2 - dw.numel() * 2
    assert beyond <= 128 * 2**20, f"{beyond / 2**20:.1f} MiB beyond the gradients"


@pytest.mark.gpu
def test_gpu_out_of_range_label_gives_nan_not_a_fault():
    hidden, weight, th, tw, labels = gpu_problem(64, torch.float32)
    labels[:] = 7
    labels[3] = GPU_V + 5  # unchecked on CUDA (a host sync): the kernel must not read out of bounds
    out = bk.linear_teacher_kl(hidden, weight, th, tw, labels, gamma=1.0)
    assert torch.isnan(out[3]) and torch.isfinite(out[torch.arange(64, device="cuda") != 3]).all()
