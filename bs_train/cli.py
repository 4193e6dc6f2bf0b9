"""``bs-unlearn``: command-line entry point (finetune, unlearn, config, eval, compare, demo, recipe).

    bs-unlearn finetune --config configs/finetune_tofu_smollm2.yaml output_dir=runs/original
    bs-unlearn unlearn  --config configs/unlearn_tofu_smollm2.yaml model.path=runs/original/final method.name=npo
    torchrun --nproc-per-node 2 -m bs_train.cli unlearn --config ...          # FSDP2 on 2 ranks
    bs-unlearn config unlearn --config configs/unlearn_tofu_smollm2.yaml method.name=npo   # print + validate only
    bs-unlearn eval runs/ga runs/bs_t --data ../shared/data/tofu --retain-model runs/retain --markdown results.md
    bs-unlearn compare runs/ga runs/bs_t                                       # side by side from each eval.json
    bs-unlearn demo                                  # offline end to end on a CPU: data, model, 4 methods, table
    bs-unlearn recipe --data ../shared/data/tofu     # the TOFU reproduction in resumable stages (bs_train/recipe.py)
    bs-unlearn attack runs/ga --original runs/original --retain-model runs/retain   # did it really forget?

Overrides are ``section.key=value`` (YAML scalars; booleans are only true / false). The resolved config is saved
as ``<output_dir>/config.yaml`` (``bs-unlearn config ...`` or ``--print-config`` prints it, validated, and runs
nothing); a run whose folder already holds a checkpoint of the same config resumes from it (``--no-resume`` starts
over).
``eval`` writes one JSON with every metric (``--out``), ``<run>/eval.json`` for each run folder (refusing to replace
either unless ``--overwrite``), shows a progress bar per model and split and prints a markdown table with one row
per model; ``compare`` reads ``eval.json`` (or the training summary) of each run;
``recipe`` runs (or resumes) fine-tune, retain model, lr selection, unlearning, evaluation and the table, stage by stage
(``--stage``), within a time budget (``--budget-s``). The tables are formatted by ``bs_train/report.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import PRESETS, load_config
from .console import quiet_third_party
from .report import COLUMNS, TRAIN_COLUMNS, markdown_table

COMMANDS = ("finetune", "unlearn", "config", "eval", "compare", "demo", "recipe", "attack")
WITH_OVERRIDES = ("finetune", "unlearn", "config")  # the commands that take section.key=value overrides anywhere


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
    s = subs["eval"] = sub.add_parser("eval", help="evaluate models on TOFU-format data",
                                      description="Evaluate models on TOFU-format data.")
    s.add_argument("models", nargs="+", help="run folder (its final/), model folder, smollm2-135m, tiny or Hub id")
    s.add_argument("--data", help="data folder, Hub id or 'synthetic' (default: the first run folder's data)")
    s.add_argument("--forget-split", default="forget10")
    s.add_argument("--retain-model", help="model trained on the retain split only: forget quality, privleak")
    s.add_argument("--judge", default="embedding", help="none | embedding (offline) | chat model path or Hub id")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--protocol", default="exact", help="exact (ours) | open-unlearning (its inputs, mask and epsilon)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--max-rows", type=int, help="use only the first N rows of every split (a quick, bounded look)")
    s.add_argument("--splits", help="utility splits to evaluate, comma-separated, from retain_perturbed, "
                                    "real_authors, world_facts (default: all that exist; 'none' for none)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--out", default="results.json", help="JSON with every metric of every model")
    s.add_argument("--markdown", help="also write the markdown table here")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out / --markdown file and each run folder's eval.json")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s = subs["compare"] = sub.add_parser("compare", help="runs side by side, from their eval.json",
                                         description="Runs side by side, from their eval.json.")
    s.add_argument("runs", nargs="+", help="run folders (or results.json files from bs-unlearn eval)")
    s.add_argument("--markdown", help="also write the table here")
    s = subs["demo"] = sub.add_parser(
        "demo", help="offline end-to-end demo on a CPU",
        description="Offline end-to-end demo on a CPU: generated data, a small model trained on the spot, "
                    "GA / NPO / BS-T / BS-S (each at its own learning rate, chosen on a held-out forget slice), "
                    "evaluation, table, squeezing plots.")
    s.add_argument("--out", default="runs/demo", help="output folder: new, empty, or one an earlier demo wrote")
    s.add_argument("--overwrite", action="store_true",
                   help="allow an --out folder that holds other files (they are kept; only the demo's own "
                        "folders and files are replaced)")
    s.add_argument("--quick", action="store_true", help="the shortened version CI runs")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s = subs["recipe"] = sub.add_parser("recipe", help="the TOFU reproduction in resumable stages",
                                        description="The TOFU reproduction recipe, in resumable stages that fit "
                                                    "short GPU sessions (see bs_train/recipe.py).")
    _recipe_args(s)
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
    return {"finetune": train_main, "unlearn": train_main, "config": config_main, "eval": eval_main,
            "compare": compare_main, "demo": demo_main, "recipe": recipe_main,
            "attack": attack_main}[command](command, args)


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


def _is_run(path: str) -> bool:
    return (Path(path) / "final").is_dir() or (Path(path) / "summary.json").is_file()


def _existing_results(args: argparse.Namespace) -> list[Path]:
    """The result files this eval would replace: --out, --markdown and each run folder's eval.json."""
    paths = [Path(args.out)] + ([Path(args.markdown)] if args.markdown else [])
    paths += [Path(spec, "eval.json") for spec in args.models if _is_run(spec)]
    return [p for p in paths if p.exists()]


