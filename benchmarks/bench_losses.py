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
  torch_lce             PyTorch's own chunked F.linear_cross_entropy(options=LinearCrossEntropyOptions()),
                        torch >= 2.13, plain CE: run at the lam = 0 cases only
  gemm3                 the floor: the three GEMMs of the same shape (logits, dH, dW) and nothing else

    python -m benchmarks.bench_losses                      # GPU: D=4096, V=128256, N in {8192, 32768}, bf16, k=20
    python -m benchmarks.bench_losses --preset cpu         # the SmolLM2 head (D=576, V=49152), N in {1024, 4096,
                                                           # 16384}, fp32 and bf16, lam 0.2 and 0 (hours on 2 cores)
    python -m benchmarks.bench_losses --preset tiny        # D=64, V=4096, N=256 (the tests' pytest-benchmark cases)
    python -m benchmarks.bench_losses --out benchmarks/results/losses_h100.json

On the CPU every case runs in a fresh process, its providers interleaved rep by rep (so load drifts hit all of them
alike), and peak memory is the peak RSS delta of each timed call: VmHWM reset through /proc/self/clear_refs before
the call, minus VmRSS then (Linux; allocations of 4 MiB and more are mmapped, so RSS follows the live tensors). Each row records threads, load average before and after, and the CPU model.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import bs_kernels as bk
from benchmarks.common import (cpu_name, device_name, emit, environment, finish, peak_rss_delta, pick_device,
                               rss_reset, sync)

PROVIDERS = ("bs_kernels", "bs_kernels_recompute", "torch", "torch_compile", "liger_flce", "cce", "torch_lce", "gemm3")


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
    # The SmolLM2-135M head (D = 576, V = 49152): BS-T (k = 20, lam = 0.2) and plain CE (lam = 0), issue 14.
    "cpu": [Case(n, 576, 49152, 20, lam, dtype) for dtype in ("float32", "bfloat16") for n in (1024, 4096, 16384)
            for lam in (0.2, 0.0)],
    "tiny": [Case(256, 64, 4096, dtype="float32")],
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
    elif provider == "torch_lce":
        if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"torch {torch.__version__} has no chunked linear_cross_entropy (new in 2.13)"
        if lam != 0:
            return "plain cross-entropy: measured at the lam = 0 cases"
        options = torch.nn.LinearCrossEntropyOptions()

        def run(h, w, y):
            return grads(torch.nn.functional.linear_cross_entropy(h, w, y, options=options), h, w)
    elif provider == "gemm3":
        def run(h, w, y):
            with torch.no_grad():
                z = h @ w.t()
                return z[0, 0].float(), z @ w, z.t() @ h
    else:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    return run


class CallTimeout(Exception):
    """A provider's call ran past ``--call-timeout-s``."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise CallTimeout in this (main) thread once ``seconds`` have passed. Python runs the handler between ATen
    calls, so a long single op (a GEMM, a whole autograd backward) finishes first: the stop can come late, and the
    row records when it came."""
    if not seconds:
        yield
        return

    def stop(signum, frame):
        raise CallTimeout

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def measure(providers: list[str], case: Case, device: str, warmup: int, reps: int,
            call_timeout_s: float | None = None) -> list[dict]:
    """Every provider on one setup, interleaved: warm-up rounds, then ``reps`` timed rounds of one call each. On the
    CPU a provider whose call runs past ``call_timeout_s`` is stopped and dropped, its row saying when."""
    base = {**asdict(case), "device": device_name(device)}
    if device == "cpu":
        base.update(threads=torch.get_num_threads(), cpu=cpu_name(), loadavg_before=os.getloadavg())
    runs = {p: build(p, case, device) for p in providers}
    rows = {p: {"provider": p, **base} for p in providers}
    for p, run in runs.items():
        if isinstance(run, str):
            rows[p]["skipped"] = run
    live = [p for p in providers if not isinstance(runs[p], str)]
    hidden, weight, labels = make_inputs(case, device)
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    times = {p: [] for p in live}
    peaks = {p: [] for p in live}
    losses = {}

    def call(p: str, timed: bool) -> None:
        if device == "cuda":
            sync(device)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = runs[p](hidden, weight, labels)
            end.record()
            torch.cuda.synchronize()
            ms, peak = start.elapsed_time(end), torch.cuda.max_memory_allocated() - before
        else:
            before = rss_reset()  # collects garbage first
            t0 = time.perf_counter()
            try:
                with _time_limit(call_timeout_s):
                    out = runs[p](hidden, weight, labels)
            except CallTimeout:
                raise CallTimeout(time.perf_counter() - t0) from None
            ms = (time.perf_counter() - t0) * 1e3
            peak = peak_rss_delta(before)
        losses[p] = float(out[0])
        del out
        if timed:
            times[p].append(ms)
            peaks[p].append(peak)

    for rnd in range(warmup + reps):
        for p in list(live):
            try:
                call(p, timed=rnd >= warmup)
            except torch.OutOfMemoryError:
                rows[p]["skipped"] = "out of memory"
                live.remove(p)
            except CallTimeout as e:
                rows[p]["skipped"] = (f"stopped: a call ({'warm-up' if rnd < warmup else 'timed'}) was still running "
                                      f"after {e.args[0]:.0f} s (--call-timeout-s {call_timeout_s:g})")
                live.remove(p)
    for p in live:
        t = times[p]
        q = statistics.quantiles(t, n=10) if len(t) > 1 else [t[0]] * 9
        peak = max(peaks[p])
        rows[p].update(ms_median=statistics.median(t), ms_p20=q[1], ms_p80=q[7], reps=reps, warmup=warmup,
                       loss=losses[p], peak_bytes_beyond_inputs=peak, peak_bytes_beyond_grads=peak - grad_bytes,
                       peak_gib_beyond_inputs=round(peak / 2**30, 3),
                       memory=("peak RSS delta of the call" if device == "cpu" else "torch.cuda peak allocated"))
    if device == "cpu":
        for p in providers:
            rows[p]["loadavg_after"] = os.getloadavg()
    return [rows[p] for p in providers]


