"""Evaluate a model on TOFU-format data: the TOFU metric suite, memorisation, membership inference, Mem/Util/Agg.

The suite only: it asks ``bs_train/evaluation/scoring.py`` for answer NLLs, per-token log-probs and vocabulary statistics,
``bs_train/evaluation/generation.py`` for greedy answers (the project's sampler for the families it drives, HF
``generate`` otherwise), ``bs_train/evaluation/judge.py`` for similarity and fluency, and turns them into numbers with the formulas of
``bs_train/evaluation/metrics.py``; the data comes through ``resolve_data`` / ``load_split`` of ``bs_train/data/qa.py``.

* ``evaluate_loaded`` / ``evaluate_model``: the whole suite on a data source (a folder of ``{split}.jsonl``, a Hub id,
  ``"synthetic"`` or an in-memory ``{split: rows}`` mapping), returning one flat dict; nothing is written;
* ``forget_statistics`` / ``reference_statistics``: the forget-set numbers that need no generation, for this model
  or for a retain model used as the reference of forget quality and PrivLeak.

``protocol="exact"`` (default) builds the inputs our way; ``"open-unlearning"`` as open-unlearning's evaluator does
(``bs_train/data/qa.py``: its template arguments, labels and pad-token attention mask; greedy answers through HF
``generate`` with that mask; 1e-10 in the truth ratio and forget quality). Both report forget quality as the
p-value (``forget_quality``) and its natural log (``forget_quality_log``, what the BS authors' fork reports).

Splits read: ``{forget}`` (+ ``{forget}_perturbed``), ``holdout{NN}``, ``retain_perturbed``, ``real_authors`` /
``world_facts`` (+ ``_perturbed``). Splits that do not exist are skipped and named in ``notes``; model utility is
computed over the splits present (``utility_splits``; the caller may ask for fewer). ``first_rows(data, n)`` bounds
every split to its first n rows. With ``progress=True`` each model shows one bar per split (``bs_train/console.py``:
tqdm on a terminal, plain lines in a log), and ``estimate`` times one batch of scoring and one of generation to say,
before the work, about how long it will take.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bs_kernels import IGNORE_INDEX

from .. import metrics
from . import metrics as tofu_metrics
from ...console import progress as progress_bar
from ...data import check_perturbed, check_protocol, encode_qa, load_split, resolve_data, wrong_answers
from ..generation import generate_text
from ..common import load_eval_model
from ..judge import make_judge
from ...model import model_device
from ..scoring import resolve_impl, score_answers


UTILITY_SPLITS = ("retain_perturbed", "real_authors", "world_facts")  # TOFU's model-utility splits


class FirstRows(Mapping):
    """A data source (folder, Hub id or mapping) seen through its first ``max_rows`` rows per split (all rows when
    ``None``), each split read once. ``{forget}`` and ``{forget}_perturbed`` keep the same rows, as do the retain
    model's reference and every evaluated model."""

    def __init__(self, source: Any, max_rows: int | None):
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.source, self.max_rows, self._cache = source, max_rows, {}

    def load(self, split: str, required: bool = True) -> list[dict[str, Any]] | None:
        if split not in self._cache:
            rows = load_split(self.source, split, required=required)
            if rows is None:
                return None
            self._cache[split] = rows[:self.max_rows] if self.max_rows is not None else rows
        return self._cache[split]

    def __getitem__(self, split: str) -> list[dict[str, Any]]:
        rows = self.load(split, required=False)
        if rows is None:
            raise KeyError(split)
        return rows

    def __iter__(self) -> Iterator[str]:
        if isinstance(self.source, Mapping):
            return iter(self.source)
        path = Path(str(self.source)).expanduser()
        return iter(sorted(p.stem for p in path.glob("*.jsonl")) if path.is_dir() else ())

    def __len__(self) -> int:
        return sum(1 for _ in self)


def first_rows(data: Any, max_rows: int | None) -> FirstRows:
    """``data`` bounded to the first ``max_rows`` rows of every split (``None``: all), each split read once."""
    if isinstance(data, FirstRows) and data.max_rows == max_rows:
        return data
    return FirstRows(data.source if isinstance(data, FirstRows) else data, max_rows)


