"""Predicted GPU time of each loss provider at the Llama-3 head: a roofline from GEMM FLOPs and memory traffic.

No GPU has run the loss kernels yet; this is what the first run is compared with. Each provider's forward + backward
(w.r.t. hidden and weight, as ``bench_losses`` times it) is written as the sequence of kernels it launches, each with
its FLOPs and the bytes it must move through HBM; a kernel takes ``max(FLOPs / achievable FLOP/s, bytes /
achievable bandwidth)`` and the kernels of a provider run one after another (no overlap; launches hidden behind
kernels of >= 0.1 ms). Achievable rates are the datasheet peaks times measured fractions (``GPUS``, printed with
every run). Providers, at N tokens, D = 4096, V = 128256, bf16, k = 20:

* ``bs_kernels`` (fused BS-T, ``linear_weighted_score_sum``) and ``bs_kernels_ce`` (the same with lam = 0): per
  chunk of C rows (``token_scores``' default, or ``--chunks``) the logits GEMM, the row kernel (two reads and one
  write of the [C, V] chunk: the compiled kernel's passes), dH = dZ W and dW += dZ^T H, which reads and writes the
  bf16 [V, D] accumulator every chunk: at C = 384 its inner dimension is short and the GEMM is memory-bound on an H100;
* ``bs_kernels_recompute`` (``linear_token_scores`` + autograd): forward GEMM and a one-read row pass, then the
  backward's recomputed GEMM, a read-and-write row pass, dH and dW;
* ``torch`` (the naive full-logits BS-T of ``bs_kernels.reference``): three full GEMMs and the minimum traffic of
  the eager ops between them over the [N, V] logits (bytes per element listed in ``NAIVE_BYTES``): a lower bound,
  PyTorch's softmax and top-k take more passes;
* ``liger_flce``: Liger-Kernel's fused linear CE as its source chunks it (C = next_pow2(N / ceil(V / D))), its CE
  kernel two reads and a write of the chunk, a bf16 dW accumulator like ours;
* ``gemm3``: the floor, three GEMMs of the full shape and nothing else.

The design brief's H100 measurements at N = 32768 are printed beside the predictions (``CALIBRATION``): they were
not used to set any assumption.

    python -m benchmarks.roofline                                    # JSON rows; the last line is a JSON list
    python -m benchmarks.roofline --out benchmarks/results/roofline_predicted.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import environment, finish

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class GPU:
    """A GPU's datasheet peaks and the fractions of them measured on the lent machines (KINDS.md)."""

    name: str
    peak_tflops: float
    """Dense bf16 tensor-core peak (NVIDIA's datasheet, SXM)."""
    hbm_tbs: float
    """HBM bandwidth (datasheet)."""
    gemm_fraction: float
    """Achieved / peak of a large bf16 GEMM: KINDS.md measured an 8192^3 product on random data."""
    copy_fraction: float
    """Achieved / peak of a device-to-device copy (bytes read and written), KINDS.md."""

    @property
    def flops(self) -> float:
        return self.peak_tflops * 1e12 * self.gemm_fraction

    @property
    def bandwidth(self) -> float:
        return self.hbm_tbs * 1e12 * self.copy_fraction


GPUS = {
    "h100": GPU("NVIDIA H100 80GB HBM3", 989.4, 3.35, 798 / 989.4, 3.0 / 3.35),  # KINDS.md, 2026-11-13
    "h200": GPU("NVIDIA H200", 989.4, 4.8, 788 / 989.4, 4.3 / 4.8),  # KINDS.md, 2026-10-28 (769-798 on 11-04)
}
ROW_KERNEL_FRACTION = 0.7
"""Share of the copy bandwidth a one-program-per-row kernel reaches (ours and Liger's CE), ours: one wave of C
programs (384 on 132 SMs, ~3 per SM; 64 registers and 32 warps per SM at k = 20 in bf16 on sm_90 per
tools.kernel_check), a block-wide reduction per tile between loads. ``sweep_loss``'s measured GB/s replaces it."""
# Minimum bytes per logit (N x V) of the naive formula's eager ops between its GEMMs, each reading its inputs and
# writing its output once: bf16 -> fp32 cast, log_softmax (2 reads: max, sum-exp), stable_topk's block maxima, the
# two gathers' backward (zero-filled fp32 [N, V] each, summed), log_softmax backward, the cast back to bf16.
NAIVE_BYTES = {"cast to fp32": 2 + 4, "log_softmax": 4 + 4 + 4, "top-k block maxima": 4,
               "gather backward x2, summed": 4 + 4 + (4 + 4 + 4), "log_softmax backward": 4 + 4 + 4 + 4,
               "cast grad to bf16": 4 + 2}
