"""Repository promises: the README's test command is what CI runs, and every shipped config validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from bs_train.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme_lines = REPO.joinpath("README.md").read_text().splitlines()
    test_cmd = readme_lines[readme_lines.index("# 2. Install and run the tests (what CI runs, via .ci/run):") + 1]
    ci_lines = [ln for ln in REPO.joinpath(".ci/run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ci_lines[-1] == test_cmd


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.train.batch_size * cfg.train.grad_accum == 32  # the paper's effective batch
