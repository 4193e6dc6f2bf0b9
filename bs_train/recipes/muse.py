"""The MUSE recipe: ``bs-unlearn recipe --benchmark muse``, in resumable stages that fit short GPU sessions.

    bs-unlearn recipe --benchmark muse --data muse-bench/MUSE-News --out runs/muse_news   # rerun until "done"

Stages (``--stage`` runs one; rerunning resumes, every finished piece is skipped):

1. ``finetune``: MUSE's target models (``muse-bench/MUSE-*_target``) were fine-tuned on the corpus; where none is
   given (``--target``), the model is fine-tuned here on the forget and retain text (the "target"), and a "retain"
   model on the retain text alone (MUSE's ``_retrain`` reference for PrivLeak; ``--retain-model`` skips it). The
   target must reproduce the forget passages before unlearning means anything: its VerbMem ROUGE-L F1 on the probe
   rows must reach ``probe_bar`` (``target/verbmem_probe.json``), else the recipe stops (``WeakTarget``);
2. ``unlearn``: every method unlearns ``forget_split`` (raw/forget) from the target, its retain term on
   ``retain_split`` (raw/retain1, open-unlearning's MUSE_retain.yaml); with ``scalability`` also the growing forget
   sets ``scal/forget_1..4`` of MUSE-News (on a copy that lacks them, ``sust/forget_1+...+sust/forget_k``, which they
   are); with ``sustainability`` the sequential requests ``sust/forget_1..4``, each unlearned from the previous
   request's result (MUSE's fifth and sixth criteria, News only);
3. ``evaluate``: the MUSE suite (``evaluation/muse``) on every model, the retain model's membership AUCs as
   PrivLeak's reference;
4. ``table``: ``results.md`` / ``results.json``, with a row per model, and per scalability / sustainability step.

Unlearning runs at open-unlearning's MUSE settings (``configs/experiment/unlearn/muse/default.yaml``: batch 4 x 8
accumulation, lr 1e-5, 10 epochs, constant schedule), raw text in 2048-token windows (``data.window_tokens``).
Everything the TOFU recipe guarantees holds here too (``recipes/common.py``): the time budget, the ledger of result
files, the lock, ``stages.jsonl``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..methods import METHODS as TABLE
from ..outputs import read_json
from . import common
from .common import Clock, RecipeError, log, train, write

STAGES = ("finetune", "unlearn", "evaluate", "table")
METHODS = tuple(n for n, m in TABLE.items() if m.recipe and not m.alternates)  # every unlearner that reads raw text
# Fine-tuning the target and the retain model (ours, as the TOFU recipe's: the target must memorise its text first;
# open-unlearning fine-tunes Llama-2 on MUSE's train subsets at lr 1e-5 for 10 epochs, configs/experiment/finetune/
# muse/default.yaml, which a 135M model does not memorise a corpus with).
FINETUNE = ("train.lr=3e-4", "train.epochs=12", "train.batch_size=8", "train.grad_accum=1", "train.warmup_steps=5",
            "train.schedule=cosine", "train.checkpoint_every=100", "train.compile=auto", "train.log_every=10")
# open-unlearning configs/experiment/unlearn/muse/default.yaml: per_device_train_batch_size 4,
# gradient_accumulation_steps 8, learning_rate 1e-5, num_train_epochs 10, lr_scheduler_type constant.
UNLEARN = ("train.batch_size=4", "train.grad_accum=8", "train.epochs=10", "train.schedule=constant",
           "train.warmup_steps=0", "train.checkpoint_every=50", "train.log_every=10")
METHOD_ARGS = {"simnpo": ("method.gamma=0.125",)}  # open-unlearning configs/trainer/SimNPO.yaml, as the TOFU recipe
SCAL_STEPS = SUST_STEPS = 4  # MUSE-News scal/forget_1..4 and sust/forget_1..4


@dataclass
class MuseRecipe:
    out: Path
    data: str
    """A MUSE corpus: ``muse-bench/MUSE-News``, ``muse-bench/MUSE-Books`` or a local folder of that layout."""
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = METHODS
    lr: float = 1e-5  # open-unlearning configs/experiment/unlearn/muse/default.yaml learning_rate
    finetune: list[str] = field(default_factory=lambda: list(FINETUNE))
    unlearn: list[str] = field(default_factory=lambda: list(UNLEARN))
    forget_split: str = "raw/forget"
    retain_split: str = "raw/retain1"
    retain_source: str | None = None  # MUSE-News offline has no raw retain text: e.g. MUSE-Books' (say so)
    target: str | None = None  # an already fine-tuned target model (e.g. muse-bench/MUSE-News_target)
    retain_model: str | None = None  # an already trained retain model (e.g. muse-bench/MUSE-News_retrain)
    probe_bar: float = 0.3  # ours: the target's VerbMem ROUGE-L F1 on the probe rows must reach this
    max_rows: int | None = None  # evaluate on the first N rows of each probe split only (said in the table)
    eval_batch_size: int = 16
    scalability: bool = False
    sustainability: bool = False
    budget_s: float = 540.0
    preset: str | None = None
    protocol: str = "exact"
    overwrite: bool = False

    def __post_init__(self):
        self.out = Path(self.out)
        from ..data import check_protocol
        from ..methods import PRESETS

        bad = sorted(set(self.methods) - set(METHODS))
        if bad:
            raise ValueError(f"method(s) {bad} do not run on MUSE's raw text; the recipe runs {METHODS}")
        check_protocol(self.protocol)
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        if self.lr <= 0 or self.eval_batch_size < 1:
            raise ValueError(f"lr must be > 0 and eval_batch_size >= 1, got {self.lr}, {self.eval_batch_size}")

    @property
    def target_path(self) -> str:
        return self.target or str(self.out / "target" / "final")

    @property
    def retain_path(self) -> str:
        return self.retain_model or str(self.out / "retain" / "final")


class WeakTarget(RuntimeError):
    """The target does not reproduce its forget passages: unlearning them would measure nothing."""


RESULT_FILES = ("results.md", "results.json", "stages.jsonl", "target/verbmem_probe.json")


def _scal_split(recipe: MuseRecipe, k: int) -> str:
    """``scal/forget_k``, or on a copy without it the ``sust/forget_1..k`` it is made of."""
    from ..data.rows import is_local

    if not is_local(recipe.data) or (Path(recipe.data) / "scal" / f"forget_{k}.jsonl").is_file():
        return f"scal/forget_{k}"
    return "+".join(f"sust/forget_{i}" for i in range(1, k + 1))


def preflight(recipe: MuseRecipe) -> None:
    """Every split the stages read, and the evaluation's probe splits, before any training."""
    from ..data import load_texts
    from ..evaluation.muse import load_muse

    load_muse(recipe.data, recipe.max_rows)
    load_texts(recipe.data, recipe.forget_split)
    load_texts(recipe.retain_source or recipe.data, recipe.retain_split)
    if recipe.scalability or recipe.sustainability:
        for k in range(1, SCAL_STEPS + 1):
            try:
                if recipe.scalability:
                    load_texts(recipe.data, _scal_split(recipe, k))
                if recipe.sustainability:
                    load_texts(recipe.data, f"sust/forget_{k}")
            except ValueError as e:
                raise RecipeError(f"scalability / sustainability need MUSE-News's scal / sust splits: {e}") from None


