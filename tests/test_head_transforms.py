"""Heads whose logits are not plain ``h W^T``: a bias, a logit scale, Gemma-2's final soft-capping (``head.py``).

Both primitives (per-token scores and the teacher KL) on both implementations, values AND gradients w.r.t. hidden,
weight and bias, each against something simpler than itself:
* the naive reference with the transform against the score formula on ``c tanh(s (h W^T + b) / c)`` in float64;
* the chunked PyTorch path against the naive reference in float64 (and bf16 against plain bf16's own error);
* the Triton kernels (CPU interpreter here, CUDA when present) against the PyTorch path in float32;
* top-k on the capped logits: saturation ties distinct raw logits, and the tie goes to the lower index as on z.
Shapes are small and awkward (N = 23, D = 16, V = 301, chunks of 8 rows) to keep the interpreter quick.
"""

from __future__ import annotations

import pytest
import torch

import bs_kernels as bk

N, D, V = 23, 16, 301
# (bias, logit_scale, softcap): Gemma-2 style (a cap that bites: logits here reach about +-4), a Cohere-style scale,
# a bias with a scale and a cap together, and the plain head (nothing changes).
HEADS = {"cap": (False, 1.0, 2.0), "scale": (False, 0.625, None), "all": (True, 1.5, 3.0), "plain": (False, 1.0, None)}


def make_problem(dtype=torch.float64, device="cpu", with_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = 1.2 * torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    bias = 0.5 * torch.randn(V, generator=g, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1::3] = (hidden @ weight.t()).argmax(-1)[1::3]  # inside every top-k
    labels[torch.rand(N, generator=g) < 0.2] = -100
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), labels.to(device)


def head_kwargs(name, bias):
    with_bias, scale, cap = HEADS[name]
    return {"bias": bias if with_bias else None, "logit_scale": scale, "softcap": cap}


