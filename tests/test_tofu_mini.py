"""tools/tofu_mini.py on the local TOFU copy (skipped without one): every split keeps its role, and the recipe's
preflight and the project's loader accept the folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bs_train.data import load_qa
from bs_train.recipes.tofu import Recipe, preflight
from tools.tofu_mini import main

# the workplace's copy sits beside the checkout (../shared/data/tofu), or beside the folder of worktrees
TOFU_DIR = next((p / "shared" / "data" / "tofu" for p in Path(__file__).resolve().parents[1:4]
                 if (p / "shared" / "data" / "tofu").is_dir()), Path("../shared/data/tofu"))


@pytest.mark.skipif(not TOFU_DIR.is_dir(), reason=f"no local TOFU copy at {TOFU_DIR}")
def test_mini_tofu_keeps_every_split_in_its_role(tmp_path):
    sizes = main(["--data", str(TOFU_DIR), "--out", str(tmp_path)])
    assert sizes["full"] == 200 and sizes["forget10"] == 20 and sizes["forget05"] == 10
    q = {name: [r["question"] for r in load_qa(tmp_path, name)] for name in sizes}
    full, forget, retain = set(q["full"]), set(q["forget10"]), set(q["retain90"])
    assert forget | retain == full and not forget & retain
    assert set(q["forget05"]) <= forget and set(q["retain95"]) == full - set(q["forget05"])
    assert q["forget10_perturbed"] == q["forget10"] and q["forget05_perturbed"] == q["forget05"]
    assert set(q["retain_perturbed"]) <= retain and len(q["retain_perturbed"]) > 20
    assert not set(q["holdout10"]) & full and set(q["holdout05"]) <= set(q["holdout10"])
    assert q["real_authors_perturbed"] == q["real_authors"] and q["world_facts_perturbed"] == q["world_facts"]
    tofu_forget = {json.loads(line)["question"] for line in (TOFU_DIR / "forget01.jsonl").read_text().splitlines()}
    assert forget <= tofu_forget  # the forgotten author is one of TOFU's own forget authors
    assert preflight(Recipe(tmp_path / "runs", str(tmp_path))) == ["retain_perturbed", "real_authors", "world_facts"]


def test_mini_tofu_refuses_a_folder_that_is_not_tofu(tmp_path):
    (tmp_path / "full.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ValueError, match="full.jsonl has 1 rows; TOFU's has 4000"):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="expected full.jsonl"):
        main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])


@pytest.mark.skipif(not TOFU_DIR.is_dir(), reason=f"no local TOFU copy at {TOFU_DIR}")
def test_mini_tofu_with_one_retain_author_keeps_the_same_forget_author(tmp_path):
    sizes = main(["--data", str(TOFU_DIR), "--out", str(tmp_path / "one"), "--retain-authors", "1"])
    assert sizes["full"] == 40 and sizes["retain90"] == 20 and sizes["forget10"] == 20
    q = {name: [r["question"] for r in load_qa(tmp_path / "one", name)] for name in ("full", "retain90", "forget10",
                                                                                     "retain_perturbed")}
    nine = main(["--data", str(TOFU_DIR), "--out", str(tmp_path / "nine")])
    assert nine["forget10"] == 20
    assert q["forget10"] == [r["question"] for r in load_qa(tmp_path / "nine", "forget10")]
    assert q["retain90"] == [r["question"] for r in load_qa(tmp_path / "nine", "retain90")][:20]
    assert set(q["retain_perturbed"]) <= set(q["retain90"]) and q["retain_perturbed"]


def test_mini_tofu_refuses_more_retain_authors_than_tofu_perturbs(tmp_path):
    with pytest.raises(ValueError, match="retain_authors must lie in 1..9.*got 10"):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--retain-authors", "10"])