def check_outputs(recipe: MuseRecipe) -> None:
    common.check_outputs(recipe, RESULT_FILES, "eval_muse.json")


def _text_args(recipe: MuseRecipe) -> list[str]:
    return ["data.benchmark=muse", *([f"data.retain_source={recipe.retain_source}"] if recipe.retain_source else [])]


def _probe(recipe: MuseRecipe) -> dict:
    """The target's VerbMem on the probe rows (``target/verbmem_probe.json``), with a few continuations to read."""
    path = recipe.out / "target" / "verbmem_probe.json"
    done = read_json(path)
    if done is not None:
        return done
    from ..evaluation.common import load_eval_model
    from ..evaluation.muse import load_muse
    from ..evaluation.muse.suite import verbmem

    t0 = time.perf_counter()
    model, tok = load_eval_model(recipe.target_path)
    rows = load_muse(recipe.data, recipe.max_rows).verbmem
    res = verbmem(model, tok, rows, protocol=recipe.protocol, batch_size=recipe.eval_batch_size, impl="auto")
    probe = {"verbmem_rouge_l_f1": res["forget_verbmem_ROUGE"], "extraction_strength": res["extraction_strength"],
             "rows": len(rows), "examples": [{"prompt_end": r["prompt"][-200:], "gt": r["gt"], "target": g}
                                             for r, g in zip(rows[:3], res["per_example"]["verbmem_generations"])]}
    write(recipe, path, probe)
    log(recipe, "finetune", "probe target", time.perf_counter() - t0, verbmem=probe["verbmem_rouge_l_f1"])
    return probe


