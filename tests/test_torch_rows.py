"""The torch path's own machinery: its top-k tie rule, its in-place row ops, its memory bound and its bf16 error.

``tests/test_token_scores.py`` holds the public ops to the naive reference; here are the parts that reference
cannot see: ``stable_topk``'s block pre-selection against a literal stable sort at vocabularies large enough to
use it (ties at the boundary, ties with a block left out, all-equal and -inf rows, k = V), the claim that a pass
allocates nothing of the chunk's size but the one buffer, and bf16 error bounded by plain PyTorch's own bf16 error
on both GEMM policies (float32 GEMMs where the CPU emulates bf16, bf16 GEMMs where it has bf16 instructions).
"""

from __future__ import annotations

import pytest
import torch

import bs_kernels as bk
from bs_kernels import torch_path, torch_rows

V_BLOCKED = 40 * torch_rows.BLOCK + 17  # enough 64-wide blocks for the pre-selection, plus a ragged tail


def literal_topk(row: torch.Tensor, k: int) -> list[int]:
    """The k largest entries, ties to the lower index, by sorting (value desc, index asc), in index order."""
    return sorted(sorted(range(row.numel()), key=lambda j: (-float(row[j]), j))[:k])


def awkward_rows(v: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(v, generator=g, dtype=torch.float64) for _ in range(3)]
    rows.append(torch.randint(-3, 4, (v,), generator=g).double())  # ties everywhere, the boundary included
    tie_out = torch.randn(v, generator=g, dtype=torch.float64)
    tie_out[torch.arange(0, 20 * 64, 64)] = 5.0  # 20 blocks whose max is 5.0 ...
    tie_out[35 * 64 + 3] = 5.0  # ... and one more block left out by the block top-k, tying the k-th value
    rows.append(tie_out)
    tie_in = torch.randn(v, generator=g, dtype=torch.float64)
    tie_in[7 * 64: 7 * 64 + 30] = 5.0  # the k-th value tied inside one candidate block, nothing left out near it
    tie_in[[30 * 64 + 1, 2 * 64 + 5]] = 6.0  # two above it in other blocks (for k = 1: tied with each other)
    rows.append(tie_in)
    rows.append(torch.zeros(v, dtype=torch.float64))  # all equal
    rows.append(torch.arange(v, dtype=torch.float64).flip(0))  # descending: the best block is the first
    tail = torch.randn(v, generator=g, dtype=torch.float64)
    tail[-5:] = 9.0  # the top lives in the ragged tail
    rows.append(tail)
    few = torch.full((v,), float("-inf"), dtype=torch.float64)
    few[[3, 700, 2000]] = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)  # fewer finite entries than k
    rows.append(few)
    return torch.stack(rows)


@pytest.mark.parametrize("k", (1, 5, 20, 21))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
def test_stable_topk_equals_literal_rule(k, dtype):
    x = awkward_rows(V_BLOCKED).to(dtype)
    vals, idx = torch_rows.stable_topk(x, k)
    for r in range(x.shape[0]):
        want = literal_topk(x[r].double(), k)
        assert sorted(idx[r].tolist()) == want, r
        assert torch.equal(vals[r].sort().values, x[r, want].sort().values), r


@pytest.mark.parametrize("k", (V_BLOCKED - 1, V_BLOCKED))
def test_stable_topk_k_near_vocab(k):
    x = awkward_rows(V_BLOCKED)[:4]
    _, idx = torch_rows.stable_topk(x, k)
    for r in range(x.shape[0]):
        assert sorted(idx[r].tolist()) == literal_topk(x[r], k)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_stable_topk_nan_rows_stay_in_range():
    x = torch.randn(3, V_BLOCKED)
    x[1] = float("nan")
    x[2, 100] = float("nan")
    vals, idx = torch_rows.stable_topk(x, 20)
    assert bool((idx >= 0).all() and (idx < V_BLOCKED).all())
    assert sorted(idx[0].tolist()) == literal_topk(x[0], 20)


def test_inplace_softmax_matches_torch():
    """The row op's softmax aliases input and output; it must equal the out-of-place kernel exactly."""
    z = torch.randn(33, V_BLOCKED) * 4
    want = torch.softmax(z, -1)
    torch_rows._softmax_(z)
    assert torch.equal(z, want)


def test_rows_forward_leaves_p_minus_t():
    """After the row op the chunk holds p - t: rows sum to zero, ignored rows are exactly zero."""
    z = torch.randn(6, V_BLOCKED, dtype=torch.float64) * 3
    labels = torch.tensor([5, -100, 7, 2000, -100, 63])
    p = torch.softmax(z, -1)
    s, lse, topi, q = torch_rows.rows_forward(z, labels, topk=20, lam=0.2, ignore_index=-100)
    active = labels != -100
    assert torch.all(z[~active] == 0)
    torch.testing.assert_close(z[active].sum(-1), torch.zeros(int(active.sum()), dtype=z.dtype), atol=1e-12, rtol=0)
    t = p.clone().sub_(z)  # t = p - (p - t)
    for r in torch.nonzero(active)[:, 0].tolist():
        support = set(topi[r].tolist()) | {int(labels[r])}
        outside = torch.ones(V_BLOCKED, dtype=torch.bool)
        outside[list(support)] = False
        assert torch.all(t[r, outside].abs() < 1e-15)
    assert torch.all(s[~active] == 0)


