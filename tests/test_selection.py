"""Evaluation during training and checkpoint selection (``train.eval_every`` / ``select_by``, issue 27).

* the in-training evaluation is the suite's: on the same rows it gives ``evaluate_loaded``'s numbers;
* 2 gloo ranks under FSDP2 (rows sharded, model sharded) give 1 process's evaluation values and selected step;
* the selected export reloads and scores as logged, ``last/`` as the last step; evaluating does not change training;
* a run stopped or SIGKILLed after a selection resumes with the same best state, onto the same export;
* the stopping rules (patience, a bound) end the run and export the best state so far; ``stop_at_epoch`` ends a run
  early on the full run's learning-rate schedule; raw-text runs select by window NLL;
* bad settings are one line, before the model loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bs_train import checkpoint
from bs_train.config import load_config
from bs_train.evaluation.in_training import InTrainingEval
from bs_train.model import LossHead, load_model
from bs_train.selection import Criterion, Selector, StopRule
from bs_train.optim import lr_lambda
from bs_train.trainer import run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from small_runs import SMALL  # noqa: E402

# 8 NPO steps of 2 forget rows on the tiny original, evaluated every 2 steps on forget10 (5 rows) and
# retain_perturbed (5 rows), greedy answers of up to 16 tokens: about 0.3 s an evaluation here.
EVAL = ["train.eval_every=2", "train.eval_max_new_tokens=16", "train.eval_batch_size=3"]


def _args(original: Path, out: Path | None, *extra: str) -> list[str]:
    where = [f"output_dir={out}"] if out is not None else []
    return [*SMALL, f"model.path={original / 'final'}", f"data.source={original / 'data'}", "method.name=npo",
            "train.batch_size=2", "train.lr=1e-3", "train.max_steps=8", "train.warmup_steps=0", *EVAL, *where,
            *extra]


def _trajectory(run_dir: Path) -> dict:
    return json.loads((run_dir / "trajectory.json").read_text())


def _close(a: dict, b: dict, rel: float) -> None:
    assert [e["step"] for e in a["trajectory"]] == [e["step"] for e in b["trajectory"]]
    for ea, eb in zip(a["trajectory"], b["trajectory"]):
        assert set(ea) - {"save_s"} == set(eb) - {"save_s"}
        for key in ea:
            if key not in ("eval_s", "save_s"):
                assert ea[key] == pytest.approx(eb[key], rel=rel, abs=1e-6), (key, ea, eb)


def _evaluator(data: Path, tokenizer) -> InTrainingEval:
    """The evaluation the runs below make (``EVAL``): the first 40 rows of forget10 and retain_perturbed."""
    return InTrainingEval.for_tofu(tokenizer, str(data), "forget10", ("retain_perturbed",), rows=40,
                                   max_new_tokens=16, batch_size=3, impl="torch")


# ---- the selector ------------------------------------------------------------------------------------------------


def test_the_selector_keeps_the_earliest_best_and_stops_by_its_rules():
    sel = Selector(Criterion.parse("agg", "tofu"), patience=2)
    assert sel.criterion.mode == "max" and Criterion.parse("forget_Q_A_Prob", "tofu").mode == "min"
    assert not sel.record(0, 0.0, {"agg": 0.9}, 0.1)  # the baseline is logged, never a candidate
    assert sel.record(2, 1.0, {"agg": 0.3}, 0.1) and sel.best["step"] == 2
    assert not sel.record(4, 2.0, {"agg": 0.3}, 0.1)  # a tie keeps the earlier step
    assert sel.record(6, 3.0, {"agg": 0.5}, 0.1) and sel.stopped is None
    sel.record(8, 4.0, {"agg": 0.4}, 0.1)
    assert sel.stopped is None
    sel.record(10, 5.0, {"agg": 0.2}, 0.1)
    assert sel.stopped == "2 evaluations without a better agg:max" and sel.best == {"step": 6, "epoch": 3.0,
                                                                                    "value": 0.5}
    again = Selector(Criterion.parse("agg", "tofu"), patience=2)
    again.load_state_dict(sel.state_dict())
    assert again.state_dict() == sel.state_dict()
    bound = Selector(Criterion.parse("mem:min", "tofu"), stop_if=StopRule.parse("model_utility<0.3", "tofu"))
    bound.record(2, 1.0, {"mem": 0.5, "model_utility": 0.4}, 0.1)
    assert bound.stopped is None
    bound.record(4, 2.0, {"mem": 0.7, "model_utility": 0.25}, 0.1)
    assert bound.stopped == "model_utility 0.25 < 0.3" and bound.best["step"] == 2


@pytest.mark.parametrize("overrides, match", [
    (["train.select_by=agg"], r"train.select_by reads the in-training evaluations: set train.eval_every"),
    (["train.eval_every=0"], r"train.eval_every='0': give N \(steps\) or N epochs"),
    (["train.eval_every=2", "train.select_by=agg:best"], r"the direction must be max or min, got 'best'"),
    (["train.eval_every=2", "train.select_by=rouge"], r"'rouge' is not a metric of the in-training tofu evaluation"),
    (["train.eval_every=2", "train.stop_if=model_utility=0.3"], r"train.stop_if='model_utility=0.3': write a metric"),
    (["train.eval_every=2", "train.select_patience=3"], r"select_patience counts evaluations without a better"),
    (["train.eval_every=2", "train.eval_utility_splits=retain"], r"'retain' is not one of"),
    (["data.benchmark=muse", "data.source=x", "train.eval_every=2", "train.select_by=agg"],
     r"'agg' is not a metric of the in-training muse evaluation; one of \['forget_nll', 'retain_nll'\]"),
])
def test_bad_settings_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides, command="unlearn")


def test_a_metric_this_data_cannot_give_fails_before_the_model_loads(original, tmp_path, monkeypatch):
    import bs_train.trainer as trainer

    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = load_config(None, _args(original, tmp_path / "r", "train.select_by=ra_Q_A_ROUGE"), command="unlearn")
    with pytest.raises(ValueError, match=r"does not measure ra_Q_A_ROUGE \(no real_authors split"):
        run(cfg, progress=False)


# ---- the evaluation ----------------------------------------------------------------------------------------------


def test_the_light_evaluation_is_the_suites_on_the_same_rows(original):
    from bs_train.evaluation.tofu import evaluate_loaded, first_rows

    model, tok = load_model(str(original / "final"))
    light = _evaluator(original / "data", tok)(LossHead(model), model)
    suite = evaluate_loaded(model, tok, first_rows(str(original / "data"), 40), forget_split="forget10",
                            judge="none", max_new_tokens=16, batch_size=3, impl="torch",
                            utility_splits=("retain_perturbed",))
    common = sorted(set(light) & set(suite))
    assert {"forget_Q_A_Prob", "forget_Q_A_ROUGE", "mem", "model_utility", "util", "agg"} <= set(common)
    for key in common:
        assert light[key] == pytest.approx(suite[key], rel=1e-5, abs=1e-7), key


def test_two_ranks_give_one_process_values_and_selected_step(original, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    common = ["unlearn", *_args(original, None, "train.select_by=mem"), "--no-progress"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "bs_train.cli", *common,
           f"output_dir={tmp_path / 'fsdp'}", "train.grad_accum=1"]
    one = [sys.executable, "-m", "bs_train.cli", *common, f"output_dir={tmp_path / 'single'}", "train.grad_accum=2"]
    for cmd in (two, one):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _trajectory(tmp_path / "fsdp"), _trajectory(tmp_path / "single")
    assert [e["step"] for e in a["trajectory"]] == [0, 2, 4, 6, 8]
    _close(a, b, rel=1e-4)
    assert a["chosen"]["step"] == b["chosen"]["step"]
    for name in ("fsdp", "single"):  # metrics.jsonl holds the same evaluations, step 0 first
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines if "eval" in x] == [0, 2, 4, 6, 8]


SELECTED = ("train.select_by=retain_Q_A_Prob", "train.export_last=true", "train.checkpoint_every=3")


@pytest.fixture(scope="module")
def selected(original, tmp_path_factory) -> Path:
    """An uninterrupted run selecting by retain answer probability (highest early: the chosen step is not the
    last), checkpointing every 3 steps, exporting the last step too."""
    out = tmp_path_factory.mktemp("selection") / "full"
    run(load_config(None, _args(original, out, *SELECTED), command="unlearn"), progress=False)
    return out


def test_the_selected_export_reloads_and_scores_as_logged(original, selected):
    doc = _trajectory(selected)
    chosen, last = doc["chosen"]["step"], doc["trajectory"][-1]
    assert doc["criterion"] == "retain_Q_A_Prob:max" and 0 < chosen < last["step"] == 8
    logged = {e["step"]: e for e in doc["trajectory"]}
    assert logged[chosen]["retain_Q_A_Prob"] == max(e["retain_Q_A_Prob"] for e in doc["trajectory"][1:])
    for folder, step in (("final", chosen), ("last", 8)):
        model, tok = load_model(str(selected / folder))
        again = _evaluator(original / "data", tok)(LossHead(model), model)
        for key, value in again.items():
            assert value == pytest.approx(logged[step][key], rel=1e-5, abs=1e-7), (folder, key)
    summary = json.loads((selected / "summary.json").read_text())
    assert summary["selection"]["chosen"]["step"] == chosen and summary["steps"] == 8
    assert (selected / "trajectory.png").stat().st_size > 0
    assert not (selected / "best").exists() and not (selected / "checkpoints").exists()  # exported: not kept


def test_evaluating_does_not_change_training(original, selected, tmp_path):
    plain = [a for a in _args(original, tmp_path / "plain") if not a.startswith("train.eval_")]
    run(load_config(None, plain, command="unlearn"), progress=False)
    a = [json.loads(x) for x in (selected / "metrics.jsonl").read_text().splitlines()][1:]  # after step 0's line
    b = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"]


def _weights_equal(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_a_run_killed_after_a_selection_resumes_with_the_same_best_state(original, selected, tmp_path):
    """SIGKILLed while writing its step-6 checkpoint: the step-3 checkpoint names the best state so far, which
    ``best/`` still holds; the rerun resumes from step 3 onto the uninterrupted run's trajectory and exports."""
    out = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", checkpoint.FAULT_ENV: "save:weights@2"}
    cmd = [sys.executable, "-m", "bs_train.cli", "unlearn", *_args(original, out, *SELECTED), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    chosen = _trajectory(selected)["chosen"]["step"]
    assert chosen < 3 and (out / "best" / f"step_{chosen:07d}").is_dir()
    lost = tmp_path / "lost"  # a copy whose best state is gone: refused before training, by name
    shutil.copytree(out, lost, ignore=shutil.ignore_patterns("best"))
    with pytest.raises(ValueError, match=rf"selected state .*step_{chosen:07d} is unusable \(it is not there\)"):
        run(load_config(None, _args(original, lost, *SELECTED), command="unlearn"), progress=False)
    run(load_config(None, _args(original, out, *SELECTED), command="unlearn"), progress=False)
    _close(_trajectory(out), _trajectory(selected), rel=1e-5)
    assert _trajectory(out)["chosen"] == _trajectory(selected)["chosen"]
    _weights_equal(out / "final", selected / "final")
    _weights_equal(out / "last", selected / "last")


def test_a_resume_keeps_the_best_state_of_every_checkpoint_and_drops_those_past_it(tmp_path):
    """What ``best/`` keeps: the state each checkpoint on disk names as its best (a resume may fall back to either),
    the current best, and nothing measured after the checkpoint a run resumes from (a kill came between that state
    and its checkpoint; the resumed run measures that step again)."""
    from bs_train.selected_state import named_by_checkpoints, prune

    for step, best in ((3, 2), (6, 5)):
        folder = tmp_path / "checkpoints" / f"step_{step:07d}"
        folder.mkdir(parents=True)
        torch.save({"step": step, "extra": {"selection": {"best": {"step": best}}}}, folder / "trainer_state.pt")
    for step in (2, 4, 5, 7):
        (tmp_path / "best" / f"step_{step:07d}").mkdir(parents=True)
    (tmp_path / "best" / "step_0000008.tmp").mkdir()
    assert named_by_checkpoints(tmp_path) == {2, 5}
    prune(tmp_path, named_by_checkpoints(tmp_path) | {7}, after=6)
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["step_0000002", "step_0000005"]


# ---- stopping ----------------------------------------------------------------------------------------------------


def test_patience_stops_the_run_and_exports_the_best_state_so_far(original, selected, tmp_path):
    out = tmp_path / "patient"
    summary = run(load_config(None, _args(original, out, "train.select_by=retain_Q_A_Prob",
                                          "train.select_patience=1"), command="unlearn"), progress=False)
    doc = _trajectory(out)
    chosen = doc["chosen"]["step"]
    assert summary["steps"] == chosen + 2 < 8  # one evaluation without a better value, then stop
    assert doc["stopped"] == "1 evaluation without a better retain_Q_A_Prob:max"
    assert summary["selection"]["stopped"] == doc["stopped"]
    _weights_equal(out / "final", selected / "final")  # the same step of the same run


def test_stop_at_epoch_keeps_the_whole_runs_schedule(original, tmp_path):
    args = [*SMALL, f"model.path={original / 'final'}", f"data.source={original / 'data'}", "method.name=ga",
            "train.batch_size=2", "train.epochs=4", "train.warmup_steps=0", "train.schedule=linear",
            "train.stop_at_epoch=1.5", f"output_dir={tmp_path / 'r'}"]
    cfg = load_config(None, args, command="unlearn")
    summary = run(cfg, progress=False)
    per_epoch = 3  # 5 forget rows in batches of 2
    assert summary["steps"] == round(1.5 * per_epoch) == 4
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    f = lr_lambda(cfg.train, 4 * per_epoch)
    assert lrs == pytest.approx([cfg.train.lr * f(k) for k in range(1, 5)])


def test_a_raw_text_run_selects_by_its_window_nll(tmp_path):
    from bs_train.data.synthetic import make_muse, write_folder

    muse = write_folder(tmp_path / "muse", make_muse(seed=1))
    out = tmp_path / "ga"
    run(load_config(None, ["model.path=tiny", "data.benchmark=muse", f"data.source={muse}", "data.window_tokens=96",
                           "method.name=ga", "train.batch_size=4", "train.max_steps=4", "train.lr=2e-3",
                           "train.eval_every=2", "train.select_by=forget_nll", "train.eval_rows=3",
                           f"output_dir={out}"], command="unlearn"), progress=False)
    doc = _trajectory(out)
    assert doc["criterion"] == "forget_nll:max"
    assert [e["step"] for e in doc["trajectory"]] == [0, 2, 4]
    assert all(set(e) - {"save_s"} == {"step", "epoch", "eval_s", "forget_nll", "retain_nll"}
               for e in doc["trajectory"])
    assert doc["trajectory"][-1]["forget_nll"] > doc["trajectory"][0]["forget_nll"]  # GA: forgetting
    best = max(doc["trajectory"][1:], key=lambda e: e["forget_nll"])
    assert doc["chosen"]["step"] == best["step"]
