"""MUSE's six-way evaluation, the four criteria measured on one model (the other two, scalability and
sustainability, are ways of running the recipe: ``bs_train/recipes/muse.py``).

Each criterion is a small function over one split, as MUSE's and open-unlearning's MUSE evaluators define them
(open-unlearning ``configs/eval/muse.yaml`` and ``configs/eval/muse_metrics/*.yaml``), aggregated in
``evaluate_loaded``:

1. **No verbatim memorisation**: ``forget_verbmem_ROUGE``, the mean ROUGE-L F1 of the greedy continuation
   (``VERBMEM_MAX_NEW_TOKENS`` = 128 tokens) of each ``verbmem/forget`` prompt against its ground truth; beside it the
   teacher-forced ``extraction_strength`` and ``exact_memorization`` of the ground truth given the prompt (MUSE's
   ``extraction_strength.yaml`` / ``exact_memorization.yaml`` use this split);
2. **No knowledge memorisation**: ``forget_knowmem_ROUGE``, the mean ROUGE-L F1 of greedy answers (32 tokens, cut at
   ``KNOWMEM_STOP``) to ``knowmem/forget_qa`` after its in-context examples;
3. **No privacy leakage**: ``privleak`` = ``((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain) * 100`` of the min-k%
   (k = 0.4) membership attack telling ``privleak/forget`` from ``privleak/holdout``, against the same AUC of a model
   never trained on the forget set (the retain model; 0.5 without one, as open-unlearning's ``ref_value``); the
   other attacks' AUCs (loss, zlib, min-k%++) beside it;
4. **Utility preservation**: ``retain_knowmem_ROUGE``, KnowMem on ``knowmem/retain_qa``.

Log-probs come from the fused scores (``evaluation/scoring.py``: no [B, T, V] logits); generation from the project's
sampler (``evaluation/generation.py``), greedy. ``protocol="open-unlearning"`` reproduces that code's inputs
(``muse/data.py``) and its token-wise rule of dropping each item's last labelled token (meant for an EOS that MUSE's
texts do not have) in ES, EM, min-k% and min-k%++; the loss and zlib attacks keep every token there too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ...console import progress as progress_bar
from .. import metrics
from ..common import load_eval_model
from ..generation import generate
from ..scoring import resolve_impl, score_encoded
from .data import (KNOWMEM_MAX_NEW_TOKENS, VERBMEM_MAX_NEW_TOKENS, MuseData, cut_answer, knowmem_prompt,
                   knowmem_reference, load_muse, mia_item, verbmem_item)

MIA_K = 0.4  # open-unlearning configs/eval/muse_metrics/mia_min_k.yaml ``k: 0.4`` (and mia_min_k_plus_plus.yaml)
ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")


def _texts(tokenizer: Any, outs: list[list[list[int]]]) -> list[str]:
    return [tokenizer.decode(o[0], skip_special_tokens=True) for o in outs]


def _tail(protocol: str) -> int:
    """Labelled tokens dropped from the end of each item in the token-wise metrics: open-unlearning's one."""
    return 1 if protocol == "open-unlearning" else 0