def _no_native_low_precision(monkeypatch):
    monkeypatch.setattr(torch_path, "_cpu_flags", lambda: frozenset())


def _native_low_precision(monkeypatch):
    monkeypatch.setattr(torch_path, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))


@pytest.mark.parametrize("policy", (_no_native_low_precision, _native_low_precision))
@pytest.mark.parametrize("lam", (0.0, 0.2))
def test_bf16_error_bounded_by_torch_bf16(policy, lam, monkeypatch):
    """|ours bf16 - fp64 truth| <= |plain torch bf16 - fp64 truth| + tol, for the loss and both gradients."""
    policy(monkeypatch)
    g = torch.Generator().manual_seed(4)
    n, d, v = 48, 32, V_BLOCKED
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5 * 3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    w = torch.rand(n, generator=g, dtype=torch.float64)

    def run(fn, dtype):
        h = hidden.to(dtype).clone().requires_grad_()
        wt = weight.to(dtype).clone().requires_grad_()
        loss = fn(h, wt)
        loss.backward()
        return float(loss.detach()), h.grad.double(), wt.grad.double()

    def naive(h, wt):
        scores = bk.naive_token_scores(h, wt, labels, topk=20, lam=lam)
        return (scores * w.to(scores.dtype)).sum()

    def fused(h, wt):
        return bk.linear_weighted_score_sum(h, wt, labels, w.float(), topk=20, lam=lam, impl="torch", chunk_size=16)[0]

    def recompute(h, wt):
        return (bk.linear_token_scores(h, wt, labels, topk=20, lam=lam, impl="torch", chunk_size=16) * w.float()).sum()

    truth = run(naive, torch.float64)
    plain = run(naive, torch.bfloat16)
    for fn in (fused, recompute):
        ours = run(fn, torch.bfloat16)
        assert abs(ours[0] - truth[0]) <= abs(plain[0] - truth[0]) + 1e-2 * abs(truth[0])
        for a, b, t in zip(ours[1:], plain[1:], truth[1:]):
            scale = t.abs().max()
            assert (a - t).abs().max() <= (b - t).abs().max() + 1e-2 * scale


def test_one_chunk_sized_allocation_per_pass():
    """Per pass, the only tensor of the chunk's size ever created is the one [C, V] buffer (docs/reference/kernels.md's claim)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n, d, chunk = 256, 16, 64
    v = 64 * 64 + 37
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    big = chunk * v // 2
    assert v * d < big and n * d < big

    class Storages(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.kept = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() >= big:
                    self.kept[t.untyped_storage().data_ptr()] = t  # held, so no address is reused
            return out

    for name, fn, passes in (
        ("fused", lambda: bk.linear_weighted_score_sum(hidden, weight, labels, torch.ones(n), topk=20, lam=0.2,
                                                       impl="torch", chunk_size=chunk)[0], 1),
        ("recompute", lambda: bk.linear_token_scores(hidden, weight, labels, topk=20, lam=0.2, impl="torch",
                                                     chunk_size=chunk).sum(), 2),
    ):
        with Storages() as mode:
            fn().backward()
        assert len(mode.kept) == passes, (name, [tuple(t.shape) for t in mode.kept.values()])


_RSS_PROBE = """
import gc, sys, torch
from bs_kernels import torch_rows

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def peak(fn):
    fn()  # warm-up: first-call allocations (thread pools, kernels' caches) are not the op's
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before

g = torch.Generator().manual_seed(0)
z0 = (torch.randn(512, 49152, generator=g) * 3).to(getattr(torch, sys.argv[1]))
labels = torch.randint(0, 49152, (512,), generator=g)
lse = torch.logsumexp(z0.float(), -1)
for lam in (0.0, 0.2):
    z = z0.clone()
    print(peak(lambda: (z.copy_(z0), torch_rows.rows_forward(z, labels, topk=20, lam=lam, ignore_index=-100))))
print(peak(lambda: (z.copy_(z0), torch_rows.rows_backward(z, labels, lse, None, None, lam=0.0, ignore_index=-100))))
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("dtype", ("bfloat16", "float32"))
def test_row_ops_allocate_far_less_than_the_chunk(dtype):
    """Measured, not traced: a kernel's own temporaries are invisible to dispatch modes. The CPU's bf16 ``scatter_``
    once copied the whole chunk to float32 (2x the chunk's bytes); the row ops must stay far under one chunk (their
    fixed-size float32 slices and the RSS reading's own noise measured 0-12 MB here)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 << 20), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, dtype], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    chunk = 512 * 49152 * getattr(torch, dtype).itemsize
    assert all(int(b) < chunk // 2 for b in out), (out, chunk)
