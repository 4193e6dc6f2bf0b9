"""Memory (and time) of the fused teacher KL on the CPU torch path, against the full-logits and checkpointed forms.

What it shows: the fused op's peak memory beyond its inputs and the gradients it returns is a constant number of
[C, V] chunks plus O(N), flat in N, while the full-logits formula grows as N V. One setup shared by every provider;
warm-up excluded; median of repeats; one JSON object per case on stdout, the last line a JSON list of all.

Providers (forward + backward of sum_i w_i KL_i w.r.t. the student's hidden and weight; teacher frozen):
  bs_kernels            ours, linear_weighted_teacher_kl_sum: gradients in the forward, 4 GEMMs
  bs_kernels_recompute  ours, linear_teacher_kl + autograd: O(N) saved, both logits chunks recomputed, 6 GEMMs
  naive                 naive_teacher_kl: full [N, V] logits of both heads and autograd
  torch_checkpoint      chunks of C rows of the full-logits formula under torch.utils.checkpoint (what
                        bs_train's KL retain did before this primitive)

Peak memory is measured with a ``TorchDispatchMode`` that logs every tensor storage the run allocates (a storage
counts from the op that creates it until it is freed, views and in-place results not counted twice), so it is the
live-tensor peak, not the process RSS (allocator caching and BLAS scratch are not included). "Beyond grads" replays
that log without the two returned gradients' storages: the peak of everything else live at the same moment.

    python -m benchmarks.bench_teacher_kl                       # N in {512, 2048, 8192}, D=64, D_t=96, V=4096
    python -m benchmarks.bench_teacher_kl --threads 1 --out benchmarks/results/teacher_kl_cpu.json

On a shared, oversubscribed CPU pass ``--threads 1``: with more threads than free cores every elementwise pass pays
an OpenMP barrier, which penalises the chunked paths (many passes over small chunks) far more than the naive one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

import bs_kernels as bk
from benchmarks.common import LiveBytes, cpu_name, emit, environment, finish

PROVIDERS = ("bs_kernels", "bs_kernels_recompute", "naive", "torch_checkpoint")


def make_inputs(n: int, d: int, dt: int, v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5
    t_hidden = torch.randn(n, dt, generator=g)
    t_weight = torch.randn(v, dt, generator=g) / dt**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = bk.IGNORE_INDEX
    w = (labels != bk.IGNORE_INDEX).float() / n
    return hidden.requires_grad_(), weight.requires_grad_(), t_hidden, t_weight, labels, w


def _kl_chunk(h, w, th, tw, y, tok_w):
    return (bk.naive_teacher_kl(h, w, th, tw, y) * tok_w).sum()


def build(provider: str, chunk: int):
    """``run(hidden, weight, t_hidden, t_weight, labels, token_weights) -> (loss, dh, dw)``."""

    def grads(loss, h, w):
        dh, dw = torch.autograd.grad(loss, (h, w))
        return loss.detach(), dh, dw

    if provider == "bs_kernels":
        def run(h, w, th, tw, y, tok_w):
            loss, _ = bk.linear_weighted_teacher_kl_sum(h, w, th, tw, tok_w, y, impl="torch", chunk_size=chunk)
            return grads(loss, h, w)
    elif provider == "bs_kernels_recompute":
        def run(h, w, th, tw, y, tok_w):
            kl = bk.linear_teacher_kl(h, w, th, tw, y, impl="torch", chunk_size=chunk)
            return grads((kl * tok_w).sum(), h, w)
    elif provider == "naive":
        def run(h, w, th, tw, y, tok_w):
            return grads((bk.naive_teacher_kl(h, w, th, tw, y) * tok_w).sum(), h, w)
    elif provider == "torch_checkpoint":
        def run(h, w, th, tw, y, tok_w):
            total = h.new_zeros(())
            for c0 in range(0, h.shape[0], chunk):
                c1 = c0 + chunk
                total = total + checkpoint(_kl_chunk, h[c0:c1], w, th[c0:c1], tw, y[c0:c1], tok_w[c0:c1],
                                           use_reentrant=False)
            return grads(total, h, w)
    else:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    return run


def measure(provider: str, n: int, d: int, dt: int, v: int, chunk: int, warmup: int, reps: int) -> dict:
    run = build(provider, chunk)
    inputs = make_inputs(n, d, dt, v)
    for _ in range(warmup):
        run(*inputs)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = run(*inputs)
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    mode = LiveBytes()
    with mode:
        loss, dh, dw = run(*inputs)
    chunk_bytes = min(chunk, n) * v * 4  # one [C, V] float32 logits chunk
    beyond = mode.peak(exclude=(dh, dw))  # at every moment, what is live besides the two returned gradients
    return {"provider": provider, "n": n, "d": d, "d_teacher": dt, "v": v, "chunk_rows": min(chunk, n),
            "dtype": "float32", "ms_median": round(statistics.median(times), 2), "reps": reps, "loss": float(loss),
            "peak_bytes_beyond_inputs": mode.peak(), "peak_bytes_beyond_grads": beyond,
            "peak_beyond_grads_in_chunks": round(beyond / chunk_bytes, 2),
            "full_logits_bytes_one_head": n * v * 4}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--d-teacher", type=int, default=96)
    p.add_argument("--v", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=256, help="rows per chunk (ours and torch_checkpoint)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, help="also write all cases (with the environment) to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {**environment("benchmarks.bench_teacher_kl", argv), "device": "cpu",
           "cpu": f"{cpu_name()} ({os.cpu_count()} cores)", "threads": torch.get_num_threads()}
    rows = []
    for n in args.n:
        for provider in args.providers.split(","):
            load = round(os.getloadavg()[0], 2)  # the machine may be shared: say how busy it was
            row = measure(provider, n, args.d, args.d_teacher, args.v, args.chunk, args.warmup, args.reps)
            emit({**row, **env, "load_avg_1m": load}, rows, "cpu")
    return finish(rows, args.out)


if __name__ == "__main__":
    main()
