"""Run the attacks on a set of models with the original and the retain model as references, and score recovery.

``run_attacks`` attacks the original, the retain model and every model given, each once, on the same held-out forget
rows; then every number an attack produced is placed between the retain model's (0) and the original's (1) under the
same attack (``measure.recovery``). Per model and attack the headline recovery is the worst case over that attack's
variants (relearning steps, bit widths, probes); the model's summary is the worst case over the attacks. Nothing is
written into a model's folder: results go to ``out`` (and, for a run folder, ``attacks.json`` / ``relearn.png``
beside its ``final/``, as ``eval.json`` is).
"""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .. import quantize
from ..data import load_split, resolve_data
from ..model import load_model, resolve_model_path
from ..outputs import atomic_write, refuse_existing, write_json
from . import measure, probes, relearn
from .config import AttackConfig
from .report import markdown, plot_relearn

ROLES = ("original", "retain")


def _device(spec: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else torch.device(spec)


def load(spec: str, device: torch.device):
    """``(model in eval mode, tokenizer)`` of a run folder (its ``final/``), model folder, ``smollm2-135m`` or Hub
    id; bf16 on CUDA, fp32 elsewhere, as ``bs_train.evaluation.tofu`` loads."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok = load_model(resolve_model_path(spec), dtype=dtype, device=device, use_liger=False)
    return model.eval(), tok


def _free() -> None:
    """Return a dropped model's memory to CUDA. On the CPU, reference counting frees it already and a full
    ``gc.collect`` (about 0.5 s with torch and transformers loaded) would cost more than it gives back."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def attack_one(spec: str, cfg: AttackConfig, rows: dict[str, list[dict[str, Any]]], matcher: measure.Matcher,
               lr: float, work: Path) -> dict[str, Any]:
    """Every configured attack on one model; raw numbers only (recovery needs the references)."""
    device = _device(cfg.device)
    kw = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "max_length": cfg.max_length}
    held = rows["held_out"]
    model, tok = load(spec, device)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"model": str(spec), "none": measure.knowledge(model, tok, held, matcher, **kw)}
    if "quantize" in cfg.attacks:
        from ..quantize import quantized_copy

        res["quantize"] = {"full": {**{k: res["none"][k] for k in ("forget_Q_A_Prob", "extraction_strength",
                                                                     "forget_Q_A_ROUGE", "recovered")},
                                    **measure.retain_knowledge(model, tok, rows["retain"], **_score_kw(cfg))}}
        for bits in cfg.bits:
            qmodel, report = quantized_copy(model, bits, cfg.group_size)
            res["quantize"][f"int{bits}"] = {**measure.knowledge(qmodel, tok, held, matcher, **kw),
                                             **measure.retain_knowledge(qmodel, tok, rows["retain"],
                                                                        **_score_kw(cfg)),
                                             "weights": report}
            del qmodel
            _free()
    if "paraphrase" in cfg.attacks:
        res["paraphrase"] = probes.paraphrase_probes(model, tok, held, matcher, seed=cfg.seed, **kw)
    if "sample" in cfg.attacks:
        res["sample"] = {**probes.belief_sampling(model, tok, held, matcher, samples=cfg.samples,
                                                  temperature=cfg.temperature, seed=cfg.seed,
                                                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size),
                         "greedy_rate": res["none"]["recovered"]}
    del model
    _free()
    if "relearn" in cfg.attacks:
        res["relearn"] = relearn.relearn_curve(
            resolve_model_path(spec), rows["relearn"], work, cfg, lr,
            score=lambda m, t: measure.knowledge(m, t, held, matcher, **kw), load=lambda p: load(p, device),
            step0=res["none"])
        _free()
    res["seconds"] = time.perf_counter() - t0
    return res


def _score_kw(cfg: AttackConfig) -> dict[str, int]:
    return {"batch_size": cfg.batch_size, "max_length": cfg.max_length}