def _fresh_process(case: Case, providers: list[str], warmup: int, reps: int,
                   call_timeout_s: float | None = None) -> list[dict]:
    """Run one case in a new Python process (nothing cached from other cases) and return its rows."""
    spec = json.dumps(asdict(case))
    cmd = [sys.executable, "-m", "benchmarks.bench_losses", "--one-case", spec, "--providers", ",".join(providers),
           "--warmup", str(warmup), "--reps", str(reps)]
    if call_timeout_s:
        cmd += ["--call-timeout-s", str(call_timeout_s)]
    # Allocations of 4 MiB and more are mmapped, so freeing them returns them and RSS follows the live tensors
    # (glibc's own threshold floats up to 32 MiB after warm-up and would hide reused heap memory).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ",".join(PROVIDERS))
    p.add_argument("--n", type=int, nargs="*", help="keep only the preset's cases with these token counts")
    p.add_argument("--dtype", nargs="*", help="keep only the preset's cases with these dtypes")
    p.add_argument("--lam", type=float, nargs="*", help="keep only the preset's cases with these lambdas")
    p.add_argument("--skip", nargs="*", default=[], metavar="PROVIDER:DTYPE:N",
                   help="leave these provider/case pairs out (recorded as skipped), e.g. torch:bfloat16:16384")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--call-timeout-s", type=float, default=None,
                   help="CPU: stop a provider whose call runs longer than this and record it as stopped (ours: off; "
                        "for bf16 naive on CPUs that emulate bf16 GEMMs, which can take many minutes a call)")
    p.add_argument("--in-process", action="store_true", help="CPU: run the cases here, not one fresh process each")
    p.add_argument("--one-case", help=argparse.SUPPRESS)  # JSON of one Case: what a fresh process is given
    p.add_argument("--out", type=Path, help="also write all cases (with the environment) to this JSON file")
    args = p.parse_args(argv)
    device = pick_device()
    providers = args.providers.split(",")
    if args.one_case:
        print(json.dumps(measure(providers, Case(**json.loads(args.one_case)), device, args.warmup, args.reps,
                                 args.call_timeout_s)))
        return []
    preset = args.preset or ("gpu" if device == "cuda" else "cpu")
    cases = [c for c in PRESETS[preset] if (not args.n or c.n in args.n) and (not args.dtype or c.dtype in args.dtype)
             and (args.lam is None or c.lam in args.lam)]
    env = environment("benchmarks.bench_losses", argv)
    rows = []
    for case in cases:
        skipped = {s.split(":")[0] for s in args.skip if s.split(":")[1:] == [case.dtype, str(case.n)]}
        here = [q for q in providers if q not in skipped]
        if device == "cpu" and not args.in_process:
            measured = _fresh_process(case, here, args.warmup, args.reps, args.call_timeout_s)
        else:
            measured = measure(here, case, device, args.warmup, args.reps, args.call_timeout_s)
        measured += [{"provider": q, **asdict(case), "device": device_name(device), "skipped": "--skip"}
                     for q in providers if q in skipped]
        for row in measured:
            emit({**row, **env}, rows, device)
    return finish(rows, args.out)


if __name__ == "__main__":
    main()
