"""``bs-unlearn``: command-line entry point (finetune, unlearn, eval, compare, demo, recipe).

    bs-unlearn finetune --config configs/finetune_tofu_smollm2.yaml output_dir=runs/original
    bs-unlearn unlearn  --config configs/unlearn_tofu_smollm2.yaml model.path=runs/original/final method.name=npo
    torchrun --nproc-per-node 2 -m bs_train.cli unlearn --config ...          # FSDP2 on 2 ranks
    bs-unlearn eval runs/ga runs/bs_t --data ../shared/data/tofu --retain-model runs/retain --markdown results.md
    bs-unlearn compare runs/ga runs/bs_t                                       # side by side from each eval.json
    bs-unlearn demo                                  # offline end to end on a CPU: data, model, 4 methods, table
    bs-unlearn recipe --data ../shared/data/tofu     # the TOFU reproduction in resumable stages (bs_train/recipe.py)

Overrides are ``section.key=value`` (YAML scalars). The resolved config is saved as ``<output_dir>/config.yaml``;
a run whose folder already holds a checkpoint of the same config resumes from it (``--no-resume`` starts over).
``eval`` writes one JSON with every metric (``--out``), ``<run>/eval.json`` for each run folder, and prints a
markdown table with one row per model; ``compare`` reads ``eval.json`` (or the training summary) of each run;
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
from .report import COLUMNS, TRAIN_COLUMNS, markdown_table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "eval":
        return eval_main(argv[1:])
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    if argv and argv[0] == "demo":
        return demo_main(argv[1:])
    if argv and argv[0] == "recipe":
        return recipe_main(argv[1:])
    p = argparse.ArgumentParser(prog="bs-unlearn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["finetune", "unlearn"])
    p.add_argument("--config", help="YAML config file (optional; defaults are the paper's)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="open-unlearning: the reference trainers' reductions and settings (methods.PRESETS)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 method.name=npo")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the flags
    try:
        cfg = load_config(args.config, args.overrides, command=args.command, preset=args.preset)
    except (ValueError, OSError) as e:
        print(f"bs-unlearn: config error: {e}", file=sys.stderr)
        return 2
    from .trainer import NonFiniteError, run  # heavy imports only once the config is known to be valid

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


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bs-unlearn eval", description="Evaluate models on TOFU-format data.")
    p.add_argument("models", nargs="+", help="run folder (its final/), model folder, smollm2-135m, tiny or Hub id")
    p.add_argument("--data", help="data folder, Hub id or 'synthetic' (default: the first run folder's data)")
    p.add_argument("--forget-split", default="forget10")
    p.add_argument("--retain-model", help="model trained on the retain split only: forget quality, privleak")
    p.add_argument("--judge", default="embedding", help="none | embedding (offline) | chat model path or Hub id")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--protocol", default="exact", help="exact (ours) | open-unlearning (its inputs, mask and epsilon)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", default="results.json", help="JSON with every metric of every model")
    p.add_argument("--markdown", help="also write the markdown table here")
    args = p.parse_args(argv)
    import torch

    from .data import check_protocol, resolve_data
    from .evaluate import evaluate_model, reference_statistics
    from .judge import make_judge

    try:
        data = resolve_data(args.data, args.models[0])
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        load_kw = {"device": device, "dtype": "auto"}
        kw = {"batch_size": args.batch_size, "max_length": 512, "protocol": check_protocol(args.protocol)}
        ref = reference_statistics(args.retain_model, data, args.forget_split, load_kw, **kw)
        judge = make_judge(args.judge, device=device)
    except ValueError as e:
        print(f"bs-unlearn eval: {e}", file=sys.stderr)
        return 2
    results = []
    for spec in args.models:
        try:
            res = evaluate_model(spec, data, forget_split=args.forget_split, retain_model=ref, judge=judge,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=device,
                                 protocol=args.protocol)
        except ValueError as e:
            print(f"bs-unlearn eval: {spec}: {e}", file=sys.stderr)
            return 2
        res["settings"].update(judge=args.judge, data=args.data, retain_model=args.retain_model)
        res["name"] = Path(spec).name if _is_run(spec) else spec
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
    if (path / "eval.json").is_file():
        return [dict(json.loads((path / "eval.json").read_text()), name=path.name)]
    row: dict[str, Any] = {"name": path.name}
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


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bs-unlearn compare", description="Runs side by side, from their eval.json.")
    p.add_argument("runs", nargs="+", help="run folders (or results.json files from bs-unlearn eval)")
    p.add_argument("--markdown", help="also write the table here")
    args = p.parse_args(argv)
    try:
        rows = [r for spec in args.runs for r in _compare_rows(spec)]
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"bs-unlearn compare: {e}", file=sys.stderr)
        return 2
    table = markdown_table(rows, COLUMNS + TRAIN_COLUMNS)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table, end="")
    return 0


def demo_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bs-unlearn demo",
                                description="Offline end-to-end demo on a CPU: generated data, a small model trained "
                                            "on the spot, GA / NPO / BS-T / BS-S, evaluation, table, squeezing plots.")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="the shortened version CI runs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from .demo import run_demo

    result = run_demo(args.out, quick=args.quick, seed=args.seed)
    print(result["table"], end="")
    print(f"\n{len(result['results'])} models in {result['seconds']:.0f} s; judge: {result['judge']}; "
          f"table: {args.out}/results.md; squeezing plots: {args.out}/<method>/squeezing.png")
    return 0


def recipe_main(argv: list[str]) -> int:
    from .recipe import FINETUNE, METHODS, STAGES, UNLEARN, Recipe, RecipeError, WeakOriginal, run_recipe

    p = argparse.ArgumentParser(prog="bs-unlearn recipe", description="The TOFU reproduction recipe, in resumable "
                                "stages that fit short GPU sessions (see bs_train/recipe.py).")
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
    args = p.parse_args(argv)
    try:
        recipe = Recipe(args.out, args.data, model=args.model, methods=tuple(args.methods.split(",")),
                        lr_grid=tuple(float(x) for x in args.lr_grid.split(",")), max_new_tokens=args.max_new_tokens,
                        budget_s=args.budget_s, probe_bar=args.probe_bar, preset=args.preset, protocol=args.protocol,
                        finetune=[*FINETUNE, *args.finetune],
                        unlearn=[*UNLEARN, *args.unlearn])
    except ValueError as e:
        print(f"bs-unlearn recipe: {e}", file=sys.stderr)
        return 2
    try:
        return 0 if run_recipe(recipe, args.stage) else 3
    except RecipeError as e:
        print(f"bs-unlearn recipe: {e}", file=sys.stderr)
        return 2
    except WeakOriginal as e:
        print(f"bs-unlearn recipe: {e}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