def variants(res: dict[str, Any], attack: str) -> dict[str, float | None]:
    """The headline number of each variant of ``attack`` in one model's raw result."""
    if attack == "relearn":
        c = res["relearn"]
        return {f"step{k}": v for k, v in zip(c["steps"], c["forget_Q_A_Prob"]) if k > 0}
    if attack == "quantize":
        return {k: v["forget_Q_A_Prob"] for k, v in res["quantize"].items() if k != "full"}
    if attack == "paraphrase":
        return {k: probes.probe_value(v) for k, v in res["paraphrase"].items()}
    if attack == "sample":
        return {"any_of_n": res["sample"]["any_rate"]}
    raise ValueError(f"unknown attack {attack!r}")


def score_recovery(res: dict[str, Any], refs: dict[str, dict[str, Any] | None], cfg: AttackConfig) -> None:
    """Add ``recovery`` (per attack and variant) and ``summary`` to ``res``, against the references."""
    orig, ret = refs.get("original"), refs.get("retain")

    def rec(value, attack, variant):
        def ref(r):
            return None if r is None else (r["none"]["forget_Q_A_Prob"] if attack == "none"
                                           else variants(r, attack).get(variant))
        return measure.recovery(value, ref(ret), ref(orig), cfg.min_gap)

    summary: dict[str, Any] = {"none": rec(res["none"]["forget_Q_A_Prob"], "none", None)}
    recov: dict[str, Any] = {}
    for attack in cfg.attacks:
        recov[attack] = {v: rec(x, attack, v) for v, x in variants(res, attack).items()}
        vals = [x for x in recov[attack].values() if x is not None]
        summary[attack] = max(vals) if vals else None
    worst = {a: summary[a] for a in cfg.attacks if summary[a] is not None}
    summary["worst"] = max(worst.values()) if worst else None
    summary["worst_attack"] = max(worst, key=worst.get) if worst else None
    if "quantize" in cfg.attacks and orig is not None:  # Zhang et al.'s framing: the share of the drop that returns
        drop = orig["none"]["forget_Q_A_Prob"] - res["none"]["forget_Q_A_Prob"]
        summary["quantize_gain"] = {k: (v["forget_Q_A_Prob"] - res["none"]["forget_Q_A_Prob"]) / drop
                                    if drop >= cfg.min_gap else None
                                    for k, v in res["quantize"].items() if k != "full"}
    res["recovery"], res["summary"] = recov, summary


def _key(spec: str) -> str:
    """One spelling per model: a run folder and its ``final/`` are the same model."""
    path = Path(resolve_model_path(spec))
    return str(path.resolve()) if path.exists() else str(spec)


def _name(spec: str) -> str:
    p = Path(spec)
    return p.parent.name if p.name == "final" else (p.name if p.exists() else spec)


def _run_dir(spec: str) -> Path | None:
    p = Path(spec)
    p = p.parent if p.name == "final" else p
    return p if (p / "final" / "config.json").is_file() else None


