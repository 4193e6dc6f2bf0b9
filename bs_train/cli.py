"""``bs-unlearn``: command-line entry point (finetune, unlearn, config, eval, compare, demo, recipe, attack).

    bs-unlearn finetune --config configs/finetune_tofu_smollm2.yaml output_dir=runs/original
    bs-unlearn unlearn  --config configs/unlearn_tofu_smollm2.yaml model.path=runs/original/final method.name=npo
    torchrun --nproc-per-node 2 -m bs_train.cli unlearn --config ...          # FSDP2 on 2 ranks
    bs-unlearn config unlearn --config configs/unlearn_tofu_smollm2.yaml method.name=npo   # print + validate only
    bs-unlearn eval runs/ga runs/bs_t --data ../shared/data/tofu --retain-model runs/retain --markdown results.md
    bs-unlearn eval runs/muse_ga --benchmark muse --data muse-bench/MUSE-Books --retain-model runs/muse_retain
    bs-unlearn eval runs/rmu --benchmark wmdp --data ../shared/data/wmdp --mmlu ../shared/data/mmlu --limit 100
    bs-unlearn compare runs/ga runs/bs_t                                       # side by side from each eval.json
    bs-unlearn demo                                  # offline end to end on a CPU: data, model, 4 methods, table
    bs-unlearn recipe --data ../shared/data/tofu     # the TOFU reproduction in resumable stages (bs_train/recipes/tofu.py)
    bs-unlearn attack runs/ga --original runs/original --retain-model runs/retain   # did it really forget?

Overrides are ``section.key=value`` (YAML scalars; booleans are only true / false). The resolved config is saved
as ``<output_dir>/config.yaml`` (``bs-unlearn config ...`` or ``--print-config`` prints it, validated, and runs
nothing); a run whose folder already holds a checkpoint of the same config resumes from it (``--no-resume`` starts
over).
``eval`` (``bs_train/evaluation/command.py``) runs one benchmark's suite and writes one JSON with every metric
(``--out``) and each run folder's result file (``eval.json``, ``eval_muse.json`` or ``eval_wmdp.json``; refusing to
replace any unless ``--overwrite``), shows a progress bar per model and split and prints a markdown table with one row
per model; ``compare`` reads those (or the training summary) of each run;
``recipe`` runs (or resumes) fine-tune, retain model, lr selection, unlearning, evaluation and the table, stage by stage
(``--stage``), within a time budget (``--budget-s``). The tables are formatted by ``bs_train/evaluation/report.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import PRESETS, is_resolved_config, load_config
from .console import quiet_third_party
from .outputs import atomic_write, read_json, refuse_existing
from .evaluation.command import EVAL_FILES, add_arguments as eval_arguments
from .recipes.command import add_arguments as recipe_arguments
from .evaluation.report import BENCHMARK_COLUMNS, TRAIN_COLUMNS, markdown_table

COMMANDS = ("finetune", "unlearn", "config", "eval", "compare", "demo", "recipe", "attack")
WITH_OVERRIDES = ("finetune", "unlearn", "config")  # the commands that take section.key=value overrides anywhere
RESUMABLE = ("finetune", "unlearn", "recipe")  # a rerun continues where an interrupted one stopped


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (optional; defaults are the paper's)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="open-unlearning: the reference trainers' reductions and settings (methods.PRESETS)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 method.name=npo")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``bs-unlearn`` parser and its subcommand parsers (every subcommand shows in ``--help`` and in errors)."""
    p = argparse.ArgumentParser(prog="bs-unlearn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    subs: dict[str, argparse.ArgumentParser] = {}
    for name, text in (("finetune", "fine-tune a model on the train split"),
                       ("unlearn", "unlearn the forget split with method.name")):
        s = subs[name] = sub.add_parser(name, help=text, description=text)
        _train_args(s)
        s.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in output_dir")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
        s.add_argument("--print-config", action="store_true",
                       help="print the resolved config as YAML and validate it, without running")
    s = subs["config"] = sub.add_parser(
        "config", help="print the resolved config of a finetune / unlearn command as YAML and validate it",
        description="Print the resolved config (YAML file + overrides + defaults) and validate it; nothing runs. "
                    "Exit 0 when valid, 2 with the reason otherwise.")
    s.add_argument("run_command", choices=("finetune", "unlearn"), help="the command the config is for")
    _train_args(s)
    s = subs["eval"] = sub.add_parser("eval", help="evaluate models on TOFU, MUSE or WMDP",
                                      description="Evaluate models on one benchmark: TOFU (default), MUSE's six-way "
                                                  "evaluation, or WMDP and MMLU through lm-evaluation-harness.")
    eval_arguments(s)
    s = subs["compare"] = sub.add_parser("compare", help="runs side by side, from their eval.json",
                                         description="Runs side by side, from their eval.json.")
    s.add_argument("runs", nargs="+", help="run folders, or files our commands wrote: eval's --out, a run's "
                                           "eval.json, summary.json or attacks.json")
    s.add_argument("--benchmark", default="tofu", choices=tuple(EVAL_FILES),
                   help="whose results a run folder shows (its eval.json, eval_muse.json or eval_wmdp.json) and "
                        "which columns")
    s.add_argument("--markdown", help="also write the table here")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --markdown file")
    s = subs["demo"] = sub.add_parser(
        "demo", help="offline end-to-end demo on a CPU",
        description="Offline end-to-end demo on a CPU: generated data, a small model trained on the spot, "
                    "GA / NPO / BS-T / BS-S (each at its own learning rate and step, chosen on a held-out forget slice), "
                    "evaluation, table, squeezing plots.")
    s.add_argument("--out", default="runs/demo", help="output folder: new, empty, or one an earlier demo wrote")
    s.add_argument("--overwrite", action="store_true",
                   help="allow an --out folder that holds other files (they are kept; only the demo's own "
                        "folders and files are replaced)")
    s.add_argument("--quick", action="store_true", help="the shortened version CI runs")
    s.add_argument("--seed", type=int, default=0, help="seed of the generated data, the models and the runs")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s = subs["recipe"] = sub.add_parser("recipe", help="a benchmark's reproduction (TOFU, MUSE, WMDP) in resumable stages",
                                        description="A benchmark's reproduction recipe, in resumable stages that fit "
                                                    "short GPU sessions (bs_train/recipes/).")
    recipe_arguments(s)
    _attack_args(sub, subs)
    return p, subs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_third_party()
    parser, subs = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        print(f"\nbs-unlearn: give a command: one of {', '.join(COMMANDS)} (e.g. bs-unlearn demo)",
              file=sys.stderr)
        return 2
    command = argv[0]
    if command not in subs:  # --help, or a typo: argparse lists every command
        parser.parse_args(argv)
        return 2
    # overrides may come before or after the flags
    args = subs[command].parse_intermixed_args(argv[1:]) if command in WITH_OVERRIDES \
        else subs[command].parse_args(argv[1:])
    handler = {"finetune": train_main, "unlearn": train_main, "config": config_main, "eval": eval_main,
               "compare": compare_main, "demo": demo_main, "recipe": recipe_main, "attack": attack_main}[command]
    try:
        return handler(command, args)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; every file is written whole (bs_train/outputs.py)
        then = ("rerun the same command to resume" if command in RESUMABLE else "rerun it to start again (it replaces "
                "only its own files)" if command == "demo" else "results written before it are whole, the rest were "
                "not written")
        print(f"\nbs-unlearn {command}: interrupted; {then}", file=sys.stderr)
        return 130


def config_main(command: str, args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides, command=args.run_command, preset=args.preset)
    except (ValueError, OSError) as e:
        print(f"bs-unlearn config: config error: {e}", file=sys.stderr)
        return 2
    print(cfg.to_yaml(), end="")
    return 0


def train_main(command: str, args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides, command=command, preset=args.preset)
    except (ValueError, OSError) as e:
        print(f"bs-unlearn: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    saved = Path(cfg.output_dir, "config.yaml")
    if args.config and saved.is_file() and saved.resolve() == Path(args.config).resolve() and \
            not is_resolved_config(saved.read_text(errors="replace")):
        print(f"bs-unlearn: --config {args.config} is your file, and the run writes its resolved config to that path "
              f"({saved}): keep yours under another name (e.g. {saved.with_name('my_config.yaml')}) or choose "
              "another output_dir", file=sys.stderr)
        return 2
    from .trainer import NonFiniteError, run  # heavy imports only once the config is known to be valid

    quiet_third_party(models=True)
    try:
        summary = run(cfg, resume=not args.no_resume, progress=not args.no_progress)
    except NonFiniteError as e:
        print(f"bs-unlearn: {e}", file=sys.stderr)
        return 5
    except (ValueError, OSError) as e:  # bad data, a checkpoint of another run, a missing model: named, no traceback
        print(f"bs-unlearn: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def eval_main(command: str, args: argparse.Namespace) -> int:
    from .evaluation.command import main

    quiet_third_party(models=True)
    return main(args)


def _json_file(path: Path) -> dict[str, Any]:
    """A JSON object from a file a user named: a damaged one is an error naming it (it was asked for)."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: holds a JSON {type(doc).__name__}, not an object")
    return doc


def _summary_row(summary: dict[str, Any]) -> dict[str, Any]:
    chosen = (summary.get("selection") or {}).get("chosen") or {}  # train.select_by: the step exported as final/
    return {**(summary.get("final") or {}), "steps": summary.get("steps"), "selected_step": chosen.get("step")}


def _file_rows(path: Path) -> list[dict[str, Any]]:
    """Rows from one file our commands wrote: ``eval --out``'s results (a list of models), a run's ``eval.json`` (one
    evaluated model), its ``summary.json`` (the training summary) or ``attacks.json``; a run's file is named after
    its folder."""
    from .attacks.report import attack_summary

    doc, run = _json_file(path), path.parent
    if isinstance(doc.get("results"), list) and "rule" not in doc:  # eval --out / recipe results.json
        return [dict(r, name=r.get("name") or r.get("model")) for r in doc["results"] if isinstance(r, dict)]
    if "forget_split" in doc or "agg" in doc or doc.get("benchmark") in EVAL_FILES:  # a run's eval*.json
        return [dict(doc, name=doc.get("name") or run.name)]
    if "steps" in doc and "final" in doc:  # a run's summary.json
        return [{"name": run.name, **_summary_row(doc)}]
    if "summary" in doc and "rule" in doc:  # a run's attacks.json
        return [{"name": run.name, **attack_summary(run)}]
    raise ValueError(f"{path}: not a results file of bs-unlearn (eval --out, a run's eval.json, summary.json or "
                     "attacks.json)")


def _compare_rows(spec: str, benchmark: str = "tofu") -> list[dict[str, Any]]:
    path = Path(spec)
    if path.is_file():
        return _file_rows(path)
    if not path.is_dir():
        raise ValueError(f"{spec}: no such run folder or results file")
    from .attacks.report import attack_summary  # a run attacked by `bs-unlearn attack` holds attacks.json

    evaluated = read_json(path / EVAL_FILES[benchmark])  # damaged: said, and the training summary shown instead
    if evaluated is not None:
        return [dict(evaluated, name=path.name, **attack_summary(path))]
    row: dict[str, Any] = {"name": path.name, **attack_summary(path)}
    if (path / "metrics.jsonl").is_file():
        lines = [ln for ln in (path / "metrics.jsonl").read_text(errors="replace").splitlines() if ln.strip()]
        for ln in reversed(lines):  # the last whole line (a kill may cut the last one short)
            try:
                row.update(json.loads(ln))
                break
            except ValueError:
                continue
    summary = read_json(path / "summary.json")
    if summary is not None:
        row.update(_summary_row(summary))
    if len(row) == 1:
        raise ValueError(f"{spec}: no {EVAL_FILES[benchmark]}, summary.json or metrics.jsonl (run `bs-unlearn eval "
                         f"{spec}{'' if benchmark == 'tofu' else ' --benchmark ' + benchmark}`)")
    return [row]


def compare_main(command: str, args: argparse.Namespace) -> int:
    try:
        if args.markdown:
            refuse_existing([args.markdown], overwrite=args.overwrite, what="--markdown table")
        rows = [r for spec in args.runs for r in _compare_rows(spec, args.benchmark)]
    except (ValueError, OSError) as e:
        print(f"bs-unlearn compare: {e}", file=sys.stderr)
        return 2
    from .attacks.report import ATTACK_COLUMNS

    table = markdown_table(rows, BENCHMARK_COLUMNS[args.benchmark] + ATTACK_COLUMNS + TRAIN_COLUMNS)
    if args.markdown:
        atomic_write(args.markdown, table)
    print(table, end="")
    return 0


def demo_main(command: str, args: argparse.Namespace) -> int:
    from .demo import DemoFolderError, run_demo

    quiet_third_party(models=True)
    try:
        result = run_demo(args.out, quick=args.quick, seed=args.seed, overwrite=args.overwrite,
                          progress=not args.no_progress)
    except (DemoFolderError, ValueError, OSError) as e:  # a refused --out, a foreign run folder in the way
        print(f"bs-unlearn demo: {e}", file=sys.stderr)
        return 2
    print(result["table"], end="")
    t = result["timing"]
    print(f"\n{len(result['results'])} models in {result['seconds']:.0f} s (in-training evaluation and selection: "
          f"{t['in_training_added_s']:.0f} s, {100 * t['in_training_added_share']:.0f}%); judge: {result['judge']}; "
          f"table: {args.out}/results.md; squeezing and trajectory plots: {args.out}/<method>/*.png")
    return 0


def recipe_main(command: str, args: argparse.Namespace) -> int:
    from .recipes.command import main

    quiet_third_party(models=True)
    return main(args)


def _attack_args(sub, subs: dict[str, argparse.ArgumentParser]) -> None:
    from .attacks.config import ATTACKS, JUDGES, AttackConfig

    d = AttackConfig()
    text = "relearning, quantization, paraphrase and sampling attacks on unlearned models"
    p = subs["attack"] = sub.add_parser("attack", help=text, description=text.capitalize() + ", against the "
                                        "original and the retain model (bs_train/attacks).")
    p.add_argument("models", nargs="*", help="unlearned run folders (their final/), model folders or Hub ids")
    p.add_argument("--original", help="the model before unlearning (default: the first run's config model.path)")
    p.add_argument("--retain-model", help="a model never trained on the forget split (recovery 0)")
    p.add_argument("--attacks", default=",".join(d.attacks), help=f"comma-separated subset of {','.join(ATTACKS)}")
    p.add_argument("--data", help="data folder, Hub id or 'synthetic' (default: the first run's own data)")
    p.add_argument("--forget-split", default=d.forget_split,
                   help="the forgotten split; every attack scores its held-out rows (those not relearned)")
    p.add_argument("--retain-split", default=d.retain_split,
                   help="retain rows re-scored after quantization (the first 32)")
    p.add_argument("--relearn-fraction", type=float, default=d.relearn_fraction,
                   help="share of the forget rows the relearning attack fine-tunes on (seeded); never scored")
    p.add_argument("--relearn-split", help="relearn on this split instead of a slice of the forget split")
    p.add_argument("--relearn-lr", type=float, help="default: a tenth of the original's fine-tuning lr, else 1e-5")
    p.add_argument("--relearn-steps", default=",".join(map(str, d.relearn_steps)),
                   help="comma-separated optimizer steps after which the held-out rows are scored (0: before)")
    p.add_argument("--bits", default=",".join(map(str, d.bits)),
                   help="weight widths of the quantization attack, 8 and/or 4")
    p.add_argument("--group-size", type=int, default=d.group_size,
                   help="weights sharing one scale in the round-to-nearest quantization")
    p.add_argument("--samples", type=int, default=d.samples,
                   help="answers sampled per question at temperature 1 by the sampling attack")
    p.add_argument("--judge", default=d.judge, choices=JUDGES,
                   help="how an answer is matched to the forgotten one: MiniLM cosine, or ROUGE-L recall")
    p.add_argument("--threshold", type=float,
                   help="similarity at or above which an answer says the forgotten one (default: 0.8 embedding, "
                        "0.5 rouge)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="longest generated answer")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per scoring / generation batch")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the relearning slice and runs, the multiple-choice order and the sampling")
    p.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--out", default="attacks", help="folder for attacks.json, attacks.md and the relearning plots")
    p.add_argument("--overwrite", action="store_true",
                   help="replace result files already there (--out's, and each attacked run's attacks.json)")


def attack_main(command: str, args: argparse.Namespace) -> int:
    """``bs-unlearn attack``: try to bring the forgotten knowledge back; one line, exit 2, on a bad argument, model
    or data."""
    from .attacks import run_attacks
    from .attacks.config import AttackConfig

    quiet_third_party(models=True)
    try:
        cfg = AttackConfig(
            attacks=tuple(a for a in args.attacks.split(",") if a), forget_split=args.forget_split,
            retain_split=args.retain_split, relearn_fraction=args.relearn_fraction, relearn_split=args.relearn_split,
            relearn_lr=args.relearn_lr, relearn_steps=tuple(int(x) for x in args.relearn_steps.split(",")),
            bits=tuple(int(x) for x in args.bits.split(",")), group_size=args.group_size, samples=args.samples,
            judge=args.judge, threshold=args.threshold, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, seed=args.seed, device=args.device)
        for spec in [*args.models, args.original, args.retain_model]:
            looks_local = spec is not None and (spec.startswith((".", "/", "~")) or
                                                ("/" in spec and Path(spec).parent.is_dir()))
            if looks_local and not Path(spec).expanduser().exists():
                raise ValueError(f"no such model folder: {spec!r}")
        doc = run_attacks(args.models, original=args.original, retain=args.retain_model, data=args.data, cfg=cfg,
                          out=args.out, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"bs-unlearn attack: {e}", file=sys.stderr)
        return 2
    print(doc["table"], end="")
    print(f"\n{args.out}/attacks.json, {args.out}/attacks.md" + (", relearning plots there" if "relearn" in
                                                                 cfg.attacks else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