# The design brief, measured on an H100 at N = 32768 (DESIGN.md, 2026-11-22): provider -> ms
CALIBRATION = {"torch": 298.0, "liger_flce": 166.0, "gemm3": 160.0}
BF16 = 2


@dataclass(frozen=True)
class Op:
    """One kernel: what it is, its FLOPs and HBM bytes, and whether it streams at a row kernel's bandwidth."""

    name: str
    flops: float
    bytes: float
    row_kernel: bool = False

    def seconds(self, gpu: GPU) -> tuple[float, str]:
        bw = gpu.bandwidth * (ROW_KERNEL_FRACTION if self.row_kernel else 1.0)
        compute, memory = self.flops / gpu.flops, self.bytes / bw
        return max(compute, memory), ("compute" if compute >= memory else "memory")


def _chunks(n: int, rows: int) -> list[int]:
    return [min(rows, n - c0) for c0 in range(0, n, rows)]


def _gemms(c: int, d: int, v: int, dw_accumulate: bool) -> list[Op]:
    """Logits, dH and dW GEMMs of one chunk of c rows (bf16 in and out)."""
    f = 2 * c * v * d
    dw_bytes = BF16 * (c * v + c * d + (2 if dw_accumulate else 1) * v * d)
    return [Op("logits = H W^T", f, BF16 * (c * d + v * d + c * v)),
            Op("dH = dZ W", f, BF16 * (c * v + v * d + c * d)),
            Op("dW += dZ^T H" if dw_accumulate else "dW = dZ^T H", f, dw_bytes)]


def ours_fused(n: int, d: int, v: int, chunk: int) -> list[Op]:
    ops = [Op("dW zero-fill", 0, BF16 * v * d)]
    for c in _chunks(n, chunk):
        logits, dh, dw = _gemms(c, d, v, True)
        ops += [logits, Op("row kernel: scores, top-k, dZ in place (2 reads, 1 write)", 0, 3 * BF16 * c * v, True),
                dh, dw]
    return ops


def ours_recompute(n: int, d: int, v: int, chunk: int) -> list[Op]:
    ops = [Op("dW zero-fill", 0, BF16 * v * d)]
    for c in _chunks(n, chunk):  # forward: logits and the statistics
        ops += [_gemms(c, d, v, True)[0], Op("row kernel: scores and statistics (1 read)", 0, BF16 * c * v, True)]
    for c in _chunks(n, chunk):  # backward: recompute, dZ from the statistics, two GEMMs
        logits, dh, dw = _gemms(c, d, v, True)
        ops += [logits, Op("row kernel: dZ from statistics (1 read, 1 write)", 0, 2 * BF16 * c * v, True), dh, dw]
    return ops


def naive_torch(n: int, d: int, v: int) -> list[Op]:
    logits, dh, dw = _gemms(n, d, v, False)
    return [logits] + [Op(f"eager: {k}", 0, b * n * v) for k, b in NAIVE_BYTES.items()] + [dh, dw]