def verbmem(model, tokenizer, rows: list[dict[str, str]], *, protocol: str, batch_size: int, impl: str,
            on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Criterion 1: greedy continuations' ROUGE-L F1, and ES / EM of the ground truth under teacher forcing."""
    items = [verbmem_item(tokenizer, r, protocol) for r in rows]
    gens = [t.strip() for t in _texts(tokenizer, generate(
        model, tokenizer, [it["prompt"] for it in items], max_new_tokens=VERBMEM_MAX_NEW_TOKENS,
        batch_size=batch_size, on_batch=on_batch))]
    rouge = metrics.rouge_l_f1(gens, [it["gt"] for it in items])
    scored = score_encoded(model, items, pad_id=tokenizer.pad_token_id, batch_size=batch_size, impl=impl,
                           vocab_stats=True, on_batch=on_batch)
    cut = _tail(protocol)
    es, em = [], []
    for s in scored:
        pred, labels = s["pred"][:len(s["pred"]) - cut], s["labels"][:len(s["labels"]) - cut]
        es.append(metrics.extraction_strength(pred, labels) if len(labels) else 0.0)
        em.append(metrics.exact_memorization(pred, labels) if len(labels) else 0.0)
    return {"forget_verbmem_ROUGE": float(np.mean(rouge)), "extraction_strength": float(np.mean(es)),
            "exact_memorization": float(np.mean(em)),
            "per_example": {"verbmem_generations": gens, "verbmem_rouge": rouge, "verbmem_es": es}}


def knowmem(model, tokenizer, rows: list[dict[str, str]], icl: list[dict[str, str]], *, protocol: str,
            batch_size: int, on_batch: Callable[[int], None] | None = None) -> tuple[float, list[str], list[float]]:
    """Criteria 2 and 4: greedy answers after the in-context examples, cut at the stop strings; (mean ROUGE-L F1,
    answers, per-question F1)."""
    prompts = [knowmem_prompt(tokenizer, icl, r["question"], protocol) for r in rows]
    outs = generate(model, tokenizer, prompts, max_new_tokens=KNOWMEM_MAX_NEW_TOKENS, batch_size=batch_size,
                    on_batch=on_batch)
    answers = [cut_answer(t) for t in _texts(tokenizer, outs)]
    rouge = metrics.rouge_l_f1(answers, [knowmem_reference(tokenizer, icl, r, protocol) for r in rows])
    return float(np.mean(rouge)), answers, rouge


def mia_scores(model, tokenizer, texts: list[str], *, protocol: str, batch_size: int, impl: str,
               k: float = MIA_K, on_batch: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Each passage's score under every attack, oriented like a loss (higher = less likely a member)."""
    items = [mia_item(tokenizer, t) for t in texts]
    scored = score_encoded(model, items, pad_id=tokenizer.pad_token_id, batch_size=batch_size, impl=impl,
                           vocab_stats=True, on_batch=on_batch)
    cut, out = _tail(protocol), {a: [] for a in ATTACKS}
    for text, item, s in zip(texts, items, scored):
        if protocol == "open-unlearning":  # zlib over the decoded labels, as its attack reads them
            text = tokenizer.decode([t for t in item["labels"] if t != -100], skip_special_tokens=True)
        n = len(s["token_logp"]) - cut
        out["loss"].append(s["avg_nll"])
        out["zlib"].append(metrics.mia_zlib_score(s["avg_nll"], text))
        out["min_k"].append(metrics.min_k_score(s["token_logp"][:n], k))
        out["min_k_plus_plus"].append(metrics.min_k_plus_plus_score(s["token_logp"][:n], s["mu"][:n], s["var"][:n], k))
    return out


def mia_statistics(model, tokenizer, data: MuseData, *, protocol: str = "exact", batch_size: int = 16,
                   impl: str = "auto", on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Criterion 3's raw material: every attack's AUC on ``privleak/forget`` (members) against ``privleak/holdout``
    (1 = the forget set fully recognisable), also what a retain model contributes as the PrivLeak reference."""
    kw = {"protocol": protocol, "batch_size": batch_size, "impl": impl, "on_batch": on_batch}
    forget = mia_scores(model, tokenizer, data.privleak_forget, **kw)
    holdout = mia_scores(model, tokenizer, data.privleak_holdout, **kw)
    return {"mia_auc": {a: metrics.auc(forget[a], holdout[a]) for a in ATTACKS}}


def reference_statistics(retain_model: Any, data: MuseData, load_kw: dict | None = None, *, progress: bool = False,
                         **kw: Any) -> dict[str, Any] | None:
    """The retain model's MIA AUCs (the PrivLeak reference): from a model path (evaluated here), or an earlier
    result of this suite or ``mia_statistics``; None without one."""
    if retain_model is None:
        return None
    if isinstance(retain_model, Mapping):
        if not isinstance(retain_model.get("mia_auc"), Mapping):
            raise ValueError("the MUSE retain-model reference has no mia_auc (an evaluation of it by this suite)")
        return {"mia_auc": dict(retain_model["mia_auc"])}
    if isinstance(retain_model, (str, os.PathLike)):
        model, tok = load_eval_model(retain_model, **(load_kw or {}))
        bar = progress_bar(len(data.privleak_forget) + len(data.privleak_holdout), "eval retain model privleak",
                           unit="passages", enabled=progress)
        try:
            return mia_statistics(model, tok, data, on_batch=bar.update, **kw)
        finally:
            bar.close()
    raise ValueError(f"retain_model must be a path or an earlier result, got {type(retain_model).__name__}")


def evaluate_loaded(model: torch.nn.Module, tokenizer: Any, data: MuseData, *, reference: dict | None = None,
                    protocol: str = "exact", batch_size: int = 16, impl: str = "auto", progress: bool = False,
                    name: str = "model") -> dict[str, Any]:
    """MUSE's four per-model criteria on an already loaded model; one flat dict of numbers, ``per_example`` with
    every generation, and ``notes``. ``reference``: ``reference_statistics`` of a retain model (or None)."""
    kw = {"protocol": protocol, "batch_size": batch_size}
    impl = resolve_impl(impl, next(model.parameters()).device)
    notes: list[str] = []

    def bar(n: int, what: str):
        return progress_bar(n, f"eval {name} {what}", unit="items", enabled=progress)

    b = bar(2 * len(data.verbmem), "verbmem")
    try:
        res = verbmem(model, tokenizer, data.verbmem, impl=impl, on_batch=b.update, **kw)
    finally:
        b.close()
    per = res.pop("per_example")
    for split, rows, icl in (("forget", data.knowmem_forget, data.knowmem_forget_icl),
                             ("retain", data.knowmem_retain, data.knowmem_retain_icl)):
        b = bar(len(rows), f"knowmem {split}")
        try:
            res[f"{split}_knowmem_ROUGE"], per[f"knowmem_{split}_answers"], per[f"knowmem_{split}_rouge"] = knowmem(
                model, tokenizer, rows, icl, on_batch=b.update, **kw)
        finally:
            b.close()
    b = bar(len(data.privleak_forget) + len(data.privleak_holdout), "privleak")
    try:
        mia = mia_statistics(model, tokenizer, data, impl=impl, on_batch=b.update, **kw)
    finally:
        b.close()
    ref_auc = (reference or {}).get("mia_auc") or {}
    res["mia_auc"] = mia["mia_auc"]
    res.update({f"mia_{a}": v for a, v in mia["mia_auc"].items()})
    res["privleak_by_attack"] = {a: metrics.privleak(v, ref_auc.get(a, 0.5)) for a, v in mia["mia_auc"].items()}
    res["privleak"] = res["privleak_by_attack"]["min_k"]
    res["privleak_reference"] = "retain model" if ref_auc else "AUC 0.5 (no retain model)"
    if not ref_auc:
        notes.append("no retain model: PrivLeak is measured against AUC 0.5 (open-unlearning's ref_value), not a "
                     "model that never saw the forget set")
    if data.max_rows:
        notes.append(f"first {data.max_rows} rows of each probe split only (--max-rows)")
    return {**res, "benchmark": "muse", "protocol": protocol, "notes": notes, "per_example": per}


def evaluate_model(spec: str | os.PathLike[str], source: Any, *, retain_model: Any = None, max_rows: int | None = None,
                   protocol: str = "exact", batch_size: int = 16, device: str = "auto", dtype: str = "auto",
                   impl: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Load one model (run folder, model folder, ``smollm2-135m``, Hub id) and evaluate it on a MUSE corpus
    (``source``: a Hub id, a local folder of its layout, or a ``MuseData`` already read); writes nothing."""
    data = source if isinstance(source, MuseData) else load_muse(source, max_rows)
    load_kw = {"device": device, "dtype": dtype}
    ref = reference_statistics(retain_model, data, load_kw, protocol=protocol, batch_size=batch_size, impl=impl,
                               progress=progress)
    model, tok = load_eval_model(spec, **load_kw)
    name = os.path.basename(os.path.normpath(str(spec))) or str(spec)
    res = evaluate_loaded(model, tok, data, reference=ref, protocol=protocol, batch_size=batch_size, impl=impl,
                          progress=progress, name=name)
    res["model"] = str(spec)
    res["settings"] = {"data": data.source, "max_rows": data.max_rows, "protocol": protocol, "mia_k": MIA_K,
                       "retain_model": retain_model if isinstance(retain_model, (str, type(None))) else "given"}
    return res
