"""memorization_curve.py end to end on the tiny model and the generated data: the curve has a point per epoch and
fine-tuning raises the split's answer probability and greedy token accuracy."""

from __future__ import annotations

import json

from benchmarks.memorization_curve import main

from bs_train.data.synthetic import make_splits, write_folder


def test_curve_rises_over_epochs(tmp_path):
    data = write_folder(tmp_path / "data", make_splits(4, 5, seed=0))
    out = tmp_path / "curve.json"
    curve = main(["--data", str(data), "--split", "forget10", "--model", "tiny", "--epochs", "6", "--lr", "1e-2",
                  "--batch", "2", "--warmup", "0", "--out", str(out)])
    assert [c["epoch"] for c in curve] == [0, 1, 2, 3, 4, 5, 6]
    assert curve[-1]["prob"] > 3 * curve[0]["prob"]
    assert curve[-1]["exact_memorization"] > curve[0]["exact_memorization"]
    assert all(0 <= c["prob"] <= 1 and 0 <= c["exact_memorization"] <= 1 for c in curve)
    doc = json.loads(out.read_text())
    assert doc["curve"] == curve and doc["examples"] == 5 and doc["steps_per_epoch"] == 3