def _split(data: Any, split: str, required: bool = True) -> list[dict[str, Any]] | None:
    if isinstance(data, FirstRows):
        rows = data.load(split, required=required)
        if rows is None and required:
            load_split(data.source, split)  # raises the source's own error, naming the file
        return rows
    return load_split(data, split, required=required)


def _utility_rows(data: Any, split: str, kind: str) -> list[dict[str, Any]] | None:
    rows = _split(data, f"{split}_perturbed" if kind == "options" else split, required=False)
    if rows is None and kind == "options":
        rows = _split(data, split, required=False)
    return rows


_BLOCKS = {"retain_perturbed": ("retain", "retain"), "real_authors": ("ra", "options"),
           "world_facts": ("wf", "options")}


def plan(data: Any, forget_split: str = "forget10",
         utility_splits: Sequence[str] = UTILITY_SPLITS) -> dict[str, dict[str, int]]:
    """The work of one model's evaluation, per split: ``{split: {"score": answers scored, "generate": questions
    answered greedily}}`` (the forget split's entry includes its _perturbed and holdout splits)."""
    forget = _split(data, forget_split)
    pert = _split(data, f"{forget_split}_perturbed", required=False)
    holdout_split = forget_split.replace("forget", "holdout", 1)
    holdout = _split(data, holdout_split, required=False) if holdout_split != forget_split else None
    # counts only: malformed rows are reported by check_perturbed / wrong_answers when scored
    score = len(forget) + (len(pert) + sum(len(r.get("perturbed_answer") or ()) for r in pert) if pert else 0)
    out = {forget_split: {"score": score + (len(holdout) if holdout else 0), "generate": len(forget)}}
    for split in utility_splits:
        rows = _utility_rows(data, split, _BLOCKS[split][1])
        if rows is None:
            continue
        retain = _BLOCKS[split][1] == "retain"
        wrong = sum(len(r.get("perturbed_answer") or ()) if retain else len(wrong_answers(r)) for r in rows)
        out[split] = {"score": len(rows) * (2 if retain else 1) + wrong, "generate": len(rows)}
    return out


class _Bars:
    """One progress bar per split of one model, or nothing: ``split(name)`` closes the previous bar and returns the
    new one's ``update`` (``None`` when progress is off)."""

    def __init__(self, name: str, work: dict[str, dict[str, int]], enabled: bool):
        self.name, self.work, self.enabled, self.bar = name, work, enabled, None

    def split(self, split: str) -> Callable[[int], None] | None:
        self.close()
        if not self.enabled or split not in self.work:
            return None
        w = self.work[split]
        self.bar = progress_bar(w["score"] + w["generate"], f"eval {self.name} {split}", unit="answers")
        return self.bar.update

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def estimate(model: torch.nn.Module, tokenizer: Any, data: Any, *, forget_split: str = "forget10",
             utility_splits: Sequence[str] = UTILITY_SPLITS, max_new_tokens: int = 200, batch_size: int = 16,
             **kw: Any) -> dict[str, float]:
    """How long one model's evaluation will take here: one batch of forget answers scored and one batch of forget
    questions answered (up to ``max_new_tokens``), timed, times the work of ``plan``. Generation that stops at EOS
    early is faster, so the estimate leans long. ``{"score": n, "generate": n, "seconds": s}``."""
    work = plan(data, forget_split, utility_splits)
    n_score, n_gen = sum(w["score"] for w in work.values()), sum(w["generate"] for w in work.values())
    rows = _split(data, forget_split)[:batch_size]
    q, a = [r["question"] for r in rows], [r["answer"] for r in rows]
    t0 = time.perf_counter()
    score_answers(model, tokenizer, q, a, batch_size=batch_size, **kw)
    t1 = time.perf_counter()
    generate_text(model, tokenizer, q, max_new_tokens=max_new_tokens, batch_size=batch_size)
    t2 = time.perf_counter()
    seconds = n_score / len(rows) * (t1 - t0) + n_gen / len(rows) * (t2 - t1)
    return {"score": n_score, "generate": n_gen, "seconds": seconds}


# ----------------------------------------------------------------------------------------------- the suite


