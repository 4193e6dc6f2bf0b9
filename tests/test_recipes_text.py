"""The MUSE and WMDP recipes (``bs_train/recipes/muse.py``, ``wmdp.py``) on a tiny model and generated data in each
benchmark's layout: every stage, the files they leave, a rerun that starts no new work, the scalability and
sustainability runs, and the time plans."""

from __future__ import annotations

import json

import pytest

from bs_train import cli
from bs_train.data.synthetic import make_muse, make_wmdp, write_folder
from bs_train.recipes import muse as muse_recipe
from bs_train.recipes import wmdp as wmdp_recipe

SHORT = ["train.batch_size=4", "train.grad_accum=1", "data.window_tokens=96", "train.log_every=1"]


@pytest.fixture(scope="module")
def muse_data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("muse") / "MUSE-Syn", make_muse(seed=4))


def test_muse_recipe_runs_every_stage_and_resumes(muse_data, tmp_path):
    recipe = muse_recipe.MuseRecipe(
        tmp_path / "runs", str(muse_data), model="tiny", methods=("ga", "bs_s"), probe_bar=0.0, max_rows=2,
        finetune=[*SHORT, "train.epochs=2", "train.lr=3e-3"],
        unlearn=[*SHORT, "train.epochs=1", "method.bss_max_new_tokens=8", "method.bss_samples=2"], eval_batch_size=4)
    assert muse_recipe.run_recipe(recipe)
    out = recipe.out
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["name"] for r in rows] == ["target", "retain", "ga", "bs_s"]
    assert all(0 <= r["forget_verbmem_ROUGE"] <= 1 and r["privleak_reference"] == "retain model" for r in rows)
    assert rows[1]["privleak"] == pytest.approx(0.0)  # the retain model against itself
    assert "VerbMem F" in (out / "results.md").read_text()
    cfg = (out / "bs_s" / "config.yaml").read_text()
    assert "benchmark: muse" in cfg and "forget_split: raw/forget" in cfg and "lr: 1.0e-05" in cfg
    probe = json.loads((out / "target" / "verbmem_probe.json").read_text())
    assert probe["rows"] == 2 and len(probe["examples"]) == 2
    log = (out / "stages.jsonl").read_text().splitlines()
    assert muse_recipe.run_recipe(recipe)  # everything done: no new piece of work
    assert (out / "stages.jsonl").read_text().splitlines() == log


def test_scalability_and_sustainability_runs(muse_data, tmp_path):
    r = muse_recipe.MuseRecipe(tmp_path, str(muse_data), methods=("ga",), scalability=True, sustainability=True)
    runs = muse_recipe.runs(r)
    scal = [x for x in runs if x[0].startswith("scal/")]
    assert [x[2] for x in scal] == ["scal/forget_1", "sust/forget_1+sust/forget_2",
                                    "sust/forget_1+sust/forget_2+sust/forget_3",
                                    "sust/forget_1+sust/forget_2+sust/forget_3+sust/forget_4"]
    sust = [x for x in runs if x[0].startswith("sust/")]
    assert [x[2] for x in sust] == [f"sust/forget_{k}" for k in range(1, 5)]
    assert sust[0][3] == r.target_path and sust[2][3] == str(tmp_path / "sust/ga_2" / "final")  # each from the last
    muse_recipe.preflight(r)  # every split exists (the missing scal/forget_k made of sust/forget_1..k)


def test_wmdp_recipe_runs_every_stage(tmp_path):
    pytest.importorskip("lm_eval")
    files = write_folder(tmp_path / "files", make_wmdp(seed=5))
    recipe = wmdp_recipe.WmdpRecipe(
        tmp_path / "runs", str(files), model="tiny", methods=("ga", "rmu"), questions=str(files), mmlu=str(files),
        tasks=("wmdp_cyber", "mmlu"), limit=3, eval_batch_size=4,
        unlearn=[*SHORT, "train.max_steps=2", "method.rmu_layer=0"])
    assert wmdp_recipe.run_recipe(recipe)
    rows = json.loads((recipe.out / "results.json").read_text())["results"]
    assert [r["name"] for r in rows] == ["original", "ga", "rmu"]
    assert all(0 <= r["wmdp_cyber"] <= 1 and r["n_questions"]["wmdp_cyber"] == 3 for r in rows)
    cfg = (recipe.out / "rmu" / "config.yaml").read_text()
    assert "forget_split: cyber-forget-corpus" in cfg and "rmu_params: down_proj" in cfg
    assert "at most 3 questions" in (recipe.out / "results.md").read_text()


def test_time_plans_and_one_line_errors(muse_data, tmp_path, capsys):
    assert cli.main(["recipe", "--benchmark", "muse", "--data", str(muse_data), "--out", str(tmp_path / "m"),
                     "--methods", "ga,bs_s", "--plan", "--budget-s", "1e9"]) == 0
    text = capsys.readouterr().out
    assert "MuseRecipe" in text and "unlearn" in text and "fits" in text
    assert cli.main(["recipe", "--benchmark", "wmdp", "--data", "cais/wmdp-corpora", "--out", str(tmp_path / "w"),
                     "--plan", "--budget-s", "1"]) == 3
    assert "does NOT fit" in capsys.readouterr().out
    assert cli.main(["recipe", "--benchmark", "muse", "--data", str(muse_data), "--out", str(tmp_path / "m"),
                     "--methods", "dpo"]) == 2
    assert "do not run on MUSE's raw text" in capsys.readouterr().err
    assert cli.main(["recipe", "--benchmark", "wmdp", "--data", str(muse_data), "--stage", "finetune",
                     "--out", str(tmp_path / "w")]) == 2
    assert "the wmdp recipe's stages are unlearn, evaluate, table" in capsys.readouterr().err


def test_the_muse_slice_trains_on_exactly_what_its_probes_read(muse_data, tmp_path):
    from tools import muse_mini

    sizes = muse_mini.main(["--data", str(muse_data), "--out", str(tmp_path / "mini"), "--rows", "3",
                            "--prompt-words", "5", "--text-words", "7"])
    from bs_train.data import load_rows, load_texts

    forget = load_texts(tmp_path / "mini", "raw/forget")
    verbmem = load_rows(tmp_path / "mini", "verbmem/forget", lambda r, w: r)
    assert len(verbmem) == 3 and all(len(r["prompt"].split()) <= 5 for r in verbmem)
    assert [f"{r['prompt']} {r['gt']}" for r in verbmem] == forget[:3]  # what VerbMem reads is what is trained on
    priv = load_texts(tmp_path / "mini", "privleak/forget")
    assert priv == forget[3:] and all(len(t.split()) <= 7 for t in priv)  # the MIA's members, all of them
    assert sizes["raw/retain1 words"] >= sizes["raw/forget words"] - 7
