"""What every benchmark's recipe does the same way: resumable stages inside a time budget, one run folder per
training run, result files kept under the rule of ``bs_train/outputs.py``, and a log of what ran where.

A recipe (``tofu.py``, ``muse.py``, ``wmdp.py``) is a dataclass with at least ``out``, ``data``, ``budget_s``,
``preset`` and ``overwrite``, and an ordered table of stage functions ``stage(recipe, clock) -> bool`` (False: stopped
at the budget). ``run_stages`` runs them under the folder's lock; each stage skips finished work, so a rerun resumes:

* ``train``: one training run in ``out/<name>``, skipped once its ``final/`` exists (exported atomically, so it is
  whole), a cut-off one resumed from its last checkpoint;
* ``write``: a result file, only over one this recipe wrote and that is unchanged since (the ledger
  ``recipe.json``: size and sha256), atomically; ``check_outputs`` applies the same rule to every result file
  already there before any work;
* ``log``: a line of ``stages.jsonl`` per piece of work (what, how long, on which device and host, when).
"""

from __future__ import annotations

import json
import platform
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import load_config
from ..outputs import Ledger, read_json

LEDGER = "recipe.json"
"""The recipe's ledger in ``out``: every result file it wrote, with its size and sha256 (``bs_train/outputs.py``)."""


class RecipeError(ValueError):
    """The recipe cannot start: a missing split, judge or package (checked before any training)."""


def ledger(recipe: Any) -> Ledger:
    return Ledger(recipe.out, LEDGER, command="recipe")


def write(recipe: Any, path: Path, data: Any) -> None:
    """Write one of the recipe's result files (a dict as JSON, else text): only over a file the recipe wrote itself
    and that is unchanged since, unless ``recipe.overwrite``; atomically; recorded in the ledger."""
    ledger(recipe).write(path, data if isinstance(data, str) else json.dumps(data, indent=1) + "\n",
                         overwrite=recipe.overwrite)


def read_evaluations(recipe: Any, names: Iterable[str], filename: str) -> list[dict]:
    """Each named run's evaluation (``out/<name>/<filename>``), or a one-line error naming the first missing one."""
    rows = []
    for name in names:
        res = read_json(recipe.out / name / filename)
        if res is None:
            raise RecipeError(f"{recipe.out / name / filename} is missing: run the evaluate stage")
        rows.append(res)
    return rows


def write_table(recipe: Any, rows: list[dict], columns: list[tuple[str, str]], describe: dict) -> None:
    """The table stage's outputs: ``results.md`` (the table, then each note of its rows once) and ``results.json``
    (``describe``, the recipe's settings, and the rows without their per-example data); the table is printed too."""
    from ..evaluation.report import markdown_table

    table = markdown_table(rows, columns)
    table += "".join(f"\nnote: {n}\n" for n in sorted({n for r in rows for n in r.get("notes", [])}))
    slim = [{k: v for k, v in r.items() if k != "per_example"} for r in rows]
    write(recipe, recipe.out / "results.json", {"recipe": describe, "results": slim})
    write(recipe, recipe.out / "results.md", table)
    print(table, end="")


def settings(recipe: Any) -> dict:
    """The recipe's settings as written beside its results (its folder as a string)."""
    return {**asdict(recipe), "out": str(recipe.out)}


def check_outputs(recipe: Any, files: Iterable[str], per_run: str) -> None:
    """Before any work: ``files`` (relative to ``out``) and every ``per_run`` file under ``out`` (each run's
    evaluation) that exist must be this recipe's and unchanged since, unless ``recipe.overwrite``."""
    existing = [recipe.out / f for f in files] + sorted(recipe.out.rglob(per_run))
    ledger(recipe).check([p for p in existing if p.exists()], overwrite=recipe.overwrite)


class Clock:
    """The command's time budget: no new piece of work starts after ``recipe.budget_s`` seconds."""

    def __init__(self, recipe: Any):
        self.recipe, self.t0 = recipe, time.perf_counter()

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.t0 > self.recipe.budget_s


def log(recipe: Any, stage: str, item: str, seconds: float, **extra: Any) -> None:
    """Append one line to ``stages.jsonl``: the piece of work, its seconds, device, host and date."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    row = {"stage": stage, "item": item, "seconds": round(seconds, 1), "device": device, "host": socket.gethostname(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    path, book = recipe.out / "stages.jsonl", ledger(recipe)
    book.check([path], overwrite=recipe.overwrite)
    recipe.out.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    book.record(path)


def train(recipe: Any, stage: str, name: str, command: str, args: list[str]) -> None:
    """Train one run unless its ``final/`` exists, resuming a cut-off one. The trainer deletes a finished run's
    checkpoints itself (``train.keep_checkpoints`` is off): only resuming needs them, and at ~3x the weights
    (optimizer states) per checkpoint a recipe's runs would fill a 64 GB disk."""
    from ..trainer import run

    run_dir = recipe.out / name
    if (run_dir / "final" / "config.json").exists():
        return
    t0 = time.perf_counter()
    cfg = load_config(None, [f"output_dir={run_dir}", f"data.source={recipe.data}", *args], command=command,
                      preset=recipe.preset if command == "unlearn" else None)
    run(cfg, progress=True)
    log(recipe, stage, name, time.perf_counter() - t0)


def run_stages(recipe: Any, stages: dict[str, Callable[[Any, Clock], bool]], stage: str,
               check: Callable[[Any], None]) -> bool:
    """Run ``stage`` (or every stage, ``"all"``) in order under the folder's lock, after ``check`` (the result files
    already there); True when everything asked for is done, False when the budget stopped it."""
    from ..run_lock import RunLock

    if stage != "all" and stage not in stages:
        raise ValueError(f"stage must be 'all' or one of {tuple(stages)}, got {stage!r}")
    with RunLock(recipe.out, say=print):  # one recipe per folder: a second is refused naming the first's PID
        check(recipe)
        clock = Clock(recipe)
        for name in stages if stage == "all" else (stage,):
            if not stages[name](recipe, clock):
                print(f"recipe: stopped in stage {name!r} at the {recipe.budget_s:.0f} s budget; run the same "
                      "command again to continue")
                return False
    print(f"recipe: {stage} done; see {recipe.out}/results.md and {recipe.out}/stages.jsonl")
    return True