def _nll_lists(model, tok, questions: Sequence[str], answer_lists: Sequence[Sequence[str]], **kw) -> list[np.ndarray]:
    """Mean NLL of each answer in each example's list (lists of different lengths), in one batched pass."""
    flat_q = [q for q, answers in zip(questions, answer_lists) for _ in answers]
    flat_a = [a for answers in answer_lists for a in answers]
    nll = np.array([s["avg_nll"] for s in score_answers(model, tok, flat_q, flat_a, **kw)])
    bounds = np.concatenate([[0], np.cumsum([len(a) for a in answer_lists])]).astype(int)
    return [nll[bounds[i]:bounds[i + 1]] for i in range(len(answer_lists))]


def _eps(protocol: str) -> float:
    """The truth-ratio epsilon of a protocol: open-unlearning's 1e-10, none in ours."""
    return tofu_metrics.OU_EPS if check_protocol(protocol) == "open-unlearning" else 0.0


def forget_statistics(model: torch.nn.Module, tokenizer: Any, data: Any, *, forget_split: str = "forget10",
                      mia_k: float = metrics.MIN_K_DEFAULT, protocol: str = "exact", **kw: Any) -> dict[str, Any]:
    """Everything about the forget set that needs no generation: probabilities, truth ratios, ES, EM and the MIA
    scores/AUCs against the holdout split. Also what a retain model contributes as the reference."""
    eps, kw = _eps(protocol), {**kw, "protocol": protocol}
    forget = _split(data, forget_split)
    res: dict[str, Any] = {"notes": []}
    q, a = [r["question"] for r in forget], [r["answer"] for r in forget]
    sc = score_answers(model, tokenizer, q, a, vocab_stats=True, **kw)
    res["forget_Q_A_Prob"] = float(metrics.probability([s["avg_nll"] for s in sc]).mean())
    res["extraction_strength"] = float(np.mean([metrics.extraction_strength(s["pred"], s["labels"]) for s in sc]))
    res["exact_memorization"] = float(np.mean([metrics.exact_memorization(s["pred"], s["labels"]) for s in sc]))
    pert = _split(data, f"{forget_split}_perturbed", required=False)
    if pert is not None:
        if len(pert) != len(forget):
            raise ValueError(f"{forget_split}_perturbed has {len(pert)} rows but {forget_split} has {len(forget)}")
        check_perturbed(pert, f"{forget_split}_perturbed", paraphrase=True)
        pq = [r["question"] for r in pert]
        para = _nll_lists(model, tokenizer, pq, [[r["paraphrased_answer"]] for r in pert], **kw)
        wrong = _nll_lists(model, tokenizer, pq, [r["perturbed_answer"] for r in pert], **kw)
        trs = [tofu_metrics.truth_ratio(p[0], w, eps) for p, w in zip(para, wrong)]
        res["forget_Q_A_PARA_Prob"] = float(np.mean([metrics.probability(p)[0] for p in para]))
        res["forget_Q_A_PERT_Prob"] = float(np.mean([metrics.probability(w).mean() for w in wrong]))
        res["forget_truth_ratio"] = tofu_metrics.truth_ratio_forget(trs, eps)
        res["forget_truth_ratio_pc"] = tofu_metrics.truth_ratio_pc(trs)
        res["forget_truth_ratios"] = trs
    else:
        res["notes"].append(f"no {forget_split}_perturbed split: truth ratio, forget quality and Mem not computed")
    holdout_split = forget_split.replace("forget", "holdout", 1)
    holdout = _split(data, holdout_split, required=False) if holdout_split != forget_split else None
    if holdout is not None:
        hq, ha = [r["question"] for r in holdout], [r["answer"] for r in holdout]
        hs = score_answers(model, tokenizer, hq, ha, vocab_stats=True, **kw)
        f_text, h_text = attack_texts(tokenizer, q, a, **kw), attack_texts(tokenizer, hq, ha, **kw)
        scores = {name: ([fn(s, t) for s, t in zip(sc, f_text)], [fn(s, t) for s, t in zip(hs, h_text)])
                  for name, fn in _attacks(mia_k).items()}
        res["mia_auc"] = {name: metrics.auc(f, h) for name, (f, h) in scores.items()}
        res["holdout_split"] = holdout_split
    else:
        res["notes"].append(f"no {holdout_split} split: membership inference and privleak not computed")
    return res


