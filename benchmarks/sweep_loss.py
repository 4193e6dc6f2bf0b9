"""A bounded sweep of the fused loss's two tuning knobs, so the first GPU run also says how to set them.

* ``chunk_size`` (rows of logits held at once, ``bs_kernels.linear_weighted_score_sum``): larger chunks give the dW
  GEMM a longer inner dimension (it is memory-bound at the default 384 rows of Llama-3's head, token_scores.py
  ``DEFAULT_CHUNK_BYTES``) at the price of one [C, V] buffer;
* ``BLOCK_V`` (vocabulary tile of the row kernel, ``triton_rows.scores_rows``): timed alone on one logits chunk.

Every case is forward + backward (or the row kernel alone) at the loss benchmark's shape, median of ``--reps`` after
a warm-up; one JSON object per case; the sweep stops starting cases after ``--budget-s`` seconds, so it always fits
its stage's cap in ``tools/gpu_job.py``.

    python -m benchmarks.sweep_loss                  # GPU: N=8192, D=4096, V=128256, bf16, k=20
    python -m benchmarks.sweep_loss --preset tiny    # CPU: D=64, V=4096, fp32 (torch path; the row kernel only
                                                     # under TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import bs_kernels as bk
from benchmarks.common import device_name, emit, environment, finish, pick_device, sync

PRESETS = {  # (n, d, v, dtype, chunk sizes, BLOCK_V values, rows of the row-kernel chunk); gpu: the loss benchmark's
    # Llama-3 head and the default chunk's 384 rows (ours: the grid). No BLOCK_V = 8192: 32 logits per thread over the
    # kernel's 8 warps spill within its register budget (triton_rows.MAX_REGS; tools.kernel_check compiles this list)
    "gpu": (8192, 4096, 128256, "bfloat16", (256, 384, 768, 1536, 3072), (1024, 2048, 4096), 384),
    "tiny": (256, 64, 4096, "float32", (64, 256), (1024, 4096), 4),
}


def row_kernel_call(z: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor, block_v: int):
    """The row-kernel launch the BLOCK_V sweep times; ``tools.kernel_check`` compiles the same call ahead of time."""
    from bs_kernels import triton_rows

    return triton_rows.scores_rows(z, labels, topk=20, lam=0.2, ignore_index=bk.IGNORE_INDEX, grad=grad,
                                   block_v=block_v)


def _time(fn, device: str, reps: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu with CUDA, else tiny")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=40.0, help="start no new case after this many seconds")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = pick_device()
    n, d, v, dtype, chunks, blocks, chunk_rows = PRESETS[args.preset or ("gpu" if device == "cuda" else "tiny")]
    env = {**environment("benchmarks.sweep_loss", argv), "device": device_name(device)}
    impl = "triton" if device == "cuda" else "torch"
    g = torch.Generator(device=device).manual_seed(0)
    dt = getattr(torch, dtype)
    h = torch.randn(n, d, device=device, dtype=dt, generator=g).requires_grad_()
    w = (torch.randn(v, d, device=device, dtype=dt, generator=g) / d**0.5).requires_grad_()
    y = torch.randint(0, v, (n,), device=device, generator=g)
    weights = torch.full((n,), 1.0 / n, device=device)
    rows, t_start = [], time.perf_counter()

    def fwd_bwd(chunk):
        loss, _ = bk.linear_weighted_score_sum(h, w, y, weights, topk=20, lam=0.2, impl=impl, chunk_size=chunk)
        torch.autograd.grad(loss, (h, w))

    for chunk in chunks:
        if time.perf_counter() - t_start > args.budget_s:
            break
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = _time(lambda: fwd_bwd(chunk), device, args.reps)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        emit({"case": "chunk_size", "chunk_size": chunk, "n": n, "d": d, "v": v, "dtype": dtype, "impl": impl,
              "ms": round(sec * 1e3, 3), "peak_mib": peak, **env}, rows, device)
    from bs_kernels._checks import triton_interpret

    if device == "cuda" or triton_interpret():
        z = torch.randn(chunk_rows, v, device=device, dtype=dt, generator=g)
        labels = y[: z.shape[0]]
        for bv in blocks:
            if time.perf_counter() - t_start > args.budget_s:
                break
            grad = torch.empty_like(z)
            sec = _time(lambda: row_kernel_call(z, labels, grad, bv), device, args.reps)
            emit({"case": "block_v", "block_v": bv, "rows": z.shape[0], "v": v, "dtype": dtype,
                  "ms": round(sec * 1e3, 3), "gb_s": round(2 * z.numel() * z.element_size() / sec / 1e9, 1), **env},
                 rows, device)
    return finish(rows, args.out)


if __name__ == "__main__":
    main()