def liger_chunk(n: int, d: int, v: int) -> int:
    """Liger-Kernel's FLCE chunk: next_pow2(ceil(N / ceil(V / D))), at most N (its source, chunk_mem_const = 1)."""
    inc = -(-v // d)
    rows = -(-n // inc)
    return min(n, 1 << (rows - 1).bit_length())


def liger_flce(n: int, d: int, v: int) -> list[Op]:
    ops = [Op("dW zero-fill", 0, BF16 * v * d)]
    for c in _chunks(n, liger_chunk(n, d, v)):
        logits, dh, dw = _gemms(c, d, v, True)
        ops += [logits, Op("CE kernel: loss and dZ in place (2 reads, 1 write)", 0, 3 * BF16 * c * v, True), dh, dw]
    return ops


def gemm3(n: int, d: int, v: int) -> list[Op]:
    return _gemms(n, d, v, False)


def predict(ops: list[Op], gpu: GPU) -> dict:
    """Total ms, TFLOP, GB, and the ms spent compute-bound and memory-bound (GEMMs) and streaming (other kernels)."""
    out = {"ms": 0.0, "tflop": 0.0, "gb": 0.0, "gemm_compute_bound_ms": 0.0, "gemm_memory_bound_ms": 0.0,
           "streaming_ms": 0.0, "kernels": len(ops)}
    for op in ops:
        s, bound = op.seconds(gpu)
        out["ms"] += s * 1e3
        out["tflop"] += op.flops / 1e12
        out["gb"] += op.bytes / 1e9
        key = "streaming_ms" if op.flops == 0 else f"gemm_{bound}_bound_ms"
        out[key] += s * 1e3
    return {k: round(x, 3) if isinstance(x, float) else x for k, x in out.items()}


def _kernel_check_note() -> dict | None:
    """The compiled row kernel behind ``ROW_KERNEL_FRACTION``: its sm_90 bf16 variant at k = 20, as committed."""
    path = REPO / "benchmarks" / "results" / "kernel_check.json"
    if not path.is_file():
        return None
    for r in json.loads(path.read_text())["results"]:
        if (r["kernel"] == "_scores_kernel" and r["target"] == "sm_90" and r["dtype"] == "bf16"
                and r["config"].startswith("BLOCK_V=4096 K_PAD=32 HAS_TOPK WRITE_GRAD ~SAVE_STATS V%16 ")):
            return {k: r[k] for k in ("config", "registers", "spill_bytes", "warps_per_sm")}
    return None


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="*", default=[8192, 32768], help="token counts")
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--v", type=int, default=128256)
    p.add_argument("--chunks", type=int, nargs="*", help="our chunk rows to predict besides the default (default: "
                   "benchmarks.sweep_loss's chunk sizes)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import torch

    from benchmarks.sweep_loss import PRESETS as SWEEP
    from bs_kernels.token_scores import _chunk_rows

    env = {**environment("benchmarks.roofline", argv), "device": "predicted"}
    rows = [{"case": "assumptions", "gpus": {k: {**asdict(g), "achievable_tflops": round(g.flops / 1e12, 1),
                                                  "achievable_tbs": round(g.bandwidth / 1e12, 2)}
                                              for k, g in GPUS.items()},
             "row_kernel_fraction": ROW_KERNEL_FRACTION, "naive_bytes_per_logit": NAIVE_BYTES,
             "row_kernel_compiled": _kernel_check_note(), "model": "per kernel max(FLOPs / achievable FLOP/s, "
             "bytes / achievable bandwidth), kernels in sequence", **env}]
    print(json.dumps(rows[0]), flush=True)
    for n in args.n:
        default = _chunk_rows(n, args.v, torch.bfloat16, None)
        chunks = sorted({default, *(args.chunks if args.chunks is not None else SWEEP["gpu"][4])})
        cases = [(f"bs_kernels_c{c}" if c != default else "bs_kernels", ours_fused(n, args.d, args.v, c), c)
                 for c in chunks]
        cases += [("bs_kernels_ce", ours_fused(n, args.d, args.v, default), default),
                  ("bs_kernels_recompute", ours_recompute(n, args.d, args.v, default), default),
                  ("torch", naive_torch(n, args.d, args.v), None),
                  ("liger_flce", liger_flce(n, args.d, args.v), liger_chunk(n, args.d, args.v)),
                  ("gemm3", gemm3(n, args.d, args.v), None)]
        for gpu_key, gpu in GPUS.items():
            floor = predict(gemm3(n, args.d, args.v), gpu)["ms"]
            for provider, ops, chunk in cases:
                pred = predict(ops, gpu)
                loss = {"bs_kernels_ce": "ce (lam = 0)", "liger_flce": "ce", "gemm3": "none: the 3 GEMMs"}.get(
                    provider, "bs_t (k = 20, lam = 0.2)")
                row = {"case": "predicted", "gpu": gpu.name, "provider": provider, "loss": loss, "n": n, "d": args.d,
                       "v": args.v, "dtype": "bfloat16", "chunk_rows": chunk, **pred,
                       "vs_gemm3": round(pred["ms"] / floor, 3), **env}
                if gpu_key == "h100" and n == 32768 and provider in CALIBRATION:
                    row["design_brief_measured_ms"] = CALIBRATION[provider]
                    row["predicted_over_measured"] = round(pred["ms"] / CALIBRATION[provider], 3)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return finish(rows, args.out)


if __name__ == "__main__":
    main()