def stage_finetune(recipe: MuseRecipe, clock: Clock) -> bool:
    both = f"{recipe.forget_split}+{recipe.retain_split}"
    runs = []
    if recipe.target is None:
        runs.append(("target", both if recipe.retain_source is None else recipe.forget_split))
    if recipe.retain_model is None:
        runs.append(("retain", recipe.retain_split))
    for name, split in runs:
        if clock.out_of_time():
            return False
        source = recipe.retain_source if name == "retain" and recipe.retain_source else recipe.data
        train(recipe, "finetune", name, "finetune", [f"model.path={recipe.model}", *_text_args(recipe),
                                                     f"data.source={source}", f"data.train_split={split}",
                                                     *recipe.finetune])
    probe = _probe(recipe)
    if probe["verbmem_rouge_l_f1"] < recipe.probe_bar:
        raise WeakTarget(f"the target does not reproduce its forget passages: VerbMem ROUGE-L F1 "
                         f"{probe['verbmem_rouge_l_f1']:.3f} < {recipe.probe_bar} ({recipe.out / 'target'}); "
                         "fine-tune longer (--finetune train.epochs=...) after moving target/ and retain/ away")
    return True


def _unlearn_args(recipe: MuseRecipe, method: str, forget: str, model: str) -> list[str]:
    return [f"model.path={model}", f"method.name={method}", f"train.lr={recipe.lr}", *_text_args(recipe),
            f"data.forget_split={forget}", f"data.retain_split={recipe.retain_split}", *METHOD_ARGS.get(method, ()),
            *recipe.unlearn]


def runs(recipe: MuseRecipe) -> list[tuple[str, str, str, str]]:
    """Every unlearning run in order: (run name, method, forget split, the model it starts from)."""
    out = [(m, m, recipe.forget_split, recipe.target_path) for m in recipe.methods]
    if recipe.scalability:
        out += [(f"scal/{m}_forget_{k}", m, _scal_split(recipe, k), recipe.target_path)
                for m in recipe.methods for k in range(1, SCAL_STEPS + 1)]
    if recipe.sustainability:
        for m in recipe.methods:
            start = recipe.target_path
            for k in range(1, SUST_STEPS + 1):
                out.append((f"sust/{m}_{k}", m, f"sust/forget_{k}", start))
                start = str(recipe.out / f"sust/{m}_{k}" / "final")
    return out


def stage_unlearn(recipe: MuseRecipe, clock: Clock) -> bool:
    for name, method, forget, start in runs(recipe):
        if clock.out_of_time():
            return False
        train(recipe, "unlearn", name, "unlearn", _unlearn_args(recipe, method, forget, start))
    return True


def _models(recipe: MuseRecipe) -> list[tuple[str, str]]:
    """(name, model path) of every model the table shows."""
    return [("target", recipe.target_path), ("retain", recipe.retain_path),
            *((name, str(recipe.out / name)) for name, _, _, _ in runs(recipe))]


def stage_evaluate(recipe: MuseRecipe, clock: Clock) -> bool:
    from ..evaluation.muse import evaluate_model, load_muse, reference_statistics

    data = load_muse(recipe.data, recipe.max_rows)
    kw = {"protocol": recipe.protocol, "batch_size": recipe.eval_batch_size}
    ref = None
    for name, path in _models(recipe):
        out = recipe.out / name / "eval_muse.json"
        done = read_json(out)
        if done is None:
            if clock.out_of_time():
                return False
            if ref is None and name != "retain":
                ref = reference_statistics(read_json(recipe.out / "retain" / "eval_muse.json", say=None)
                                           or recipe.retain_path, data, **kw)
            t0 = time.perf_counter()
            done = evaluate_model(path, data, retain_model=ref, progress=True, **kw)
            done["name"] = name
            write(recipe, out, done)
            log(recipe, "evaluate", f"eval {name}", time.perf_counter() - t0, verbmem=done["forget_verbmem_ROUGE"],
                privleak=done["privleak"])
        if name == "retain":
            ref = {"mia_auc": done["mia_auc"]}
    return True


def stage_table(recipe: MuseRecipe, clock: Clock) -> bool:
    from ..evaluation.report import MUSE_COLUMNS

    rows = common.read_evaluations(recipe, [name for name, _ in _models(recipe)], "eval_muse.json")
    common.write_table(recipe, rows, MUSE_COLUMNS, common.settings(recipe))
    return True


STAGE_FNS = {"finetune": stage_finetune, "unlearn": stage_unlearn, "evaluate": stage_evaluate, "table": stage_table}


def run_recipe(recipe: MuseRecipe, stage: str = "all") -> bool:
    """Run one stage or every remaining one within the time budget; True when everything asked for is done."""
    preflight(recipe)
    return common.run_stages(recipe, STAGE_FNS, stage, check_outputs)
