"""pytest-benchmark cases for the loss providers, sharing ``benchmarks.bench_losses``' setup (a small CPU shape).

    pytest benchmarks --benchmark-only          # time them
    pytest benchmarks --benchmark-disable       # run each once as a check (what CI does)

Each case also checks that the provider computes the same BS-T loss (or, for plain cross-entropy providers, the same
lam = 0 loss) as the naive reference, so a fast-but-wrong provider fails instead of winning.
"""

from __future__ import annotations

import math

import pytest
import torch

import bs_kernels as bk
from benchmarks.bench_losses import PRESETS, build, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASE = PRESETS["tiny"][0]


@pytest.mark.parametrize("provider", ["bs_kernels", "bs_kernels_recompute", "torch", "liger_flce", "gemm3"])
def test_loss_provider(benchmark, provider):
    run = build(provider, CASE, DEVICE)
    if isinstance(run, str):
        pytest.skip(run)
    hidden, weight, labels = make_inputs(CASE, DEVICE)
    loss, dh, dw = benchmark(run, hidden, weight, labels)
    assert dh.shape == hidden.shape and dw.shape == weight.shape
    if provider == "gemm3":
        assert math.isfinite(float(loss))
        return
    lam = 0.0 if provider == "liger_flce" else CASE.lam
    with torch.no_grad():
        want = bk.naive_token_scores(hidden.float(), weight.float(), labels, topk=CASE.k, lam=lam).mean()
    sign = -1.0 if provider == "liger_flce" else 1.0  # cross-entropy = -mean log p
    assert abs(sign * float(loss) - float(want)) < 1e-3 * max(1.0, abs(float(want)))


@pytest.mark.skipif(DEVICE != "cpu", reason="the call time limit is a CPU option")
def test_a_provider_past_the_call_time_limit_is_recorded_as_stopped_without_a_time():
    """A provider stopped by --call-timeout-s gets no time or memory figure, only a reason saying when it was
    stopped; one that finishes keeps its measured row."""
    from benchmarks.bench_losses import measure

    stopped = measure(["torch"], CASE, DEVICE, warmup=0, reps=1, call_timeout_s=1e-4)[0]
    assert stopped["skipped"].startswith("stopped: a call (timed) was still running after")
    assert "ms_median" not in stopped and "peak_bytes_beyond_grads" not in stopped
    done = measure(["torch"], CASE, DEVICE, warmup=0, reps=1, call_timeout_s=600)[0]
    assert "skipped" not in done and done["ms_median"] > 0