def attack_texts(tokenizer: Any, questions: Sequence[str], answers: Sequence[str], *, protocol: str = "exact",
                 max_length: int = 512, **_: Any) -> list[str]:
    """The text of each example that the zlib attack compresses: the answer itself (ours), or under
    ``protocol="open-unlearning"`` its label tokens decoded with special tokens skipped, as open-unlearning's
    ``extract_target_texts_from_processed_data`` does (src/evals/metrics/utils.py; for ChatML models the answer plus
    the newline between its two ``<|im_end|>``: up to 0.5% of the zlib AUC on SmolLM2, issue 25)."""
    if check_protocol(protocol) != "open-unlearning":
        return list(answers)
    out = []
    for q, a in zip(questions, answers):
        labels = encode_qa(tokenizer, q, a, max_length=max_length, protocol=protocol)["labels"]
        out.append(tokenizer.decode([y for y in labels if y != IGNORE_INDEX], skip_special_tokens=True))
    return out


def _attacks(k: float) -> dict[str, Any]:
    return {
        "loss": lambda s, text: s["avg_nll"],
        "zlib": lambda s, text: metrics.mia_zlib_score(s["avg_nll"], text),
        "min_k": lambda s, text: metrics.min_k_score(s["token_logp"], k),
        "min_k_plus_plus": lambda s, text: metrics.min_k_plus_plus_score(s["token_logp"], s["mu"], s["var"], k),
    }


def reference_statistics(retain_model: Any, data: Any, forget_split: str = "forget10", load_kw: dict | None = None,
                         *, progress: bool = False, **kw: Any) -> dict[str, Any] | None:
    """Retain-model reference: ``{"forget_truth_ratios": [...], "mia_auc": {...}}`` from a path (evaluated here,
    with a progress bar when ``progress``), an earlier result dict, or a plain list of per-example forget truth
    ratios."""
    if retain_model is None:
        return None
    if isinstance(retain_model, Mapping):
        per = retain_model.get("per_example", {})
        return {"forget_truth_ratios": retain_model.get("forget_truth_ratios", per.get("forget_truth_ratios")),
                "mia_auc": retain_model.get("mia_auc"), "forget_split": retain_model.get("forget_split")}
    if isinstance(retain_model, (str, os.PathLike)):
        model, tok = load_eval_model(retain_model, **(load_kw or {}))
        bar = progress_bar(plan(data, forget_split, ())[forget_split]["score"], f"eval retain model {forget_split}",
                           unit="answers", enabled=progress)
        try:
            stats = forget_statistics(model, tok, data, forget_split=forget_split, on_batch=bar.update, **kw)
        finally:
            bar.close()
        return {**stats, "forget_split": forget_split}
    if isinstance(retain_model, Sequence):
        return {"forget_truth_ratios": list(retain_model), "mia_auc": None, "forget_split": None}
    raise ValueError(f"retain_model must be a path, a result dict or a list of truth ratios, got "
                     f"{type(retain_model).__name__}")


def _check_reference(ref: dict[str, Any] | None, forget_split: str, n_forget: int) -> None:
    """The retain model's statistics must be of the same forget questions: KS forget quality and PrivLeak compare
    the two models question set against question set."""
    if ref is None:
        return
    if ref.get("forget_split") not in (None, forget_split):
        raise ValueError(f"the retain-model reference was computed on {ref['forget_split']!r}, not {forget_split!r}")
    ratios = ref.get("forget_truth_ratios")
    if ratios is not None and len(ratios) != n_forget:
        raise ValueError(f"the retain-model reference has {len(ratios)} forget truth ratios but {forget_split} has "
                         f"{n_forget} questions")