def grads(fn, tensors, upstream):
    """(output, gradients of <output, upstream> w.r.t. each non-None tensor)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad((out * upstream).sum(), [t for t in leaves if t is not None]))


def close(got, want, **tol):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_reference_scores_the_transformed_logits_fp64():
    """naive_token_scores with a head equals the score formula on z = c tanh(s (h W^T + b) / c), row by row."""
    hidden, weight, bias, labels = make_problem()
    k, lam, s, c = 5, 0.2, 1.5, 3.0
    got = bk.naive_token_scores(hidden, weight, labels, topk=k, lam=lam, bias=bias, logit_scale=s, softcap=c)
    z = c * torch.tanh(s * (hidden @ weight.t() + bias) / c)
    for i in range(N):
        if labels[i] == -100:
            assert float(got[i]) == 0.0
            continue
        logp = z[i] - torch.logsumexp(z[i], 0)
        ranked = sorted(range(V), key=lambda j: (-float(z[i, j]), j))[:k]
        q = torch.softmax(z[i, ranked], 0)
        want = (1 - lam) * logp[labels[i]] + lam * (q * logp[ranked]).sum()
        assert abs(float(got[i]) - float(want)) < 1e-12


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("k, lam", [(0, 0.0), (5, 0.2), (5, 1.0)])
def test_torch_path_matches_reference_fp64(head, k, lam):
    hidden, weight, bias, labels = make_problem()
    kw = head_kwargs(head, bias)
    up = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tensors = (hidden, weight, kw.pop("bias"))
    ref = grads(lambda h, w, b: bk.naive_token_scores(h, w, labels, topk=k, lam=lam, bias=b, **kw), tensors, up)
    out = grads(lambda h, w, b: bk.linear_token_scores(h, w, labels, topk=k, lam=lam, impl="torch", chunk_size=8,
                                                       bias=b, **kw), tensors, up)
    close(out, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("head", ("cap", "all"))
@pytest.mark.parametrize("impl", ("torch", "triton"))
def test_weighted_sum_matches_scores_with_a_head(head, impl, triton_device):
    """The three-GEMM path (gradients in the forward, bias gradient included) equals weights * scores."""
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, bias, labels = make_problem(torch.float32, device)
    kw = head_kwargs(head, bias)
    w = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(device)
    b = kw.pop("bias")
    ref = grads(lambda h, wt, bb: bk.linear_token_scores(h, wt, labels, topk=5, lam=0.2, impl="torch", bias=bb, **kw),
                (hidden, weight, b), w)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b) if t is not None]
    loss, scores = bk.linear_weighted_score_sum(*leaves[:2], labels, w, topk=5, lam=0.2, impl=impl, chunk_size=8,
                                                bias=leaves[2] if b is not None else None, **kw)
    (2.0 * loss).backward()
    torch.testing.assert_close(scores, ref[0], rtol=1e-5, atol=1e-5)
    close([t.grad for t in leaves], [2.0 * g for g in ref[1:]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ("cap", "scale", "all"))
@pytest.mark.parametrize("k, lam", [(0, 0.0), (5, 0.2)])
def test_triton_matches_torch_with_a_head(head, k, lam, triton_device):
    hidden, weight, bias, labels = make_problem(torch.float32, triton_device)
    kw = head_kwargs(head, bias)
    up = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(triton_device)
    tensors = (hidden, weight, kw.pop("bias"))
    ref = grads(lambda h, w, b: bk.linear_token_scores(h, w, labels, topk=k, lam=lam, impl="torch", chunk_size=8,
                                                       bias=b, **kw), tensors, up)
    out = grads(lambda h, w, b: bk.linear_token_scores(h, w, labels, topk=k, lam=lam, impl="triton", chunk_size=8,
                                                       bias=b, **kw), tensors, up)
    close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ("torch", "triton"))
def test_topk_is_taken_on_the_capped_logits(impl, triton_device):
    """Raw logits 40, 60 and 80 all saturate to exactly c under a cap of 1: on z they tie, so the top-2 are the two
    lowest indices of the three (as the naive reference, which ranks z), not the two largest raw logits."""
    device = triton_device if impl == "triton" else "cpu"
    hidden = torch.zeros(2, 2)
    hidden[:, 0] = 1.0
    weight = torch.zeros(V, 2)
    weight[:, 1] = torch.linspace(-1, 1, V)  # distinct, unsaturated everywhere else
    weight[[250, 100, 30], 0] = torch.tensor([80.0, 60.0, 40.0])
    hidden[1, 1] = 1.0
    labels = torch.tensor([7, 250])
    hidden, weight, labels = hidden.to(device), weight.to(device), labels.to(device)
    kw = {"topk": 2, "lam": 0.5, "softcap": 1.0}
    up = torch.tensor([1.0, -0.5], device=device)
    ref = grads(lambda h, w: bk.naive_token_scores(h, w, labels, **kw), (hidden, weight), up)
    out = grads(lambda h, w: bk.linear_token_scores(h, w, labels, impl=impl, **kw), (hidden, weight), up)
    close(out, ref, rtol=1e-5, atol=1e-6)
    # the soft target put mass on rows 30 and 100 (the tied lowest indices), none on 250 beyond its label share
    z = bk.transform_logits(hidden.cpu() @ weight.cpu().t(), softcap=1.0)
    assert float(z[0, 30]) == float(z[0, 100]) == float(z[0, 250]) == 1.0


def test_bf16_error_bounded_by_plain_bf16_with_a_cap():
    """bf16 on the torch path with a cap: |ours - fp64 truth| <= |plain torch bf16 - fp64 truth| + tol."""
    hidden, weight, bias, labels = make_problem()
    kw = {"topk": 5, "lam": 0.2, "logit_scale": 1.5, "softcap": 3.0}
    truth = bk.naive_token_scores(hidden, weight, labels, bias=bias, **kw)
    hb, wb, bb = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    plain = bk.naive_token_scores(hb, wb, labels, bias=bb, **kw).double()
    ours = bk.linear_token_scores(hb, wb, labels, impl="torch", bias=bb, **kw).double()
    assert (ours - truth).abs().max() <= (plain - truth).abs().max() + 1e-2


# ---- the teacher KL with transformed heads ------------------------------------------------------------------------


def teacher_problem(dtype=torch.float64, device="cpu"):
    hidden, weight, bias, labels = make_problem(dtype, device)
    g = torch.Generator().manual_seed(7)
    t_hidden = (hidden.double().cpu() + 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)).to(dtype)
    t_bias = (bias.double().cpu() + 0.2 * torch.randn(V, generator=g, dtype=torch.float64)).to(dtype)
    return hidden, weight, bias, t_hidden.to(device), weight.detach().clone(), t_bias.to(device), labels


TEACHER_HEADS = {
    "both_capped": {"logit_scale": 1.5, "softcap": 3.0, "teacher_logit_scale": 1.5, "teacher_softcap": 3.0},
    "student_only": {"logit_scale": 0.7, "softcap": 2.0},
    "teacher_only": {"teacher_logit_scale": 1.25, "teacher_softcap": 2.5},
}


@pytest.mark.parametrize("heads", TEACHER_HEADS)
@pytest.mark.parametrize("kind, gamma, temp", [("kl", 0.0, 1.0), ("ce", 3.0, 2.0)])
def test_teacher_kl_torch_path_matches_reference_fp64(heads, kind, gamma, temp):
    hidden, weight, bias, th, tw, tb, labels = teacher_problem()
    kw = {"kind": kind, "gamma": gamma, "temperature": temp, "teacher_bias": tb, **TEACHER_HEADS[heads]}
    up = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = grads(lambda h, w, b: bk.naive_teacher_kl(h, w, th, tw, labels, bias=b, **kw), (hidden, weight, bias), up)
    out = grads(lambda h, w, b: bk.linear_teacher_kl(h, w, th, tw, labels, impl="torch", chunk_size=8, bias=b, **kw),
                (hidden, weight, bias), up)
    close(out, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("heads", ("both_capped", "student_only"))
def test_teacher_kl_triton_matches_torch(heads, triton_device):
    hidden, weight, bias, th, tw, tb, labels = (t.to(triton_device) for t in teacher_problem(torch.float32))
    kw = {"kind": "kl", "gamma": 2.0, "temperature": 1.5, "teacher_bias": tb, **TEACHER_HEADS[heads]}
    up = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(triton_device)
    ref = grads(lambda h, w, b: bk.linear_teacher_kl(h, w, th, tw, labels, impl="torch", chunk_size=8, bias=b, **kw),
                (hidden, weight, bias), up)
    out = grads(lambda h, w, b: bk.linear_teacher_kl(h, w, th, tw, labels, impl="triton", chunk_size=8, bias=b,
                                                     **kw), (hidden, weight, bias), up)
    close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ("torch", "triton"))
def test_weighted_teacher_kl_matches_values_with_heads(impl, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, bias, th, tw, tb, labels = (t.to(device) for t in teacher_problem(torch.float32))
    kw = {"kind": "ce", "gamma": 1.0, "teacher_bias": tb, **TEACHER_HEADS["both_capped"]}
    w = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(device)
    ref = grads(lambda h, wt, b: bk.linear_teacher_kl(h, wt, th, tw, labels, impl="torch", bias=b, **kw),
                (hidden, weight, bias), w)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, values = bk.linear_weighted_teacher_kl_sum(leaves[0], leaves[1], th, tw, w, labels, impl=impl, chunk_size=8,
                                                     bias=leaves[2], **kw)
    loss.backward()
    torch.testing.assert_close(values, ref[0], rtol=1e-5, atol=1e-5)
    close([t.grad for t in leaves], list(ref[1:]), rtol=1e-5, atol=1e-5)


def test_equal_capped_heads_give_zero_kl():
    """Student and teacher the same capped head: KL exactly 0 and no gradient, as for plain heads."""
    hidden, weight, bias, _, _, _, labels = teacher_problem(torch.float32)
    h = hidden.clone().requires_grad_()
    kw = {"logit_scale": 1.5, "softcap": 3.0, "teacher_logit_scale": 1.5, "teacher_softcap": 3.0}
    kl = bk.linear_teacher_kl(h, weight, hidden, weight, labels, impl="torch", bias=bias, teacher_bias=bias, **kw)
    kl.sum().backward()
    assert float(kl.detach().abs().max()) < 1e-6 and float(h.grad.abs().max()) < 1e-6


# ---- the head object and argument checks ---------------------------------------------------------------------------


def test_lm_head_logits_and_options():
    hidden, weight, bias, labels = make_problem(torch.float32)
    head = bk.LMHead(weight, bias, logit_scale=1.5, softcap=3.0)
    want = 3.0 * torch.tanh(1.5 * (hidden @ weight.t() + bias) / 3.0)
    torch.testing.assert_close(head.logits(hidden), want)
    assert not head.is_plain and bk.LMHead(weight).is_plain
    torch.testing.assert_close(bk.linear_token_scores(hidden, weight, labels, impl="torch", **head.options()),
                               bk.naive_token_scores(hidden, weight, labels, **head.options()))


@pytest.mark.parametrize("over, match", [
    ({"logit_scale": 0.0}, "logit_scale must be a finite float > 0, got .*logit_scale=0.0"),
    ({"logit_scale": float("nan")}, "logit_scale must be a finite float > 0"),
    ({"softcap": -30.0}, "softcap must be None or a finite float > 0, got .*softcap=-30.0"),
    ({"softcap": True}, "softcap must be None or a finite float > 0"),
    ({"bias": torch.zeros(V + 1)}, r"bias must have shape \[V\]=\(301,\)"),
    ({"bias": torch.zeros(V, dtype=torch.float64)}, "bias dtype torch.float64 must equal the weight dtype"),
])
def test_bad_head_arguments_are_named(over, match):
    hidden, weight, _, labels = make_problem(torch.float32)
    with pytest.raises(ValueError, match=match):
        bk.linear_token_scores(hidden, weight, labels, impl="torch", **over)
    teacher = {f"teacher_{k}": v for k, v in over.items()}
    with pytest.raises(ValueError, match=f"teacher_{match}"):
        bk.linear_teacher_kl(hidden, weight, hidden, weight, labels, impl="torch", **teacher)