def eval_main(command: str, args: argparse.Namespace) -> int:
    if not args.overwrite:  # before any model loads: nothing a user has is replaced without being asked
        existing = _existing_results(args)
        if existing:
            print(f"bs-unlearn eval: {', '.join(map(str, existing))} already exist(s); pass --overwrite to replace "
                  "them, or choose another --out", file=sys.stderr)
            return 2
    if args.max_rows is not None and args.max_rows < 1:
        print(f"bs-unlearn eval: --max-rows must be >= 1, got {args.max_rows}", file=sys.stderr)
        return 2
    import torch

    from .data import check_protocol, resolve_data
    from .evaluate import UTILITY_SPLITS, evaluate_model, first_rows, reference_statistics
    from .judge import make_judge

    quiet_third_party(models=True)
    say = (lambda msg: print(f"bs-unlearn eval: {msg}", file=sys.stderr, flush=True))
    try:
        if args.splits is None:
            utility = UTILITY_SPLITS
        else:
            utility = () if args.splits == "none" else tuple(s for s in args.splits.split(",") if s)
            bad = sorted(set(utility) - set(UTILITY_SPLITS))
            if bad:
                raise ValueError(f"--splits {args.splits!r}: {bad} is not one of {', '.join(UTILITY_SPLITS)} "
                                 "(or 'none')")
        data = first_rows(resolve_data(args.data, args.models[0]), args.max_rows)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        load_kw = {"device": device, "dtype": "auto"}
        kw = {"batch_size": args.batch_size, "max_length": 512, "protocol": check_protocol(args.protocol)}
        if args.retain_model is None:
            say("no --retain-model: forget quality is not computed, and PrivLeak is measured against AUC 0.5 "
                "instead of a retain model (train one with `bs-unlearn finetune data.train_split=retain90`)")
        ref = reference_statistics(args.retain_model, data, args.forget_split, load_kw,
                                   progress=not args.no_progress, **kw)
        judge = make_judge(args.judge, device=device)
    except ValueError as e:
        say(str(e))
        return 2
    results = []
    for i, spec in enumerate(args.models):
        try:
            res = evaluate_model(spec, data, forget_split=args.forget_split, retain_model=ref, judge=judge,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=device,
                                 utility_splits=utility, progress=not args.no_progress,
                                 estimate_models=len(args.models) if i == 0 else 0, report=say,
                                 protocol=args.protocol)
        except ValueError as e:
            say(f"{spec}: {e}")
            return 2
        res["settings"].update(judge=args.judge, data=args.data, retain_model=args.retain_model,
                               max_rows=args.max_rows)
        res["name"] = Path(spec).name if _is_run(spec) else spec
        for note in res["notes"]:
            if args.retain_model is None and "retain model" in note:
                continue  # said once above, in the command line's words
            say(f"{res['name']}: {note}")
        if _is_run(spec):
            Path(spec, "eval.json").write_text(json.dumps(res, indent=1) + "\n")
        results.append(res)
    Path(args.out).write_text(json.dumps({"results": results}, indent=1) + "\n")
    table = markdown_table(results, COLUMNS)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table, end="")
    return 0


