"""The teacher-KL memory benchmark at a tiny shape: the property it exists to show holds (the fused op's memory
beyond its gradients is a few [C, V] chunks, flat in N; the full-logits formula's grows with N), every provider
computes the same loss, and every row carries the environment a committed result must name."""

from __future__ import annotations

import json

from benchmarks import bench_teacher_kl


def test_fused_memory_is_flat_in_n_and_full_logits_is_not(tmp_path):
    out = tmp_path / "teacher_kl.json"
    rows = bench_teacher_kl.main(["--n", "128", "512", "--v", "512", "--d", "16", "--d-teacher", "24",
                                  "--chunk", "32", "--reps", "1", "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    assert all(r[k] for r in rows for k in ("date", "torch", "cpu", "threads", "command"))
    assert [(r["provider"], r["n"]) for r in rows] == [(p, n) for n in (128, 512) for p in bench_teacher_kl.PROVIDERS]
    peak = {(r["provider"], r["n"]): r["peak_bytes_beyond_grads"] for r in rows}
    for n in (128, 512):
        losses = [r["loss"] for r in rows if r["n"] == n]
        assert max(losses) - min(losses) <= 1e-5 * max(losses)
    for ours in ("bs_kernels", "bs_kernels_recompute"):
        # O(N): a handful of float32 values per row (values, two log-sum-exps, the token weights, ...)
        assert peak[ours, 512] - peak[ours, 128] <= 64 * (512 - 128)
        assert peak[ours, 512] <= 4 * 32 * 512 * 4  # at most four [C, V] float32 chunks
    assert peak["naive", 512] >= 3.5 * peak["naive", 128]
    assert peak["naive", 512] > 10 * peak["bs_kernels", 512]
