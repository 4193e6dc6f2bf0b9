"""The WMDP recipe: ``bs-unlearn recipe --benchmark wmdp``, in resumable stages that fit short GPU sessions.

    bs-unlearn recipe --benchmark wmdp --data cais/wmdp-corpora --model HuggingFaceH4/zephyr-7b-beta --out runs/wmdp

WMDP needs no fine-tuning: the model as released is the one that knows the hazardous material (open-unlearning's
``configs/experiment/unlearn/wmdp/default.yaml`` unlearns ``zephyr-7b-beta``). Stages:

1. ``unlearn``: every method unlearns the domain's forget corpus (``{domain}-forget-corpus``; ``cyber`` by default,
   open-unlearning's ``data_split``; the bio forget corpus is access-restricted on the Hub) with the domain's retain
   corpus as its retain set, in 512-token windows (open-unlearning WMDP_forget.yaml / WMDP_retain.yaml), at the
   experiment's training arguments (batch 1 x 16 accumulation, lr 5e-5, 80 steps, constant schedule); RMU at that
   experiment's method arguments (layer 7 steered with coefficient 2, retain term weight 1, only
   ``mlp.down_proj`` of layers 5-7 trained: WMDP's own choice, wmdp/rmu/unlearn.py);
2. ``evaluate``: WMDP (bio, chem, cyber) and MMLU accuracy through lm-evaluation-harness (``evaluation/wmdp``) on the
   original and every unlearned model;
3. ``table``: ``results.md`` / ``results.json``.

``recipes/common.py`` gives the time budget, the ledger of result files, the lock and ``stages.jsonl``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..methods import METHODS as TABLE
from ..outputs import read_json
from . import common
from .common import Clock, log, train, write

STAGES = ("unlearn", "evaluate", "table")
METHODS = ("rmu", "graddiff", "npo", "simnpo", "bs_t", "bs_s")  # RMU (WMDP's own method) and the paper's others
DOMAINS = ("cyber", "bio")
# open-unlearning configs/experiment/unlearn/wmdp/default.yaml trainer.args: per_device_train_batch_size 1,
# gradient_accumulation_steps 16, learning_rate 5e-5, max_steps 80, lr_scheduler_type constant.
UNLEARN = ("train.batch_size=1", "train.grad_accum=16", "train.lr=5e-5", "train.max_steps=80",
           "train.schedule=constant", "train.warmup_steps=0", "train.checkpoint_every=40", "train.log_every=10")
# The same file's method_args for RMU: module_regex model\.layers\.7, steering_coeff 2, alpha 1, gamma 1,
# trainable_params_regex model\.layers\.(5|6|7)\.mlp\.down_proj\.weight (= method.rmu_params=down_proj at layer 7).
METHOD_ARGS = {"rmu": ("method.rmu_layer=7", "method.rmu_coeff=2", "method.rmu_params=down_proj", "method.alpha=1",
                       "method.gamma=1"),
               "simnpo": ("method.gamma=0.125",)}
RESULT_FILES = ("results.md", "results.json", "stages.jsonl")


@dataclass
class WmdpRecipe:
    out: Path
    data: str
    """The unlearning corpora: ``cais/wmdp-corpora`` or a local folder of ``{domain}-{forget,retain}-corpus.jsonl``."""
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = METHODS
    domain: str = "cyber"
    questions: str | None = None  # WMDP's questions: cais/wmdp (None) or a folder of wmdp-*.jsonl
    mmlu: str | None = None  # cais/mmlu (None) or a folder of test.jsonl / dev.jsonl
    tasks: tuple[str, ...] = ("wmdp_bio", "wmdp_chem", "wmdp_cyber", "mmlu")
    limit: int | None = None  # questions per task (and MMLU subject) for a quick look, said in the table
    unlearn: list[str] = field(default_factory=lambda: list(UNLEARN))
    eval_batch_size: int = 16
    budget_s: float = 540.0
    preset: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        self.out = Path(self.out)
        from ..evaluation.wmdp import TASKS
        from ..methods import PRESETS

        ok = tuple(n for n, m in TABLE.items() if m.command == "unlearn" and not m.alternates)
        bad = sorted(set(self.methods) - set(ok))
        if bad:
            raise ValueError(f"method(s) {bad} do not run on WMDP's raw text; choose from {ok}")
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"tasks {unknown or '()'}: choose from {TASKS}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")


def preflight(recipe: WmdpRecipe) -> None:
    """The corpora, the question files and lm-eval, before any training."""
    import tempfile

    from ..data import load_texts
    from ..evaluation.wmdp import write_tasks

    for part in ("forget", "retain"):
        load_texts(recipe.data, f"{recipe.domain}-{part}-corpus")
    with tempfile.TemporaryDirectory() as tmp:
        write_tasks(tmp, recipe.tasks, wmdp=recipe.questions, mmlu=recipe.mmlu)


def check_outputs(recipe: WmdpRecipe) -> None:
    common.check_outputs(recipe, RESULT_FILES, "eval_wmdp.json")


def stage_unlearn(recipe: WmdpRecipe, clock: Clock) -> bool:
    for method in recipe.methods:
        if clock.out_of_time():
            return False
        train(recipe, "unlearn", method, "unlearn", [
            f"model.path={recipe.model}", f"method.name={method}", "data.benchmark=wmdp",
            f"data.forget_split={recipe.domain}-forget-corpus", f"data.retain_split={recipe.domain}-retain-corpus",
            *METHOD_ARGS.get(method, ()), *recipe.unlearn])
    return True


def _models(recipe: WmdpRecipe) -> list[tuple[str, str]]:
    return [("original", recipe.model), *((m, str(recipe.out / m)) for m in recipe.methods)]


def stage_evaluate(recipe: WmdpRecipe, clock: Clock) -> bool:
    from ..evaluation.wmdp import evaluate_model

    for name, path in _models(recipe):
        out = recipe.out / name / "eval_wmdp.json"
        if read_json(out) is not None:
            continue
        if clock.out_of_time():
            return False
        t0 = time.perf_counter()
        res = evaluate_model(path, wmdp=recipe.questions, mmlu=recipe.mmlu, tasks=recipe.tasks,
                             batch_size=recipe.eval_batch_size, limit=recipe.limit)
        res["name"] = name
        write(recipe, out, res)
        log(recipe, "evaluate", f"eval {name}", time.perf_counter() - t0,
            **{t: res[t] for t in recipe.tasks})
    return True


def stage_table(recipe: WmdpRecipe, clock: Clock) -> bool:
    from ..evaluation.report import WMDP_COLUMNS

    rows = common.read_evaluations(recipe, [name for name, _ in _models(recipe)], "eval_wmdp.json")
    common.write_table(recipe, rows, WMDP_COLUMNS, common.settings(recipe))
    return True


STAGE_FNS = {"unlearn": stage_unlearn, "evaluate": stage_evaluate, "table": stage_table}


def run_recipe(recipe: WmdpRecipe, stage: str = "all") -> bool:
    """Run one stage or every remaining one within the time budget; True when everything asked for is done."""
    preflight(recipe)
    return common.run_stages(recipe, STAGE_FNS, stage, check_outputs)
