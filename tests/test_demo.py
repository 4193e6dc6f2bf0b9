"""The README's main job, ``bs-unlearn demo``, in its shortened form: offline, end to end, on the CPU."""

from __future__ import annotations

import json

import yaml

from bs_train.demo import LR_GRID_QUICK, METHODS, run_demo


def test_quick_demo_runs_end_to_end(tmp_path):
    out = run_demo(tmp_path, quick=True, progress=False)
    rows = {r["name"]: r for r in out["results"]}
    assert list(rows) == ["original", "retain", *METHODS]
    original = rows["original"]["forget_Q_A_Prob"]
    assert original >= 0.8  # the original model knows the forget set before unlearning starts
    assert rows["retain"]["forget_Q_A_Prob"] < 0.5 * original  # the retain reference never saw it
    for method in METHODS:
        assert rows[method]["forget_Q_A_Prob"] < original, method  # every method unlearned something
        assert (tmp_path / method / "squeezing.png").stat().st_size > 10_000
    for row in rows.values():
        for key in ("forget_quality", "model_utility", "mem", "util", "agg"):
            assert 0.0 <= row[key] <= 1.0, (row["name"], key, row[key])
    for method in METHODS:  # each method at the (rate, step) that scored best on the selection slice, not a shared one
        sel = out["selection"][method]
        agg = {lr: v["value"] for lr, v in sel["by_lr"].items()}
        assert len(agg) == len(LR_GRID_QUICK) and agg[f"{sel['lr']:g}"] == max(agg.values())
        picked = json.loads((tmp_path / "select" / f"{method}_lr{sel['lr']:g}" / "trajectory.json").read_text())
        assert picked["chosen"]["step"] == sel["step"] and picked["chosen"]["value"] == sel["value"]
        assert picked["chosen"]["value"] == max(e["agg"] for e in picked["trajectory"][1:])
        final = yaml.safe_load((tmp_path / method / "config.yaml").read_text())["train"]
        assert final["lr"] == sel["lr"] and final["stop_at_epoch"] == sel["epoch"]
        ran = json.loads((tmp_path / method / "summary.json").read_text())
        assert rows[method]["lr"] == sel["lr"] and rows[method]["step"] == f"{ran['steps']}/{ran['selection']['schedule_steps']}"
        assert (tmp_path / method / "trajectory.png").stat().st_size > 10_000  # beside its squeezing plot
    timing = out["timing"]  # the in-training evaluation's cost, on each run's own clock
    assert 0 < timing["in_training_eval_s"] <= timing["in_training_added_s"] < timing["seconds"]
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "Agg." in table
    assert (tmp_path / "results.json").exists()
    # the quick attack: its column in the table, its own table and relearning plots under attacks/
    assert "Attack rec. (worst)" in table and rows["original"]["attack_worst"] == 1.0
    assert (tmp_path / "attacks" / "attacks.md").exists() and (tmp_path / "attacks" / "relearn_npo.png").exists()
