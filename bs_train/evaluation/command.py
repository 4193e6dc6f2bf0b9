"""``bs-unlearn eval --benchmark tofu|muse|wmdp``: every model of the command line through one benchmark's suite.

The command's shape is the same for each benchmark: check every output path before any model loads
(``bs_train/outputs.py``), evaluate each model (a progress bar per model and split), write ``--out`` (every metric of
every model), each run folder's own result file (``EVAL_FILES``: ``eval.json`` for TOFU, ``eval_muse.json``,
``eval_wmdp.json``), the ``--markdown`` table, and print the table. Only the suite differs:

* ``tofu``: ``evaluation/tofu`` on a TOFU-format source (a run's own data by default);
* ``muse``: ``evaluation/muse`` on a MUSE corpus (``--data muse-bench/MUSE-Books`` or a local folder of its layout),
  the retain model's membership AUCs as PrivLeak's reference;
* ``wmdp``: ``evaluation/wmdp`` through lm-evaluation-harness (``--data`` the WMDP questions, ``--mmlu`` MMLU's; Hub
  ids by default), ``--tasks`` and ``--limit``; ``--write-tasks DIR`` writes the task folder for lm-eval's own command
  line and exits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from ..outputs import OutputExists, atomic_write, refuse_existing, write_json
from .report import BENCHMARK_COLUMNS, markdown_table

BENCHMARKS = ("tofu", "muse", "wmdp")
EVAL_FILES = {"tofu": "eval.json", "muse": "eval_muse.json", "wmdp": "eval_wmdp.json"}
"""The result file ``eval`` writes into each run folder it evaluates, per benchmark."""


def is_run(path: str) -> bool:
    return (Path(path) / "final").is_dir() or (Path(path) / "summary.json").is_file()


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommand's options (every benchmark's; each says which it is for)."""
    s.add_argument("models", nargs="+", help="run folder (its final/), model folder, smollm2-135m, tiny or Hub id")
    s.add_argument("--benchmark", default="tofu", choices=BENCHMARKS,
                   help="tofu (default) | muse (the six-way evaluation) | wmdp (WMDP and MMLU through lm-eval)")
    s.add_argument("--data", help="tofu: data folder, Hub id or 'synthetic' (default: the first run folder's data); "
                                  "muse: a MUSE corpus (muse-bench/MUSE-News, -Books, or a local folder of that "
                                  "layout); wmdp: the WMDP questions (cais/wmdp, or a folder of wmdp-*.jsonl)")
    s.add_argument("--retain-model", help="tofu / muse: a model never trained on the forget set (forget quality, the "
                                          "PrivLeak reference)")
    s.add_argument("--forget-split", default="forget10", help="tofu: the forget split")
    s.add_argument("--judge", default="embedding", help="tofu: none | embedding (offline) | chat model path or Hub id")
    s.add_argument("--max-new-tokens", type=int, default=200, help="tofu: longest greedy answer")
    s.add_argument("--protocol", default="exact", help="tofu / muse: exact (ours) | open-unlearning (its inputs)")
    s.add_argument("--batch-size", type=int, default=16, help="rows per scoring and generation batch")
    s.add_argument("--max-rows", type=int, help="tofu / muse: only the first N rows of every split (a quick look)")
    s.add_argument("--splits", help="tofu: utility splits, comma-separated, from retain_perturbed, real_authors, "
                                    "world_facts (default: all that exist; 'none' for none)")
    s.add_argument("--mmlu", help="wmdp: MMLU (cais/mmlu by default, or a folder of test.jsonl and dev.jsonl)")
    s.add_argument("--tasks", default="wmdp_bio,wmdp_chem,wmdp_cyber,mmlu",
                   help="wmdp: lm-eval tasks, comma-separated, from wmdp_bio, wmdp_chem, wmdp_cyber, mmlu")
    s.add_argument("--limit", type=int, help="wmdp: at most N questions per task (and per MMLU subject)")
    s.add_argument("--write-tasks", metavar="DIR",
                   help="wmdp: write the lm-eval task folder for these files into DIR and exit (for lm_eval "
                        "--include_path DIR)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--out", default="results.json", help="JSON with every metric of every model")
    s.add_argument("--markdown", help="also write the markdown table here")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out / --markdown file and each run folder's result file")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")


def _outputs(args: argparse.Namespace) -> list[Path]:
    paths = [Path(args.out)] + ([Path(args.markdown)] if args.markdown else [])
    return paths + [Path(spec, EVAL_FILES[args.benchmark]) for spec in args.models if is_run(spec)]


