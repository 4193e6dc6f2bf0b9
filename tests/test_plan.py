"""The recipe's time plan (``bs-unlearn recipe --plan``, bs_train/recipes/plan.py): what the GPU job's budget rests on.

The job's settings must be predicted inside one 9-minute call at the stated assumptions, the full default recipe
must not be (that is why the job runs less), and the plan must count what the runs would do: the real sampler's
padded tokens, so bucketing shows up, and the rows of the data when it is there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bs_train.cli import main
from bs_train.recipes.plan import GPUS, Hardware, ModelShape, recipe_plan, total_seconds
from bs_train.recipes.tofu import FINETUNE, UNLEARN, Recipe
from tools.gpu_job import TOFU_ARGS

# the workplace's copy sits beside the checkout (../shared/data/tofu), or beside the folder of worktrees
TOFU = next((p / "shared" / "data" / "tofu" for p in Path(__file__).resolve().parents[1:4]
             if (p / "shared" / "data" / "tofu").is_dir()), Path("../shared/data/tofu"))


def _plan_cli(tmp_path, capsys, data, *extra) -> tuple[int, str]:
    code = main(["recipe", "--data", str(data), "--out", str(tmp_path / "runs"), "--plan", *extra])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("gpu, peak, hbm", [("h100", "798.0", "3.0"), ("h200", "790.0", "4.3")])
def test_the_tofu_job_is_planned_inside_one_call_on_either_gpu_and_the_full_recipe_is_not(tmp_path, capsys, gpu,
                                                                                         peak, hbm):
    code, text = _plan_cli(tmp_path, capsys, tmp_path / "absent", *TOFU_ARGS, "--plan-gpu", gpu)
    assert code == 0, text
    total = float(text.split("  total ")[1].split(" s")[0])
    assert total <= 540 and "fits" in text and f"on one {GPUS[gpu].name}" in text
    for word in (f"peak_tflops {peak}", f"hbm_tbs {hbm}", "mfu 0.25", "finetune", "select", "unlearn", "evaluate"):
        assert word in text
    code, text = _plan_cli(tmp_path, capsys, tmp_path / "absent")
    assert code == 3 and "does NOT fit" in text


def test_bucketing_cuts_the_planned_tokens_and_time(tmp_path):
    def plan(window):
        ft = [*FINETUNE, f"train.bucket_window={window}"]
        ul = [*UNLEARN, f"train.bucket_window={window}"]
        return recipe_plan(Recipe(tmp_path, str(TOFU if TOFU.is_dir() else tmp_path / "absent"), methods=("ga",),
                                  lr_grid=(1e-5,), finetune=ft, unlearn=ul))
    on, off = plan(50), plan(0)
    ft_on, ft_off = on[0], off[0]
    assert ft_on.sequences == ft_off.sequences == 12 * 4000  # 12 epochs of TOFU full either way
    if TOFU.is_dir():  # real lengths vary; the stated statistics have one length per split (no padding to cut)
        assert ft_on.tokens < 0.9 * ft_off.tokens and total_seconds(on) < total_seconds(off)


@pytest.mark.skipif(not TOFU.is_dir(), reason="no TOFU copy in ../shared/data/tofu")
def test_the_plan_reads_the_rows_of_the_data(tmp_path):
    work = recipe_plan(Recipe(tmp_path, str(TOFU), methods=("graddiff",), lr_grid=(1e-5,)))
    select = next(w for w in work if w.stage == "select" and not w.item.startswith("eval"))
    assert select.sequences == 10 * 200 * 2  # 10 epochs of forget05, each row beside a retain95 row
    assert 70 < select.tokens / select.sequences < 100  # TOFU's rows are ~83 tokens with SmolLM2's template


def test_bad_assumptions_are_refused_by_name():
    with pytest.raises(ValueError, match="Hardware.mfu must be <= 1"):
        Hardware(mfu=2.0)
    with pytest.raises(ValueError, match="ModelShape.layers must be >= 1"):
        ModelShape(layers=0)
