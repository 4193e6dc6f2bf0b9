"""GPU tier: real Llama-3 head shapes in bf16 and fp32, and the memory bound. Skipped without CUDA.

Accuracy follows Cut Cross-Entropy's criterion: our error against a float64 truth must not exceed plain PyTorch's
own error in the same dtype by more than a small tolerance, for the loss and both gradients.
"""

from __future__ import annotations

import pytest
import torch

import bs_kernels as bk

pytestmark = pytest.mark.gpu
D, V = 4096, 128256


def problem(n, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, D, device="cuda", generator=g)
    weight = torch.randn(V, D, device="cuda", generator=g) / D**0.5 * 4  # logits with a realistic spread
    labels = torch.randint(0, V, (n,), device="cuda", generator=g)
    labels[torch.rand(n, device="cuda", generator=g) < 0.2] = -100
    return hidden.to(dtype), weight.to(dtype), labels


def loss_and_grads(fn, hidden, weight):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w)
    dh, dw = torch.autograd.grad(loss, (h, w))
    return [loss.double(), dh.double(), dw.double()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_real_shape_error_within_torch_same_dtype(dtype):
    n = 1024
    hidden, weight, labels = problem(n, dtype)
    w = (labels != -100).float() / (labels != -100).sum()

    def naive(h, wt):
        return (bk.naive_token_scores(h, wt, labels, topk=20, lam=0.2) * w.to(h.dtype if h.dtype == torch.float64
                                                                                else torch.float32)).sum()

    truth = loss_and_grads(naive, hidden.double(), weight.double())
    plain = loss_and_grads(naive, hidden, weight)
    fused = loss_and_grads(lambda h, wt: bk.linear_weighted_score_sum(h, wt, labels, w, topk=20, lam=0.2)[0],
                           hidden, weight)
    recompute = loss_and_grads(lambda h, wt: (bk.linear_token_scores(h, wt, labels, topk=20, lam=0.2) * w).sum(),
                               hidden, weight)
    for name, ours in (("fused", fused), ("recompute", recompute)):
        for what, o, p, t in zip(("loss", "dhidden", "dweight"), ours, plain, truth):
            ours_err = (o - t).abs().max().item()
            torch_err = (p - t).abs().max().item()
            scale = t.abs().max().item()
            assert ours_err <= torch_err + 1e-3 * scale + 1e-6, (name, what, ours_err, torch_err)


def test_peak_memory_is_gradients_plus_one_chunk():
    n = 8192
    hidden, weight, labels = problem(n, torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = bk.bst_loss(hidden[None], weight, labels[None], lam=0.2, topk=20)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    torch.cuda.synchronize()
    beyond = torch.cuda.max_memory_allocated() - base - dh.numel() * 2 - dw.numel() * 2
    assert beyond <= 128 * 2**20, f"{beyond / 2**20:.1f} MiB beyond the gradients"


def test_out_of_range_label_gives_nan_not_a_fault():
    hidden, weight, labels = problem(64, torch.float32)
    labels[3] = V + 5
    scores = bk.linear_token_scores(hidden, weight, labels, topk=20, lam=0.2)
    assert torch.isnan(scores[3]) and torch.isfinite(scores[torch.arange(64, device="cuda") != 3]).all()


@pytest.mark.parametrize("k", [1, 20, 64])
def test_triton_matches_torch_path_at_real_vocab(k):
    hidden, weight, labels = problem(256, torch.float32)
    a = bk.linear_token_scores(hidden, weight, labels, topk=k, lam=0.2, impl="triton")
    b = bk.linear_token_scores(hidden, weight, labels, topk=k, lam=0.2, impl="torch")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