def _utility_block(model, tok, rows: list[dict[str, Any]], prefix: str, *, kind: str, max_new_tokens: int,
                   batch_size: int, on_batch: Callable[[int], None] | None = None, **kw: Any) -> dict[str, float]:
    check_perturbed(rows, prefix, paraphrase=kind == "retain")
    q = [r["question"] for r in rows]
    protocol = kw.get("protocol", "exact")
    gens = generate_text(model, tok, q, max_new_tokens=max_new_tokens, batch_size=batch_size, on_batch=on_batch,
                         protocol=protocol)
    kw["on_batch"] = on_batch
    out = {f"{prefix}_Q_A_ROUGE": float(np.mean(metrics.rouge_l_recall(gens, [r["answer"] for r in rows])))}
    if kind == "retain":  # TOFU retain_perturbed: paraphrased vs perturbed answers
        correct = _nll_lists(model, tok, q, [[r["answer"]] for r in rows], batch_size=batch_size, **kw)
        para = _nll_lists(model, tok, q, [[r["paraphrased_answer"]] for r in rows], batch_size=batch_size, **kw)
        out[f"{prefix}_Q_A_Prob"] = float(np.mean([metrics.probability(c)[0] for c in correct]))
    else:  # real authors / world facts: the answer itself vs the wrong options
        para = _nll_lists(model, tok, q, [[r["answer"]] for r in rows], batch_size=batch_size, **kw)
    wrong = _nll_lists(model, tok, q, [r["perturbed_answer"] if kind == "retain" else wrong_answers(r) for r in rows],
                       batch_size=batch_size, **kw)
    if kind != "retain":
        out[f"{prefix}_Q_A_Prob_normalised"] = float(np.mean(
            [tofu_metrics.normalised_option_probability(p[0], w) for p, w in zip(para, wrong)]))
    ratios = [tofu_metrics.truth_ratio(p[0], w, _eps(protocol)) for p, w in zip(para, wrong)]
    out[f"{prefix}_Truth_Ratio"] = tofu_metrics.truth_ratio_retain(ratios)
    return out


