"""The open-unlearning drop-in benchmark at a tiny shape: every helper's fused drop-in computes the reference's loss,
holds less memory than the full-logits helper, and every row names the environment a committed result must."""

from __future__ import annotations

import json

from benchmarks import bench_open_unlearning


def test_every_helper_matches_the_reference_with_less_memory(tmp_path):
    out = tmp_path / "ou.json"
    rows = bench_open_unlearning.main(["--preset", "smoke", "--reps", "1", "--warmup", "0", "--threads", "1",
                                       "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    helpers = list(bench_open_unlearning.cases({}, {}))
    assert [(r["helper"], r["provider"]) for r in rows] == [(h, p) for h in helpers
                                                            for p in bench_open_unlearning.PROVIDERS]
    assert all(r[k] for r in rows for k in ("date", "torch", "cpu", "threads", "command", "device"))
    for fused in rows[1::2]:
        assert fused["loss_rel_diff"] < 1e-5, fused["helper"]
        assert fused["peak_vs_reference"] < 1.0, fused["helper"]
        assert fused["peak_bytes_beyond_grads"] < fused["peak_bytes"]