def main(args: argparse.Namespace) -> int:
    """The whole command; exit 0, or 2 with one line on stderr."""
    say: Callable[[str], None] = lambda msg: print(f"bs-unlearn eval: {msg}", file=sys.stderr, flush=True)
    if args.benchmark == "wmdp" and args.write_tasks:
        from .wmdp import write_tasks

        try:
            folder = write_tasks(args.write_tasks, _tasks(args), wmdp=args.data, mmlu=args.mmlu)
        except ValueError as e:
            say(str(e))
            return 2
        print(f"{folder}: lm_eval --model hf --model_args pretrained=MODEL --include_path {folder} --tasks "
              f"{','.join(_tasks(args))}")
        return 0
    try:  # before any model loads: nothing a user has is replaced without being asked
        refuse_existing(_outputs(args), overwrite=args.overwrite, what="--out / --markdown / run result")
        for name in ("max_rows", "limit", "batch_size"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        evaluate = {"tofu": _tofu, "muse": _muse, "wmdp": _wmdp}[args.benchmark](args, say)
    except (OutputExists, ValueError) as e:
        say(str(e))
        return 2
    results = []
    for i, spec in enumerate(args.models):
        try:
            res = evaluate(spec, i)
        except ValueError as e:
            say(f"{spec}: {e}")
            return 2
        res["name"] = Path(spec).name if is_run(spec) else spec
        for note in res.get("notes", []):
            if args.retain_model is None and "retain model" in note:
                continue  # said once, in the command line's words
            say(f"{res['name']}: {note}")
        if is_run(spec):
            write_json(Path(spec, EVAL_FILES[args.benchmark]), res)
        results.append(res)
    write_json(args.out, {"benchmark": args.benchmark, "results": results})
    table = markdown_table(results, BENCHMARK_COLUMNS[args.benchmark])
    if args.markdown:
        atomic_write(args.markdown, table)
    print(table, end="")
    return 0


def _tasks(args: argparse.Namespace) -> tuple[str, ...]:
    from .wmdp import TASKS

    tasks = tuple(t for t in args.tasks.split(",") if t)
    bad = sorted(set(tasks) - set(TASKS))
    if bad or not tasks:
        raise ValueError(f"--tasks {args.tasks!r}: choose from {', '.join(TASKS)}")
    return tasks


def _tofu(args: argparse.Namespace, say: Callable[[str], None]) -> Callable[[str, int], dict[str, Any]]:
    from ..data import check_protocol, resolve_data
    from .common import resolve_device
    from .judge import make_judge
    from .tofu import UTILITY_SPLITS, evaluate_model, first_rows, reference_statistics

    if args.splits is None:
        utility = UTILITY_SPLITS
    else:
        utility = () if args.splits == "none" else tuple(s for s in args.splits.split(",") if s)
        bad = sorted(set(utility) - set(UTILITY_SPLITS))
        if bad:
            raise ValueError(f"--splits {args.splits!r}: {bad} is not one of {', '.join(UTILITY_SPLITS)} (or 'none')")
    data = first_rows(resolve_data(args.data, args.models[0]), args.max_rows)
    device = str(resolve_device(args.device))
    kw = {"batch_size": args.batch_size, "max_length": 512, "protocol": check_protocol(args.protocol)}
    if args.retain_model is None:
        say("no --retain-model: forget quality is not computed, and PrivLeak is measured against AUC 0.5 instead of "
            "a retain model (train one with `bs-unlearn finetune data.train_split=retain90`)")
    ref = reference_statistics(args.retain_model, data, args.forget_split, {"device": device, "dtype": "auto"},
                               progress=not args.no_progress, **kw)
    judge = make_judge(args.judge, device=device)

    def one(spec: str, i: int) -> dict[str, Any]:
        res = evaluate_model(spec, data, forget_split=args.forget_split, retain_model=ref, judge=judge,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=device,
                             utility_splits=utility, progress=not args.no_progress,
                             estimate_models=len(args.models) if i == 0 else 0, report=say, protocol=args.protocol)
        res["settings"].update(judge=args.judge, data=args.data, retain_model=args.retain_model,
                               max_rows=args.max_rows)
        return res

    return one


def _muse(args: argparse.Namespace, say: Callable[[str], None]) -> Callable[[str, int], dict[str, Any]]:
    from ..data import check_protocol
    from .common import resolve_device
    from .muse import evaluate_model, load_muse, reference_statistics

    if args.data is None:
        raise ValueError("--benchmark muse needs --data: muse-bench/MUSE-News, muse-bench/MUSE-Books or a local "
                         "folder of that layout")
    check_protocol(args.protocol)
    data = load_muse(args.data, args.max_rows)  # every probe split read and checked before a model loads
    device = str(resolve_device(args.device))
    if args.retain_model is None:
        say("no --retain-model: PrivLeak is measured against AUC 0.5 instead of a model never trained on the forget "
            "set (open-unlearning's ref_value)")
    ref = reference_statistics(args.retain_model, data, {"device": device, "dtype": "auto"}, protocol=args.protocol,
                               batch_size=args.batch_size, progress=not args.no_progress)

    def one(spec: str, i: int) -> dict[str, Any]:
        res = evaluate_model(spec, data, retain_model=ref, protocol=args.protocol, batch_size=args.batch_size,
                             device=device, progress=not args.no_progress)
        res["settings"]["retain_model"] = args.retain_model
        return res

    return one


def _wmdp(args: argparse.Namespace, say: Callable[[str], None]) -> Callable[[str, int], dict[str, Any]]:
    from .common import resolve_device
    from .wmdp import evaluate_model
    from .wmdp.tasks import lm_eval_tasks_dir

    import tempfile

    from .wmdp import write_tasks

    tasks = _tasks(args)
    lm_eval_tasks_dir()  # lm-eval installed? (one line if not, before any model loads)
    with tempfile.TemporaryDirectory() as tmp:  # every local file read and checked before a model loads
        write_tasks(tmp, tasks, wmdp=args.data, mmlu=args.mmlu)
    device = str(resolve_device(args.device))

    def one(spec: str, i: int) -> dict[str, Any]:
        return evaluate_model(spec, wmdp=args.data, mmlu=args.mmlu, tasks=tasks, batch_size=args.batch_size,
                              limit=args.limit, device=device)

    return one
