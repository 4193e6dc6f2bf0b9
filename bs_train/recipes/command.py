"""``bs-unlearn recipe --benchmark tofu|muse|wmdp``: a benchmark's reproduction in resumable stages.

Each benchmark's recipe lives in its own module (``tofu.py``, ``muse.py``, ``wmdp.py``); this module reads the
command line into the right one and runs it (or, with ``--plan``, prints its predicted time on one GPU:
``plan.py``). Exit status: 0 done, 3 stopped at ``--budget-s`` (rerun to continue) or a plan over budget, 2 a
one-line error (bad option or data, a file in the way, the folder in use), 4 a fine-tuned model that does not know
what it should forget.
"""

from __future__ import annotations

import argparse
import sys

BENCHMARKS = ("tofu", "muse", "wmdp")
OUT = {b: f"runs/{b}_smollm2" for b in BENCHMARKS}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import PRESETS
    from .tofu import JUDGE_MODES

    p.add_argument("--benchmark", default="tofu", choices=BENCHMARKS, help="which benchmark's recipe runs")
    p.add_argument("--data", required=True, help="tofu: a TOFU folder or locuslab/TOFU; muse: a MUSE corpus "
                                                 "(muse-bench/MUSE-News, -Books or a folder of that layout); wmdp: "
                                                 "the unlearning corpora (cais/wmdp-corpora or a folder)")
    p.add_argument("--out", help="default runs/<benchmark>_smollm2")
    p.add_argument("--stage", default="all", help="all, or one stage: tofu finetune / select / unlearn / evaluate / "
                                                  "table; muse finetune / unlearn / evaluate / table; wmdp unlearn / "
                                                  "evaluate / table")
    p.add_argument("--model", default="smollm2-135m",
                   help="the model the recipe starts from (tofu / muse: fine-tuned first; wmdp: unlearned as it is)")
    p.add_argument("--methods", help="comma-separated (default: the benchmark recipe's METHODS)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new work after this many seconds")
    p.add_argument("--unlearn", nargs="*", default=[],
                   help="unlearning settings (key=value), applied after the recipe's own (its UNLEARN)")
    p.add_argument("--finetune", nargs="*", default=[],
                   help="tofu / muse: fine-tuning settings (key=value), applied after the recipe's own (FINETUNE)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="config preset of every unlearning run")
    p.add_argument("--protocol", default="exact", help="tofu / muse: evaluation protocol, exact | open-unlearning")
    p.add_argument("--eval-batch-size", type=int, default=16, help="questions per evaluation batch (a GPU: 512)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace result files in --out that the recipe did not write, or that changed since")
    p.add_argument("--plan", action="store_true",
                   help="print the predicted time of every stage on one GPU (bs_train/recipes/plan.py) and exit: 0 "
                        "if it fits --budget-s, 3 if not")
    p.add_argument("--plan-gpu", default="h100", choices=("h100", "h200"),
                   help="the GPU --plan predicts for (plan.py GPUS; h100: the lent machine's default)")
    g = p.add_argument_group("tofu")
    g.add_argument("--lr-grid", default="1e-5,2e-5,5e-5", help="learning rates tried on forget05 per method")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tofu: longest greedy answer in evaluation")
    g.add_argument("--probe-bar", type=float, help="tofu: the original's forget10 answer probability and greedy "
                                                   "ROUGE-L must reach this (0.9); muse: the target's VerbMem (0.3)")
    g.add_argument("--judge", default="embedding", choices=JUDGE_MODES,
                   help="embedding: the offline judge in every evaluation; later: none now, --rejudge adds it")
    g.add_argument("--rejudge", action="store_true",
                   help="score a --judge later run's saved answers with the offline judge and rebuild the table")
    g = p.add_argument_group("muse")
    g.add_argument("--lr", type=float, default=1e-5, help="muse: every method's learning rate (open-unlearning's)")
    g.add_argument("--target", help="muse: an already fine-tuned target model (no fine-tuning stage for it)")
    g.add_argument("--retain-model", help="muse: an already trained retain model (PrivLeak's reference)")
    g.add_argument("--retain-source", help="muse: read the retain text from this corpus (MUSE-News offline lacks it)")
    g.add_argument("--max-rows", type=int, help="muse: evaluate on the first N rows of each probe split only")
    g.add_argument("--scalability", action="store_true", help="muse: also unlearn scal/forget_1..4 (News)")
    g.add_argument("--sustainability", action="store_true",
                   help="muse: also unlearn sust/forget_1..4 one after another (News)")
    g = p.add_argument_group("wmdp")
    g.add_argument("--domain", default="cyber", help="wmdp: the corpora's domain, cyber (default) or bio")
    g.add_argument("--questions", help="wmdp: the WMDP questions (cais/wmdp by default, or a folder of wmdp-*.jsonl)")
    g.add_argument("--mmlu", help="wmdp: MMLU (cais/mmlu by default, or a folder of test.jsonl and dev.jsonl)")
    g.add_argument("--tasks", default="wmdp_bio,wmdp_chem,wmdp_cyber,mmlu", help="wmdp: lm-eval tasks")
    g.add_argument("--limit", type=int, help="wmdp: at most N questions per task (a quick look)")


def build(args: argparse.Namespace):
    """The benchmark's recipe object from the command line (a ``ValueError`` names a bad option)."""
    out = args.out or OUT[args.benchmark]
    common = {"budget_s": args.budget_s, "preset": args.preset, "overwrite": args.overwrite,
              "eval_batch_size": args.eval_batch_size}
    methods = {"methods": tuple(args.methods.split(","))} if args.methods else {}
    if args.benchmark == "tofu":
        from .tofu import FINETUNE, UNLEARN, Recipe

        return Recipe(out, args.data, model=args.model, lr_grid=tuple(float(x) for x in args.lr_grid.split(",")),
                      max_new_tokens=args.max_new_tokens, probe_bar=0.9 if args.probe_bar is None else args.probe_bar,
                      protocol=args.protocol, finetune=[*FINETUNE, *args.finetune],
                      unlearn=[*UNLEARN, *args.unlearn], judge=args.judge, **methods, **common)
    if args.benchmark == "muse":
        from .muse import FINETUNE, UNLEARN, MuseRecipe

        return MuseRecipe(out, args.data, model=args.model, lr=args.lr, finetune=[*FINETUNE, *args.finetune],
                          unlearn=[*UNLEARN, *args.unlearn], retain_source=args.retain_source, target=args.target,
                          retain_model=args.retain_model, max_rows=args.max_rows,
                          probe_bar=0.3 if args.probe_bar is None else args.probe_bar, scalability=args.scalability,
                          sustainability=args.sustainability, protocol=args.protocol, **methods, **common)
    from .wmdp import UNLEARN, WmdpRecipe

    return WmdpRecipe(out, args.data, model=args.model, domain=args.domain, questions=args.questions, mmlu=args.mmlu,
                      tasks=tuple(t for t in args.tasks.split(",") if t), limit=args.limit,
                      unlearn=[*UNLEARN, *args.unlearn], **methods, **common)


def main(args: argparse.Namespace) -> int:
    from . import muse, tofu, wmdp

    say = (lambda msg: print(f"bs-unlearn recipe: {msg}", file=sys.stderr))
    module = {"tofu": tofu, "muse": muse, "wmdp": wmdp}[args.benchmark]
    try:
        recipe = build(args)
        if args.stage != "all" and args.stage not in module.STAGES:
            raise ValueError(f"--stage {args.stage!r}: the {args.benchmark} recipe's stages are "
                             f"{', '.join(module.STAGES)} (or all)")
        if args.plan:
            from .plan import GPUS, plan_for, total_seconds

            work, text = plan_for(recipe, hw=GPUS[args.plan_gpu])
            print(text, end="")
            return 0 if total_seconds(work) <= recipe.budget_s else 3
        if args.rejudge:
            if args.benchmark != "tofu":
                raise ValueError("--rejudge is for the TOFU recipe's judge")
            done = tofu.rejudge(recipe)
            print(f"bs-unlearn recipe: judged {done['scored']} evaluations; judged Agg. would pick another rate "
                  f"for: {', '.join(done['changed_choice']) or 'none'} (selection.json)")
            return 0
        return 0 if module.run_recipe(recipe, args.stage) else 3
    except (ValueError, OSError) as e:  # a bad option, a file in the way, a folder in use, bad data: one line
        say(str(e))
        return 2
    except (tofu.WeakOriginal, muse.WeakTarget) as e:
        say(str(e))
        return 4