def run_attacks(models: list[str], *, original: str | None = None, retain: str | None = None, data: Any = None,
                cfg: AttackConfig | None = None, out: str | Path = "attacks", progress: bool = True,
                judge: Any = None, overwrite: bool = False) -> dict[str, Any]:
    """Attack ``models`` (plus the references given) and write ``out/attacks.json``, ``out/attacks.md`` and
    ``out/relearn_<name>.png``; a run folder among ``models`` also gets ``attacks.json`` and ``relearn.png``.

    ``original`` defaults to the model a run was unlearned from (its config.yaml's ``model.path``); without it and
    ``retain`` recovery is None and only the raw numbers are reported. ``judge``: an ``EmbeddingJudge`` already
    loaded (the demo's), reused when ``cfg.judge`` is "embedding" instead of loading a second one. ``overwrite``:
    replace result files already there (else they are refused, before any model loads: ``bs_train/outputs.py``).
    Returns the written dict."""
    cfg = cfg or AttackConfig()
    if not models and original is None and retain is None:
        raise ValueError("nothing to attack: give at least one model")
    if original is None and models:
        original = _unlearned_from(models[0])
    data = resolve_data(data, models[0] if models else (original or retain))
    forget = measure.forget_rows(data, cfg.forget_split)
    if cfg.relearn_split is not None:
        pool = [dict(r) for r in load_split(data, cfg.relearn_split)]
        n = max(1, round(cfg.relearn_fraction * len(forget)))
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed)).tolist()[:n]
        rows = {"relearn": [pool[i] for i in sorted(order)], "held_out": forget}
    else:
        rows = dict(zip(("relearn", "held_out"), measure.split_forget(forget, cfg.relearn_fraction, cfg.seed)))
    retain_rows = load_split(data, cfg.retain_split, required=False) or []  # without it: forget numbers only
    rows["retain"] = list(retain_rows[:cfg.max_retain_rows])
    lr = cfg.relearn_lr or relearn.default_lr(original)
    matcher = measure.Matcher(cfg.judge, cfg.threshold, device=_device(cfg.device), judge=judge)
    out = Path(out)
    specs = [(role, s) for role, s in zip(ROLES, (original, retain)) if s is not None]
    refs_keys = {_key(s) for _, s in specs}
    specs += [("unlearned", s) for s in models if _key(s) not in refs_keys]
    refuse_existing(_outputs(out, specs, models, cfg), overwrite=overwrite, what="attack result")
    if "quantize" in cfg.attacks and (why := quantize.unavailable()) is not None:
        raise ValueError(f"{why}; or leave it out: --attacks {','.join(a for a in cfg.attacks if a != 'quantize')}")
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for role, spec in specs:
        if progress:
            print(f"attack: {role} {spec}", flush=True)
        res = attack_one(spec, cfg, rows, matcher, lr, out / "_relearn_work")
        res.update(name=_name(spec), role=role)
        results.append(res)
    refs = {r["role"]: r for r in results if r["role"] in ROLES}
    for res in results:
        score_recovery(res, refs, cfg)
    notes = [n for n in [relearn.damage_note(refs["original"]["relearn"])
                         if "relearn" in cfg.attacks and "original" in refs else None] if n]
    doc = {"config": cfg.to_dict(), "rule": matcher.rule, "relearn_lr": lr, "original": original, "retain": retain,
           "notes": notes,
           "rows": {k: len(v) for k, v in rows.items()},
           "relearn_questions": [r["question"] for r in rows["relearn"]], "results": results}
    table = markdown(results, cfg) + "".join(f"\nnote: {n}\n" for n in notes)
    write_json(out / "attacks.json", doc)
    atomic_write(out / "attacks.md", table)
    asked = {_key(s) for s in models}
    for res in results:
        curves = [r for r in results if r["role"] in ROLES or r is res]
        plot = None
        if "relearn" in cfg.attacks and (res["role"] == "unlearned" or len(results) == len(refs)):
            plot = plot_relearn(curves, out / f"relearn_{res['name']}.png", focus=res["name"])
        run_dir = _run_dir(res["model"])
        if run_dir is not None and _key(res["model"]) in asked:
            own = {**doc, "results": curves, "summary": res["summary"], "name": res["name"]}
            write_json(run_dir / "attacks.json", own)
            if "relearn" in cfg.attacks:  # the same curves and focus: the same figure, copied rather than redrawn
                if plot is None:
                    plot_relearn(curves, run_dir / "relearn.png", focus=res["name"])
                else:
                    shutil.copyfile(plot, run_dir / "relearn.png")
    doc["table"] = table
    return doc


def _outputs(out: Path, specs: list[tuple[str, str]], models: list[str], cfg: AttackConfig) -> list[Path]:
    """Every file ``run_attacks`` will write: its table and JSON, the relearning plots, and in each run folder
    attacked its own ``attacks.json`` (+ ``relearn.png``)."""
    paths = [out / "attacks.json", out / "attacks.md"]
    relearn_plots = "relearn" in cfg.attacks
    if relearn_plots:
        paths += [out / f"relearn_{_name(s)}.png" for _, s in specs]
    asked = {_key(s) for s in models}
    for _, spec in specs:
        run_dir = _run_dir(spec)
        if run_dir is not None and _key(spec) in asked:
            paths += [run_dir / "attacks.json"] + ([run_dir / "relearn.png"] if relearn_plots else [])
    return paths


def _unlearned_from(spec: str) -> str | None:
    """The ``model.path`` a run folder was unlearned from (its config.yaml), when it is a folder that exists."""
    run_dir = _run_dir(spec)
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    import yaml

    raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if raw.get("command") != "unlearn":
        return None
    path = (raw.get("model") or {}).get("path")
    return path if path and Path(path).exists() else None