def _compare_rows(spec: str) -> list[dict[str, Any]]:
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":  # a results.json written by `bs-unlearn eval --out`
        return [dict(r, name=r.get("name", r.get("model"))) for r in json.loads(path.read_text())["results"]]
    from .attacks.report import attack_summary  # a run attacked by `bs-unlearn attack` holds attacks.json

    if (path / "eval.json").is_file():
        return [dict(json.loads((path / "eval.json").read_text()), name=path.name, **attack_summary(path))]
    row: dict[str, Any] = {"name": path.name, **attack_summary(path)}
    if (path / "metrics.jsonl").is_file():
        lines = [ln for ln in (path / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        if lines:
            row.update(json.loads(lines[-1]))
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
        row.update(summary.get("final") or {}, steps=summary.get("steps"))
    if len(row) == 1:
        raise ValueError(f"{spec}: no eval.json, summary.json or metrics.jsonl (run `bs-unlearn eval {spec}`)")
    return [row]


def compare_main(command: str, args: argparse.Namespace) -> int:
    try:
        rows = [r for spec in args.runs for r in _compare_rows(spec)]
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"bs-unlearn compare: {e}", file=sys.stderr)
        return 2
    from .attacks.report import ATTACK_COLUMNS

    table = markdown_table(rows, COLUMNS + ATTACK_COLUMNS + TRAIN_COLUMNS)
    if args.markdown:
        Path(args.markdown).write_text(table)
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
    print(f"\n{len(result['results'])} models in {result['seconds']:.0f} s; judge: {result['judge']}; "
          f"table: {args.out}/results.md; squeezing plots: {args.out}/<method>/squeezing.png")
    return 0


def _recipe_args(p: argparse.ArgumentParser) -> None:
    from .recipe import JUDGE_MODES, METHODS, STAGES

    p.add_argument("--data", required=True, help="TOFU folder of JSON Lines or the Hub id locuslab/TOFU")
    p.add_argument("--out", default="runs/tofu_smollm2")
    p.add_argument("--stage", default="all", choices=("all", *STAGES))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--lr-grid", default="1e-5,2e-5,5e-5", help="learning rates tried on forget05 per method")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new work after this many seconds")
    p.add_argument("--probe-bar", type=float, default=0.9,
                   help="forget10 answer probability and greedy ROUGE-L the original must reach before unlearning")
    p.add_argument("--finetune", nargs="*", default=[],
                   help="fine-tuning settings (key=value), applied after the recipe's own (recipe.FINETUNE)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="config preset of every unlearning run")
    p.add_argument("--protocol", default="exact", help="evaluation protocol: exact | open-unlearning")
    p.add_argument("--unlearn", nargs="*", default=[],
                   help="unlearning settings (key=value), applied after the recipe's own (recipe.UNLEARN)")
    p.add_argument("--eval-batch-size", type=int, default=16, help="questions per evaluation batch (a GPU: 512)")
    p.add_argument("--judge", default="embedding", choices=JUDGE_MODES,
                   help="embedding: the offline judge in every evaluation; later: none now, --rejudge adds it")
    p.add_argument("--rejudge", action="store_true",
                   help="score a --judge later run's saved answers with the offline judge and rebuild the table")
    p.add_argument("--plan", action="store_true",
                   help="print the predicted time of every stage on one GPU (bs_train/plan.py) and exit: 0 if it "
                        "fits --budget-s, 3 if not")
    p.add_argument("--plan-gpu", default="h100", choices=("h100", "h200"),
                   help="the GPU --plan predicts for (bs_train/plan.py GPUS; h100: the lent machine's default)")


def recipe_main(command: str, args: argparse.Namespace) -> int:
    from .recipe import FINETUNE, UNLEARN, Recipe, RecipeError, WeakOriginal, rejudge, run_recipe

    quiet_third_party(models=True)
    try:
        recipe = Recipe(args.out, args.data, model=args.model, methods=tuple(args.methods.split(",")),
                        lr_grid=tuple(float(x) for x in args.lr_grid.split(",")), max_new_tokens=args.max_new_tokens,
                        budget_s=args.budget_s, probe_bar=args.probe_bar, preset=args.preset, protocol=args.protocol,
                        finetune=[*FINETUNE, *args.finetune], unlearn=[*UNLEARN, *args.unlearn],
                        eval_batch_size=args.eval_batch_size, judge=args.judge)
        if args.plan:
            from .plan import GPUS, ModelShape, format_plan, recipe_plan, total_seconds

            work = recipe_plan(recipe, hw=GPUS[args.plan_gpu])
            print(format_plan(work, recipe, ModelShape(), GPUS[args.plan_gpu], recipe.budget_s), end="")
            return 0 if total_seconds(work) <= recipe.budget_s else 3
    except ValueError as e:
        print(f"bs-unlearn recipe: {e}", file=sys.stderr)
        return 2
    try:
        if args.rejudge:
            done = rejudge(recipe)
            print(f"bs-unlearn recipe: judged {done['scored']} evaluations; judged Agg. would pick another rate "
                  f"for: {', '.join(done['changed_choice']) or 'none'} (selection.json)")
            return 0
        return 0 if run_recipe(recipe, args.stage) else 3
    except RecipeError as e:
        print(f"bs-unlearn recipe: {e}", file=sys.stderr)
        return 2
    except WeakOriginal as e:
        print(f"bs-unlearn recipe: {e}", file=sys.stderr)
        return 4


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
    p.add_argument("--forget-split", default=d.forget_split)
    p.add_argument("--retain-split", default=d.retain_split)
    p.add_argument("--relearn-fraction", type=float, default=d.relearn_fraction)
    p.add_argument("--relearn-split", help="relearn on this split instead of a slice of the forget split")
    p.add_argument("--relearn-lr", type=float, help="default: a tenth of the original's fine-tuning lr, else 1e-5")
    p.add_argument("--relearn-steps", default=",".join(map(str, d.relearn_steps)))
    p.add_argument("--bits", default=",".join(map(str, d.bits)))
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--samples", type=int, default=d.samples)
    p.add_argument("--judge", default=d.judge, choices=JUDGES)
    p.add_argument("--threshold", type=float)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", default="attacks", help="folder for attacks.json, attacks.md and the relearning plots")


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
                          out=args.out)
    except (ValueError, OSError) as e:
        print(f"bs-unlearn attack: {e}", file=sys.stderr)
        return 2
    print(doc["table"], end="")
    print(f"\n{args.out}/attacks.json, {args.out}/attacks.md" + (", relearning plots there" if "relearn" in
                                                                 cfg.attacks else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
