"""Bad arguments raise ValueError naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import bs_kernels as bk

N, D, V = 6, 8, 50


def inputs(**over):
    base = dict(hidden=torch.randn(N, D), weight=torch.randn(V, D), labels=torch.randint(0, V, (N,)))
    base.update(over)
    return base


@pytest.mark.parametrize("kwargs, match", [
    (dict(topk=V + 1, lam=0.2), "topk"),
    (dict(topk=-1), "topk"),
    (dict(topk=2.0, lam=0.2), "topk"),
    (dict(topk=5, lam=1.5), "lam"),
    (dict(topk=5, lam=-0.1), "lam"),
    (dict(topk=5, lam=float("nan")), "lam"),
    (dict(topk=0, lam=0.2), "topk"),
    (dict(impl="cuda"), "impl"),
    (dict(ignore_index=None), "ignore_index"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bk.linear_token_scores(**inputs(), **{"impl": "torch", **kwargs})


@pytest.mark.parametrize("over, match", [
    (dict(hidden=torch.randn(N, D + 1)), "D="),
    (dict(hidden=torch.randn(2, N, D)), "hidden"),
    (dict(weight=torch.randn(V)), "weight"),
    (dict(labels=torch.randint(0, V, (N + 1,))), "labels"),
    (dict(labels=torch.zeros(N)), "labels"),
    (dict(weight=torch.randn(V, D, dtype=torch.float64)), "weight dtype"),
    (dict(hidden=torch.randn(N, D).to(torch.int32), weight=torch.randn(V, D).to(torch.int32)), "hidden dtype"),
    (dict(weight=torch.randn(V, D, device="meta")), "weight is on meta"),
    (dict(labels=torch.tensor([0, 1, V, 2, 3, 4])), r"labels\[2\]=50"),
])
def test_bad_tensors(over, match):
    with pytest.raises(ValueError, match=match):
        bk.linear_token_scores(**inputs(**over), impl="torch")


@pytest.mark.parametrize("weights, match", [
    (torch.ones(N + 1), rf"token_weights must have shape \({N},\), got \({N + 1},\)"),
    (torch.ones(N, dtype=torch.long), "token_weights must be floating point"),
    ([1.0] * N, "token_weights must be a torch.Tensor, got list"),  # once an AttributeError
])
def test_token_weights_checked(weights, match):
    with pytest.raises(ValueError, match=match):
        bk.linear_weighted_score_sum(**inputs(), token_weights=weights, impl="torch")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
        bk.linear_token_scores(**inputs(), impl="triton")


def test_triton_rejects_float64_and_huge_topk():
    with pytest.raises(ValueError, match="hidden dtype"):
        bk.linear_token_scores(**inputs(hidden=torch.randn(N, D).double(), weight=torch.randn(V, D).double()))
    big = inputs(weight=torch.randn(300, D), labels=torch.randint(0, 300, (N,)))
    with pytest.raises(ValueError, match="topk=200"):
        bk.linear_token_scores(**big, topk=200, lam=0.2, impl="triton")


def test_loss_shapes_and_reduction_checked():
    with pytest.raises(ValueError, match="leading dims"):
        bk.bst_loss(torch.randn(2, 5, D), torch.randn(V, D), torch.zeros(2, 4, dtype=torch.long), impl="torch")
    with pytest.raises(ValueError, match="reduction"):
        bk.linear_cross_entropy(torch.randn(N, D), torch.randn(V, D), torch.zeros(N, dtype=torch.long),
                                reduction="avg", impl="torch")
    for bad in (0, True, 2.5):  # True was once taken as 1 row, and 2.5 failed inside range()
        with pytest.raises(ValueError, match=rf"chunk_size must be an int >= 1, got chunk_size={bad!r}"):
            bk.linear_token_scores(**inputs(), impl="torch", chunk_size=bad)
