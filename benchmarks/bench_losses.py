"""Benchmark the fused BS-T loss (forward + backward w.r.t. hidden and weight) against every baseline.

One setup shared by every provider; warm-up excluded; median / p20 / p80 of repeats; peak memory beyond the inputs
and beyond the returned gradients; one JSON object per case on stdout (the last line is a JSON list of all cases).

Providers (each skipped with a reason when unavailable):
  bs_kernels            ours, BS-T via linear_weighted_score_sum: gradients in the forward, three GEMMs
  bs_kernels_recompute  ours, BS-T via linear_token_scores + autograd: saves O(N k) stats, recomputes logits
  torch                 plain PyTorch BS-T on full logits (what a user writes without this package)
  torch_compile         the same function under torch.compile
  liger_flce            Liger-Kernel fused linear cross-entropy (plain CE: the fastest fused CE we know)
  cce                   Cut Cross-Entropy (apple/ml-cross-entropy), plain CE
  gemm3                 the floor: the three GEMMs of the same shape (logits, dH, dW) and nothing else

    python -m benchmarks.bench_losses                      # GPU: D=4096, V=128256, N in {8192, 32768}, bf16, k=20
    python -m benchmarks.bench_losses --preset cpu         # a small CPU shape (the tests' pytest-benchmark cases)
    python -m benchmarks.bench_losses --out benchmarks/results/losses_h100.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import bs_kernels as bk
from benchmarks.common import device_name, emit, environment, finish, pick_device, sync

PROVIDERS = ("bs_kernels", "bs_kernels_recompute", "torch", "torch_compile", "liger_flce", "cce", "gemm3")


@dataclass(frozen=True)
class Case:
    n: int
    d: int
    v: int
    k: int = 20
    lam: float = 0.2
    dtype: str = "bfloat16"


PRESETS = {
    "gpu": [Case(8192, 4096, 128256), Case(32768, 4096, 128256)],
    "cpu": [Case(256, 64, 4096, dtype="float32")],
}


def make_inputs(case: Case, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    hidden = torch.randn(case.n, case.d, device=device, dtype=dtype, generator=g)
    weight = (torch.randn(case.v, case.d, device=device, dtype=dtype, generator=g) / case.d**0.5)
    labels = torch.randint(0, case.v, (case.n,), device=device, generator=g)
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def _naive_bst(hidden, weight, labels, topk, lam):
    return bk.naive_token_scores(hidden, weight, labels, topk=topk, lam=lam).mean()


def build(provider: str, case: Case, device: str):
    """A closure ``run(hidden, weight, labels) -> (loss, dh, dw)``, or a string saying why it is unavailable."""
    impl = "triton" if device == "cuda" else "torch"
    k, lam = case.k, case.lam

    def grads(loss, hidden, weight):
        dh, dw = torch.autograd.grad(loss, (hidden, weight))
        return loss.detach(), dh, dw

    if provider == "bs_kernels":
        def run(h, w, y):
            loss, _ = bk.linear_weighted_score_sum(h, w, y, torch.full_like(y, 1.0 / y.numel(), dtype=torch.float32),
                                                   topk=k, lam=lam, impl=impl)
            return grads(loss, h, w)
    elif provider == "bs_kernels_recompute":
        def run(h, w, y):
            return grads(bk.linear_token_scores(h, w, y, topk=k, lam=lam, impl=impl).mean(), h, w)
    elif provider == "torch":
        def run(h, w, y):
            return grads(_naive_bst(h, w, y, k, lam), h, w)
    elif provider == "torch_compile":
        compiled = torch.compile(_naive_bst)

        def run(h, w, y):
            return grads(compiled(h, w, y, k, lam), h, w)
    elif provider == "liger_flce":
        if device != "cuda":
            return "Liger kernels need CUDA"
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError as e:
            return f"liger-kernel not installed ({e})"
        flce = LigerFusedLinearCrossEntropyLoss()

        def run(h, w, y):
            return grads(flce(w, h, y), h, w)
    elif provider == "cce":
        if device != "cuda":
            return "Cut Cross-Entropy needs CUDA"
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except ImportError as e:
            return f"cut-cross-entropy not installed ({e})"

        def run(h, w, y):
            return grads(cce(h, w, y), h, w)
    elif provider == "gemm3":
        def run(h, w, y):
            with torch.no_grad():
                z = h @ w.t()
                return z[0, 0].float(), z @ w, z.t() @ h
    else:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    return run


def measure(provider: str, case: Case, device: str, warmup: int, reps: int) -> dict:
    row = {"provider": provider, **asdict(case), "device": device_name(device)}
    run = build(provider, case, device)
    if isinstance(run, str):
        return {**row, "skipped": run}
    hidden, weight, labels = make_inputs(case, device)
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    try:
        for _ in range(warmup):
            out = run(hidden, weight, labels)
            del out
        sync(device)
        if device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(reps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = run(hidden, weight, labels)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = run(hidden, weight, labels)
                times.append((time.perf_counter() - t0) * 1e3)
            loss = float(out[0])
            del out
    except torch.OutOfMemoryError:
        return {**row, "skipped": "out of memory"}
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    row.update(ms_median=statistics.median(times), ms_p20=q[1], ms_p80=q[7], reps=reps, loss=loss)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        row.update(peak_bytes_beyond_inputs=peak, peak_bytes_beyond_grads=peak - grad_bytes,
                   peak_gib_beyond_inputs=round(peak / 2**30, 3))
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ",".join(PROVIDERS))
    p.add_argument("--n", type=int, nargs="*", help="override the preset's token counts")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, help="also write all cases (with the environment) to this JSON file")
    args = p.parse_args(argv)
    device = pick_device()
    preset = args.preset or ("gpu" if device == "cuda" else "cpu")
    cases = PRESETS[preset]
    if args.n:
        cases = [Case(n, c.d, c.v, c.k, c.lam, c.dtype) for n in args.n for c in cases[:1]]
    env = environment("benchmarks.bench_losses", argv)
    rows = []
    for case in cases:
        for provider in args.providers.split(","):
            emit({**measure(provider, case, device, args.warmup, args.reps), **env}, rows, device)
    return finish(rows, args.out)


if __name__ == "__main__":
    main()
