"""lm-evaluation-harness task configs for WMDP and MMLU that read local JSON Lines, with lm-eval's own prompts.

The field reports WMDP (Li et al. 2024) and MMLU (Hendrycks et al. 2021) accuracy through lm-evaluation-harness's
``wmdp_*`` and ``mmlu`` tasks (as open-unlearning's ``configs/eval/lm_eval.yaml`` and its
``configs/experiment/unlearn/wmdp/default.yaml`` do: ``wmdp_cyber`` and ``mmlu``, zero-shot). Those tasks read the Hub
(``cais/wmdp``, ``cais/mmlu``). ``write_tasks`` writes a folder of task configs of the same names that ``include``
lm-eval's own YAML files (so the prompt, the choices, the shots and the metric are lm-eval's, by construction) and
override only where the questions come from: ``dataset_path: json`` with the local files. MMLU's test set is split by
subject into one task per subject, grouped as lm-eval groups them (``mmlu_stem`` ... ``mmlu``, accuracy weighted by
size); a subject absent from the files, and a group left with none, are left out.

The folder works both in-process (``harness.py``: ``TaskManager(include_path=folder)``) and with lm-eval's command
line, which gives the same numbers on the same files (``--include_path``, which takes precedence over its built-in
tasks of the same names)::

    lm_eval --model hf --model_args pretrained=MODEL,dtype=float32 --device cpu --include_path FOLDER --tasks wmdp_bio
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ...data.rows import load_rows

WMDP_TASKS = ("wmdp_bio", "wmdp_chem", "wmdp_cyber")
MMLU_TASK = "mmlu"
TASKS = (*WMDP_TASKS, MMLU_TASK)
MMLU_GROUPS = ("mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities")


def lm_eval_tasks_dir() -> Path:
    """lm-eval's own task folder (``lm_eval/tasks``)."""
    try:
        import lm_eval
    except ImportError:
        raise ValueError("WMDP and MMLU are evaluated through lm-evaluation-harness: pip install -e '.[wmdp]' "
                         "(or pip install lm-eval)") from None
    return Path(lm_eval.__file__).parent / "tasks"


def _check_mc(row, where: str) -> dict:
    """A four-way multiple-choice row: ``question`` (str), ``choices`` (4 str), ``answer`` (int 0-3)."""
    if not isinstance(row, dict):
        raise ValueError(f"multiple-choice data: {where}: expected a JSON object, got {type(row).__name__}")
    ok = (isinstance(row.get("question"), str) and isinstance(row.get("choices"), list) and len(row["choices"]) == 4
          and all(isinstance(c, str) for c in row["choices"]) and isinstance(row.get("answer"), int)
          and not isinstance(row.get("answer"), bool) and 0 <= row["answer"] < 4)
    if not ok:
        raise ValueError(f"multiple-choice data: {where}: needs question (str), choices (4 strings), answer (0-3), "
                         f"got fields {sorted(row)}")
    return row


def is_hub(source: str | os.PathLike[str] | None, hub_id: str) -> bool:
    """Does ``source`` mean the Hub dataset (``None`` or its id), read by lm-eval's built-in task?"""
    return source is None or str(source) == hub_id


def _write_task(path: Path, include: Path, **override) -> None:
    path.write_text(yaml.safe_dump({"include": str(include), **override}, sort_keys=False))


def write_tasks(out_dir: str | os.PathLike[str], tasks: tuple[str, ...] = TASKS, *,
                wmdp: str | os.PathLike[str] | None = None, mmlu: str | os.PathLike[str] | None = None) -> Path:
    """Task configs for ``tasks`` reading the local files: ``wmdp`` a folder of ``wmdp-{bio,chem,cyber}.jsonl``,
    ``mmlu`` a folder of ``test.jsonl`` and ``dev.jsonl`` (fields as the Hub datasets'). A source left ``None`` or given
    as its Hub id (``cais/wmdp``, ``cais/mmlu``) gets no config: lm-eval's built-in task reads the Hub. Every file is
    checked row by row first (a bad row is named by file and line). Returns ``out_dir``."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"tasks {unknown} are not among {', '.join(TASKS)}")
    lm_tasks = lm_eval_tasks_dir()
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for task in (t for t in tasks if t in WMDP_TASKS):
        if is_hub(wmdp, "cais/wmdp"):
            continue
        name = task.replace("_", "-")  # wmdp_bio -> wmdp-bio.jsonl, the Hub config's name
        rows = load_rows(wmdp, name, _check_mc, who="WMDP")
        data = out / "data" / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        _write_task(out / f"{task}.yaml", lm_tasks / "wmdp" / f"{task}.yaml", task=task, dataset_path="json",
                    dataset_name=None, dataset_kwargs={"data_files": {"test": str(data.resolve())}})
    if MMLU_TASK in tasks and not is_hub(mmlu, "cais/mmlu"):
        _write_mmlu(out, lm_tasks / "mmlu" / "default", load_rows(mmlu, "test", _check_mc, who="MMLU"),
                    load_rows(mmlu, "dev", _check_mc, who="MMLU"))
    return out


def _write_mmlu(out: Path, lm_mmlu: Path, test: list[dict], dev: list[dict]) -> None:
    by_subject: dict[str, dict[str, list[dict]]] = {}
    for split, rows in (("test", test), ("dev", dev)):
        for i, r in enumerate(rows):
            if not isinstance(r.get("subject"), str):
                raise ValueError(f"MMLU {split} row {i}: no 'subject' field (cais/mmlu config 'all' has one)")
            by_subject.setdefault(r["subject"], {"test": [], "dev": []})[split].append(r)
    tags: set[str] = set()
    for subject, splits in sorted(by_subject.items()):
        own = lm_mmlu / f"mmlu_{subject}.yaml"
        if not own.is_file():
            raise ValueError(f"MMLU subject {subject!r} is not one of lm-eval's ({lm_mmlu})")
        if not splits["test"]:
            continue
        files = {}
        for split, rows in splits.items():
            data = out / "data" / "mmlu" / subject / f"{split}.jsonl"
            data.parent.mkdir(parents=True, exist_ok=True)
            data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            files[split] = str(data.resolve())
        _write_task(out / f"mmlu_{subject}.yaml", own, task=f"mmlu_{subject}", dataset_path="json",
                    dataset_name=None, dataset_kwargs={"data_files": files})
        tags.add(yaml.safe_load(own.read_text())["tag"])
    groups = []
    for group in MMLU_GROUPS:
        cfg = yaml.safe_load((lm_mmlu / f"_{group}.yaml").read_text())
        if set(cfg["task"]) & tags:
            (out / f"_{group}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            groups.append(group)
    top = yaml.safe_load((lm_mmlu / "_mmlu.yaml").read_text())
    top["task"] = [g for g in top["task"] if g in groups]
    (out / "_mmlu.yaml").write_text(yaml.safe_dump(top, sort_keys=False))
