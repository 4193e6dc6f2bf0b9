"""WMDP's evaluation: hazardous-knowledge accuracy (``wmdp_bio``, ``wmdp_chem``, ``wmdp_cyber``; lower is better
after unlearning, 0.25 is chance) beside general knowledge (``mmlu``; kept), through lm-evaluation-harness on the
in-memory model (``harness.py``), zero-shot as its tasks are (open-unlearning ``configs/eval/lm_eval.yaml``).

``evaluate_model`` loads a model (run folder, model folder, ``smollm2-135m``, Hub id), writes the task folder for
local files into a temporary folder (``tasks.write_tasks``; the Hub ids need none), runs the tasks and returns one
flat dict: ``wmdp_bio`` ... ``mmlu`` accuracies, their standard errors and question counts, and ``wmdp`` (all WMDP
questions, weighted by size). A ``limit`` (questions per task, and per MMLU subject) bounds a quick look and is said.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ..common import load_eval_model
from . import harness
from .tasks import MMLU_TASK, TASKS, WMDP_TASKS, is_hub, write_tasks

CHANCE = 0.25  # four choices


def evaluate_loaded(model, tokenizer, *, wmdp: Any = None, mmlu: Any = None, tasks: tuple[str, ...] = TASKS,
                    batch_size: int = 16, limit: int | None = None, task_dir: str | os.PathLike[str] | None = None,
                    ) -> dict[str, Any]:
    """Accuracies of an already loaded model; ``task_dir``: where to write the task folder (a temporary one when
    None)."""
    with tempfile.TemporaryDirectory(prefix="bs_lm_eval_") as tmp:
        folder = write_tasks(task_dir or tmp, tasks, wmdp=wmdp, mmlu=mmlu)
        hub = any(t in WMDP_TASKS for t in tasks) and is_hub(wmdp, "cais/wmdp") or \
            MMLU_TASK in tasks and is_hub(mmlu, "cais/mmlu")  # lm-eval's built-in tasks read the Hub
        out = harness.run(model, tokenizer, list(tasks), task_dir=folder, include_defaults=hub,
                          batch_size=batch_size, limit=limit)
    res: dict[str, Any] = {task: out["accuracy"][task] for task in tasks}
    res.update({f"{task}_stderr": out["stderr"][task] for task in tasks})
    res["n_questions"] = out["n"]
    wmdp_tasks = [t for t in tasks if t in WMDP_TASKS]
    if wmdp_tasks:
        total = sum(out["n"][t] for t in wmdp_tasks)
        res["wmdp"] = sum(out["accuracy"][t] * out["n"][t] for t in wmdp_tasks) / max(total, 1)
    notes = []
    if limit is not None:
        notes.append(f"at most {limit} questions per task{' and per MMLU subject' if MMLU_TASK in tasks else ''} "
                     "(--limit): not the full sets")
    return {**res, "benchmark": "wmdp", "chance": CHANCE, "lm_eval_version": out["lm_eval_version"], "notes": notes}


def evaluate_model(spec: str | os.PathLike[str], *, wmdp: Any = None, mmlu: Any = None,
                   tasks: tuple[str, ...] = TASKS, batch_size: int = 16, limit: int | None = None,
                   device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
    """Load one model and evaluate it (``evaluate_loaded``); writes nothing but a temporary task folder."""
    model, tok = load_eval_model(spec, device=device, dtype=dtype)
    res = evaluate_loaded(model, tok, wmdp=wmdp, mmlu=mmlu, tasks=tasks, batch_size=batch_size, limit=limit)
    res["model"] = str(spec)
    res["settings"] = {"wmdp": str(wmdp) if wmdp is not None else "cais/wmdp",
                       "mmlu": str(mmlu) if mmlu is not None else "cais/mmlu", "tasks": list(tasks),
                       "limit": limit, "batch_size": batch_size}
    return res
