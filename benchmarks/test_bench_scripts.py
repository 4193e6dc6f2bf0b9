"""The GPU benchmark scripts at their smoke presets: every case runs, reports a positive rate, and the results file
carries the environment a committed result must name. They are run on the GPU machine only when one is lent, so
this is what keeps them from breaking in between."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_sampler, bench_train_step


@pytest.mark.parametrize("script, key, want", [
    (bench_sampler, "provider", ["bs_sampler", "hf_generate"]),
    (bench_train_step, "case", ["hf_stack_graddiff", "ours_ga", "ours_npo", "ours_bs_t", "ours_bs_s_n3",
                                "ours_bs_s_n8"]),
], ids=["sampler", "train_step"])
def test_cpu_preset_runs_every_case(script, key, want, tmp_path):
    out = tmp_path / "result.json"
    dtype = ["--dtypes", "float32"] if script is bench_sampler else []
    rows = script.main(["--preset", "smoke", "--reps", "1", "--out", str(out), *dtype])
    cases = [r for r in rows if key in r]
    assert [r[key] for r in cases] == want
    assert all(r["tokens_per_s"] > 0 and r["device"] == "cpu" for r in cases)
    assert all(r["date"] and r["torch"] and r["command"] for r in cases)
    assert json.loads(out.read_text()) == rows
