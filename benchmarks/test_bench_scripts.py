"""The GPU benchmark scripts at their smoke presets: every case runs, reports a positive rate, and the results file
carries the environment a committed result must name. They are run on the GPU machine only when one is lent, so
this is what keeps them from breaking in between."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_sampler, bench_train_step, memory_budget


@pytest.mark.parametrize("script, key, want", [
    (bench_sampler, "provider", ["bs_sampler", "hf_generate"]),
    (bench_train_step, "case", ["hf_stack_graddiff", "ours_ga", "ours_npo", "ours_bs_t", "ours_bs_s_n3",
                                "ours_bs_s_n8", "ours_lora_npo", "ours_lora_bs_t", "ours_lora_bs_s_n3",
                                "ours_offload_bs_t"]),
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


def test_memory_budget_fits_each_plan_on_its_gpu(tmp_path):
    """The computed budgets at Llama-3.1-8B's shapes: 8.03 B parameters; each plan's peak within its GPU; LoRA keeps
    only 16-bit base weights resident; the offload plan holds the optimizer states in host memory and says so."""
    rows = memory_budget.main(["--out", str(tmp_path / "b.json")])
    by = {r["case"]: r for r in rows}
    assert all(r["computed"] and r["fits"] for r in rows)
    assert round(by["lora24_bs_s"]["params"] / 1e9, 2) == 8.03
    assert by["lora24_bs_s"]["peak_gib"] < 24 * 1e9 / 2**30 - 2  # >= 2 GiB of a 24 GB card left
    assert by["offload40_bs_s"]["host_gib"] > by["offload40_bs_s"]["peak_train_gib"]
    assert 0 < by["offload40_graddiff"]["time"]["tokens_per_s_grad_accum_4"] \
        < by["offload40_graddiff"]["time"]["tokens_per_s_on_gpu_same_compute"]


def test_cpu_side_by_side_compares_the_same_loss(tmp_path):
    """``--preset cpu`` at a tiny shape: every method has ours and the HF loop, on the same tokens, and their first
    steps (same weights) compute the same loss; the file names the environment and the speed-up."""
    out = tmp_path / "train_step.json"
    rows = bench_train_step.main(["--preset", "cpu", "--tiny", "--in-process", "--dtypes", "float32", "--reps", "1",
                                  "--out", str(out)])
    assert [r["case"] for r in rows] == [f"{p}_{m}" for m in ("graddiff", "npo", "bs_t", "bs_s")
                                         for p in ("ours", "hf_loop")]
    for ours, hf in zip(rows[::2], rows[1::2]):
        assert ours["tokens"] == hf["tokens"] > 0
        assert abs(ours["first_step_loss"] - hf["first_step_loss"]) < 1e-4 * max(1.0, abs(hf["first_step_loss"]))
        assert ours["speedup_vs_hf"] == hf["s_median"] / ours["s_median"] > 0
        assert ours["peak_rss_delta_mib"] >= 0 and ours["threads"] == 1 and ours["command"]
    assert json.loads(out.read_text()) == rows


def test_tables_render_ratios_within_one_file(tmp_path):
    """The performance tables of the README and docs/ come from ``benchmarks.tables``: ratios against the replaced stack."""
    from benchmarks import tables

    losses = [{"provider": p, "n": 4096, "lam": 0.2, "dtype": "float32", "ms_median": ms,
               "peak_bytes_beyond_grads": b} for p, ms, b in (("bs_kernels", 900.0, 2**27), ("torch", 1000.0, 2**30))]
    losses.append({"provider": "torch_lce", "n": 4096, "lam": 0.2, "dtype": "float32", "skipped": "lam > 0"})
    t = tables.losses_table(losses)
    assert "| float32 | 4096 | 0.2 | ours fused | 0.90 s | 0.90 | 128 MiB | 0.125 |" in t and "lce" not in t
    summary = tables.losses_summary_table(losses)
    assert "| float32 | 4096 | 0.2 | 0.90 s | **0.90** | – | – | 128 MiB (0.125) |" in summary
    step = [{"provider": p, "method": "bs_t", "dtype": "bfloat16", "tokens": 100, "s_median": s,
             "tokens_per_s": 100 / s, "peak_rss_delta_mib": m, "first_step_loss": 0.5}
            for p, s, m in (("ours", 2.0, 100.0), ("hf_loop", 3.0, 400.0))]
    want = "| bfloat16 | BS-T | 100 | 2.00 | 3.00 | **1.50x** | 100 / 400 MiB (0.25x) |"
    assert want in tables.train_step_table(step)
    samp = [{"provider": p, "dtype": "float32", "prompts": 32, "n": 3, "new_tokens": 200, "s_median": s, "s_all": a}
            for p, s, a in (("bs_sampler", 10.0, [10.0, 12.0]), ("hf_generate", 20.0, [20.0, 16.0]))]
    samp.append({"dtype": "float32", "time_bs_sampler_over_hf_generate": 0.5})
    assert "| float32 | 32 × 3 × 200 | 10.0 | 20.0 | **0.50x** | 0.50, 0.75 |" in tables.sampler_table(samp)
    f = tmp_path / "s.json"
    f.write_text(json.dumps(samp))
    assert tables.main(["sampler", str(f)]) == tables.sampler_table(samp)
    f.write_text("{broken")
    with pytest.raises(SystemExit, match="not a readable results file"):
        tables.main(["sampler", str(f)])
