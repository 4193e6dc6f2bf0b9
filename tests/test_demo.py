"""The README's main job, ``bs-unlearn demo``, in its shortened form: offline, end to end, on the CPU."""

from __future__ import annotations

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
    for method in METHODS:  # each method at the rate that scored best on the selection slice, not a shared one
        sel = out["selection"][method]
        assert len(sel["agg"]) == len(LR_GRID_QUICK) and sel["agg"][f"{sel['lr']:g}"] == max(sel["agg"].values())
        assert rows[method]["lr"] == sel["lr"]
        assert yaml.safe_load((tmp_path / method / "config.yaml").read_text())["train"]["lr"] == sel["lr"]
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "Agg." in table
    assert (tmp_path / "results.json").exists()
