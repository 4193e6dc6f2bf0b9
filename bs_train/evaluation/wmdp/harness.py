"""Multiple-choice accuracy through lm-evaluation-harness, on the model already in memory.

lm-eval's ``HFLM`` accepts a loaded Hugging Face model (no export, no second copy): it scores each choice's
log-likelihood after the prompt, batched, and ``simple_evaluate`` reports accuracy per task and per group. ``run``
is that call with the task folder of ``tasks.write_tasks`` (local files) or lm-eval's built-in tasks (the Hub), a
question cap for quick looks (``limit``: the first N of each task), and lm-eval's own logging turned down to warnings.
The numbers are lm-eval's: the same as its command line on the same files and weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .tasks import lm_eval_tasks_dir


def _quiet() -> None:
    """lm-eval's info lines down to warnings; its two warnings about a model passed as an object (what we do on
    purpose) down to errors."""
    for name in ("lm_eval", "lm-eval", "lm_eval.evaluator", "lm_eval.tasks"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)


def run(model: torch.nn.Module, tokenizer: Any, tasks: list[str], *, task_dir: str | os.PathLike[str] | None = None,
        include_defaults: bool = True, batch_size: int = 16, limit: int | None = None,
        log_samples: bool = False) -> dict[str, Any]:
    """``simple_evaluate`` of ``tasks`` on ``model`` (``task_dir``'s configs first, lm-eval's built-in ones too when
    ``include_defaults``: those read the Hub); returns ``{"accuracy": {task: acc}, "stderr": {task: se},
    "n": {task: questions}, "samples": {task: [...]} (with ``log_samples``), "lm_eval_version": ...}``. Groups
    (``mmlu``) report lm-eval's size-weighted accuracy over their subjects."""
    lm_eval_tasks_dir()  # a one-line error when lm-eval is missing
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 questions per task, got {limit}")
    _quiet()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        manager = TaskManager(include_path=str(task_dir) if task_dir else None, include_defaults=include_defaults)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      log_samples=log_samples)
    finally:
        model.train(was_training)
    acc, se, n = {}, {}, {}
    for task in tasks:
        entry = (out.get("groups") or {}).get(task) or out["results"].get(task) or {}
        if "acc,none" not in entry:
            raise ValueError(f"lm-eval returned no accuracy for {task!r} (got {sorted(entry)})")
        acc[task] = float(entry["acc,none"])
        stderr = entry.get("acc_stderr,none")
        se[task] = float(stderr) if isinstance(stderr, (int, float)) else None
        n[task] = _questions(out, task)
    res = {"accuracy": acc, "stderr": se, "n": n, "lm_eval_version": lm_eval.__version__}
    if log_samples:
        res["samples"] = out.get("samples", {})
    return res


def _questions(out: dict[str, Any], task: str) -> int:
    """Questions scored for ``task``: its own count, or the sum over a group's subtasks."""
    counts = out.get("n-samples") or {}
    if task in counts:
        return int(counts[task]["effective"])
    members = (out.get("group_subtasks") or {}).get(task, [])
    return sum(_questions(out, t) for t in members)