def evaluate_loaded(model: torch.nn.Module, tokenizer: Any, data: Any, *, forget_split: str = "forget10",
                    retain_model: Any = None, judge: Any = "embedding", max_new_tokens: int = 200,
                    batch_size: int = 16, impl: str = "auto", mia_k: float = metrics.MIN_K_DEFAULT,
                    max_length: int = 512, original_model: Any = None, load_kw: dict | None = None,
                    utility_splits: Sequence[str] = UTILITY_SPLITS, progress: bool = False,
                    name: str = "model", protocol: str = "exact") -> dict[str, Any]:
    """The full suite for an already loaded model; see ``evaluate_model`` for the arguments and the result."""
    bad = sorted(set(utility_splits) - set(UTILITY_SPLITS))
    if bad:
        raise ValueError(f"utility_splits: {bad} is not one of {UTILITY_SPLITS}")
    kw = {"batch_size": batch_size, "impl": impl, "max_length": max_length, "protocol": check_protocol(protocol)}
    judge_obj = make_judge(judge, device=model_device(model))  # fails fast on a bad judge, before any scoring
    data = first_rows(data, data.max_rows if isinstance(data, FirstRows) else None)  # each split read once
    forget = _split(data, forget_split)
    ref = reference_statistics(retain_model, data, forget_split, load_kw, mia_k=mia_k, **kw)
    _check_reference(ref, forget_split, len(forget))  # before this model is scored: a wrong reference fails fast
    bars = _Bars(name, plan(data, forget_split, utility_splits), progress)
    try:
        tick = bars.split(forget_split)
        res = forget_statistics(model, tokenizer, data, forget_split=forget_split, mia_k=mia_k, on_batch=tick, **kw)
        notes: list[str] = res.pop("notes")
        questions, answers = [r["question"] for r in forget], [r["answer"] for r in forget]
        gens = generate_text(model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             on_batch=tick, protocol=protocol)
        rouge = metrics.rouge_l_recall(gens, answers)
        res["forget_Q_A_ROUGE"] = float(np.mean(rouge))
        per = {"forget_generations": gens, "forget_rouge": rouge,
               "forget_truth_ratios": res.pop("forget_truth_ratios", None)}

        for split in utility_splits:
            prefix, kind = _BLOCKS[split]
            rows = _utility_rows(data, split, kind)
            if rows is None:
                notes.append(f"no {split} split: left out of model utility")
                continue
            res.update(_utility_block(model, tokenizer, rows, prefix, kind=kind, max_new_tokens=max_new_tokens,
                                      on_batch=bars.split(split), **kw))
    finally:
        bars.close()
    if not utility_splits:
        notes.append("no utility split asked for: model utility not computed")
    try:
        res["model_utility"], res["utility_splits"] = tofu_metrics.model_utility(res)
    except ValueError as e:
        res["model_utility"], res["utility_splits"] = None, []
        notes.append(str(e))

    if ref is not None and ref.get("forget_truth_ratios") and per["forget_truth_ratios"]:
        res["forget_quality"] = tofu_metrics.forget_quality(per["forget_truth_ratios"], ref["forget_truth_ratios"],
                                                       _eps(protocol))
        res["forget_quality_log"] = float(np.log(max(res["forget_quality"], np.finfo(float).tiny)))
    else:
        res["forget_quality"] = res["forget_quality_log"] = None
        notes.append("forget quality not computed: it needs a retain model" if ref is None or not
                     ref.get("forget_truth_ratios") else f"forget quality not computed: no {forget_split}_perturbed "
                     "split (truth ratios)")
    if "mia_auc" in res:
        ref_auc = (ref or {}).get("mia_auc") or {}
        res["privleak_by_attack"] = {k: metrics.privleak(v, ref_auc.get(k, 0.5)) for k, v in res["mia_auc"].items()}
        res["privleak"] = res["privleak_by_attack"]["min_k"]  # MUSE / OpenUnlearning report min-k% privleak
        res["privleak_reference"] = "retain model" if ref_auc else "AUC 0.5 (no retain model)"
        res.update({f"mia_{k}": v for k, v in res["mia_auc"].items()})

    res["similarity"] = res["fluency"] = None
    if judge_obj is not None:
        j = judge_obj.score(questions, gens, answers)
        per.update({f"judge_{k}": v for k, v in j.pop("per_example").items()})
        res.update(j)
    if original_model is not None:
        omodel, otok = load_eval_model(original_model, **(load_kw or {})) if isinstance(original_model, (str, os.PathLike)) \
            else original_model
        res["fluency_perplexity"] = generation_perplexity(omodel, otok, questions, gens, **kw)

    have_mem = all(res.get(k) is not None for k in ("extraction_strength", "exact_memorization",
                                                      "forget_Q_A_PARA_Prob", "forget_truth_ratio_pc"))
    res["mem"] = tofu_metrics.mem_score(res["extraction_strength"], res["exact_memorization"], res["forget_Q_A_PARA_Prob"],
                             res["forget_truth_ratio_pc"]) if have_mem else None
    res["util"] = tofu_metrics.util_score(res["model_utility"], res["fluency"]) if res["model_utility"] is not None else None
    if res["util"] is not None and res["fluency"] is None:
        notes.append("Util = model utility alone (no judge, so no fluency score)")
    have_agg = res["mem"] is not None and res["util"] is not None
    res["agg"] = tofu_metrics.agg_score(res["mem"], res["util"]) if have_agg else None
    res["forget_split"] = forget_split
    res["protocol"] = protocol
    res["notes"] = notes
    res["per_example"] = per
    return res


def generation_perplexity(model: torch.nn.Module, tokenizer: Any, questions: Sequence[str],
                          generations: Sequence[str], **kw: Any) -> float | None:
    """exp(mean token NLL) of the non-empty generations (given their questions) under ``model``: low = fluent text
    by that model's standards. ``None`` when every generation is empty."""
    pairs = [(q, g) for q, g in zip(questions, generations) if g.strip()]
    if not pairs:
        return None
    sc = score_answers(model, tokenizer, [q for q, _ in pairs], [g for _, g in pairs], **kw)
    total = sum(s["avg_nll"] * s["n_tokens"] for s in sc)
    return float(np.exp(total / sum(s["n_tokens"] for s in sc)))


