"""Multiple-choice accuracy through lm-evaluation-harness, on the model already in memory.

lm-eval's ``HFLM`` accepts a loaded Hugging Face model (no export, no second copy): it scores each choice's
log-likelihood after the prompt, batched, and ``simple_evaluate`` reports accuracy per task and per group. ``run``
is that call with the task folder of ``tasks.write_tasks`` (local files) or lm-eval's built-in tasks (the Hub), a
question cap for quick looks (``limit``: the first N of each task), and lm-eval's own logging turned down to warnings.
The numbers are lm-eval's: the same as its command line on the same files and weights.

lm-eval scores a batch through its full ``[batch, tokens, vocabulary]`` logits and their log-softmax, and it sorts
the requests longest first, so the first batch is the largest. WMDP-Cyber's longest questions run to ~5,500
SmolLM2 tokens: at batch 16 that is ~33 GiB of fp32 logits and log-softmax, and on a CPU the kernel's OOM killer
ends the run without a word (as it ended one of ours after 17 minutes). ``check_memory`` estimates that first batch
from the local files before anything runs and refuses, naming the batch size that fits, when it exceeds the memory
available.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .tasks import lm_eval_tasks_dir


def _quiet() -> None:
    """lm-eval's info lines down to warnings; its two warnings about a model passed as an object (what we do on
    purpose) down to errors."""
    for name in ("lm_eval", "lm-eval", "lm_eval.evaluator", "lm_eval.tasks"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)


PROMPT_TOKENS = 64  # ours: lm-eval's template around a question (header, "A." ... "D.", "Answer:"), an upper bound


def longest_question(tokenizer: Any, task_dir: str | os.PathLike[str], limit: int | None = None) -> int:
    """Tokens of the longest question with its choices among the local test files of a ``tasks.write_tasks`` folder
    (the first ``limit`` of each task, as lm-eval takes them); 0 when it has none (the Hub's tasks)."""
    longest = 0
    for path in sorted(Path(task_dir).glob("data/**/*.jsonl")):
        if path.name == "dev.jsonl":  # MMLU's few-shot pool: zero-shot tasks never put it in a prompt
            continue
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][:limit]
        texts = [r["question"] + "\n" + "\n".join(r["choices"]) for r in rows]
        if texts:
            longest = max(longest, max(len(ids) for ids in tokenizer(texts)["input_ids"]))
    return longest


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors: the GPU's free memory, or the kernel's ``MemAvailable`` on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def check_memory(model: torch.nn.Module, tokenizer: Any, task_dir: str | os.PathLike[str], batch_size: int,
                 limit: int | None = None, *, available: int | None = None) -> None:
    """Refuse, before anything runs, a ``batch_size`` whose first batch (the longest questions: lm-eval sorts them
    so) needs more memory for its logits and their log-softmax than is ``available`` (read from the device when
    None); the error names the batch size that fits. A machine without ``/proc/meminfo`` is not checked."""
    tokens = longest_question(tokenizer, task_dir, limit)
    if not tokens:
        return
    if available is None:
        try:
            available = available_bytes(next(model.parameters()).device)
        except OSError:
            return
    vocab = model.get_output_embeddings().weight.shape[0]
    itemsize = next(model.parameters()).element_size()
    per_row = 2 * (tokens + PROMPT_TOKENS) * vocab * itemsize  # the logits and their log-softmax
    if batch_size * per_row <= available:
        return
    fits = available // per_row
    gib = 2 ** 30
    advice = f"use --batch-size {fits}" if fits else "even one question does not fit: use a machine with more memory"
    raise ValueError(f"--batch-size {batch_size}: the longest question ({tokens} tokens) needs about "
                     f"{batch_size * per_row / gib:.1f} GiB for lm-eval's logits and their log-softmax at that batch "
                     f"size, {available / gib:.1f} GiB is available: {advice}")


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
    if task_dir is not None:
        check_memory(model, tokenizer, task_dir, batch_size, limit)
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