def evaluate_model(model_dir_or_name: str | os.PathLike[str], data_source: Any = None, *,
                   forget_split: str = "forget10", retain_model: Any = None, judge: Any = "embedding",
                   max_new_tokens: int = 200, batch_size: int = 16, device: str = "auto", dtype: str = "auto",
                   impl: str = "auto", mia_k: float = metrics.MIN_K_DEFAULT, max_length: int = 512,
                   original_model: Any = None, utility_splits: Sequence[str] = UTILITY_SPLITS,
                   progress: bool = False, estimate_models: int = 0,
                   report: Callable[[str], None] | None = None, protocol: str = "exact") -> dict[str, Any]:
    """Evaluate one model; returns a flat dict of every metric and writes nothing.

    ``model_dir_or_name``: a run folder (its ``final/``), a model folder, ``smollm2-135m``, ``tiny`` or a Hub id.
    ``data_source``: folder, Hub id, ``"synthetic"``, a ``{split: rows}`` mapping, or ``None`` for a run's own data.
    ``retain_model``: ``None``, a path (evaluated here), an earlier result of this function, or a list of its
    per-example forget truth ratios; needed for forget quality and the privleak reference. ``judge``: ``"none"``,
    ``"embedding"`` (offline MiniLM similarity + repetition fluency), a chat-model path / Hub id, or a judge object.
    ``original_model``: optional path (or ``(model, tokenizer)``) to report the perplexity of the generations.
    ``utility_splits``: which of ``UTILITY_SPLITS`` model utility uses (those present). ``progress``: a bar per
    split. ``estimate_models``: when > 0, time one batch of each kind once the model is loaded (``estimate``) and
    pass ``report`` (default: print) one line with the expected time for that many models like this one.
    ``protocol``: ``"exact"`` (ours) or ``"open-unlearning"`` (its input construction, mask and epsilon;
    docs/reference/evaluation.md lists every difference with its size); a ``retain_model`` path is scored under the
    same protocol.

    Keys: OpenUnlearning's names (``forget_Q_A_Prob``, ``forget_Q_A_ROUGE``, ``forget_truth_ratio``, ``forget_quality``
    (p) and ``forget_quality_log`` (ln p), ``retain_Q_A_Prob`` ..., ``model_utility``, ``extraction_strength``,
    ``exact_memorization``, ``mia_loss`` / ``mia_zlib`` / ``mia_min_k`` / ``mia_min_k_plus_plus`` (AUCs), ``privleak``),
    plus ``similarity`` and ``fluency`` (judge), ``mem``, ``util``, ``agg``, ``utility_splits``, ``notes`` and
    ``per_example``.
    """
    load_kw = {"device": device, "dtype": dtype}
    data = resolve_data(data_source, model_dir_or_name)
    model, tok = load_eval_model(model_dir_or_name, **load_kw)
    name = Path(model_dir_or_name).name or str(model_dir_or_name)
    if estimate_models > 0:
        est = estimate(model, tok, data, forget_split=forget_split, utility_splits=utility_splits,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, impl=impl, max_length=max_length)
        total = est["seconds"] * estimate_models
        when = f"{total:.0f} s" if total < 120 else f"{total / 60:.1f} min"
        (report or print)(f"about {when} for {estimate_models} model(s) on {model_device(model)}: per model "
                          f"{est['score']} answers scored and {est['generate']} greedy answers of up to "
                          f"{max_new_tokens} tokens (timed on one batch of each; answers that end early are faster)")
    res = evaluate_loaded(model, tok, data, forget_split=forget_split, retain_model=retain_model, judge=judge,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, impl=impl, mia_k=mia_k,
                          max_length=max_length, original_model=original_model, load_kw=load_kw,
                          utility_splits=utility_splits, progress=progress, name=name,
                          protocol=protocol)
    res["model"] = str(model_dir_or_name)
    res["settings"] = {"max_new_tokens": max_new_tokens, "judge": judge if isinstance(judge, str) else
                       type(judge).__name__, "impl": resolve_impl(impl, model_device(model)), "mia_k": mia_k,
                       "data": data_source if isinstance(data_source, (str, type(None))) else "in-memory",
                       "max_rows": data.max_rows if isinstance(data, FirstRows) else None,
                       "utility_splits_asked": list(utility_splits), "protocol": protocol}
    return res
