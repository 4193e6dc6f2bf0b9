"""The light evaluation a run makes of itself while it trains (``train.eval_every``), on every rank, model sharded.

Unlearning is sensitive to when it stops, so a run can measure itself every N steps or epochs on a held slice and
keep its best state (``bs_train/selection.py``). This evaluation is the suite's, made light: the same metric names,
formulas (``evaluation/metrics.py``) and inputs (``encode_qa`` / ``encode_prompt``, exact protocol) as
``evaluation/tofu/suite.py``, on the first ``train.eval_rows`` rows of each split, with short greedy answers
(``train.eval_max_new_tokens``); rows are split across ranks and the per-row results gathered
(``evaluation/sharded.py``), so 2 ranks give 1 process's values.

* **TOFU** (``TOFU_METRICS``): on the forget side (``train.eval_split``, default the run's forget split, and its
  ``_perturbed`` rows) the answer probability ``forget_Q_A_Prob``, the greedy answers' ``forget_Q_A_ROUGE``,
  ``extraction_strength``, ``exact_memorization``, the paraphrase probability and truth ratios, ``forget_nll``; on the
  utility splits present (``train.eval_utility_splits``) their probability, ROUGE and truth-ratio triple and TOFU's
  ``model_utility``; and the BS paper's ``mem``, ``util`` and ``agg``. ``util`` here is model utility alone: fluency
  needs the offline judge (an 84 MB model), which a training run does not load (as the recipe's ``--judge later``
  selects). Forget quality and PrivLeak need a retain model's statistics and are not measured during training.
* **MUSE and WMDP** (raw text; ``TEXT_METRICS``): the mean per-token NLL of the first forget windows and of the first
  retain windows (``forget_nll``, ``retain_nll``), the cheap signal of both: MUSE's probes (VerbMem, KnowMem,
  PrivLeak) and WMDP's multiple-choice accuracy through lm-evaluation-harness are not measured during training
  (``bs-unlearn eval --benchmark muse|wmdp`` on the export).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import check_perturbed, encode_prompt, encode_qa, load_split, load_texts, wrong_answers
from . import metrics
from .tofu import metrics as tofu_metrics
from .sharded import GreedyGenerator, check_generation, score_rows

# Every metric the evaluation can report, with the direction that means "better" for unlearning (the default of a
# ``train.select_by`` that names no direction).
TOFU_METRICS = {
    "agg": "max", "mem": "max", "util": "max", "model_utility": "max",
    "forget_Q_A_Prob": "min", "forget_Q_A_ROUGE": "min", "forget_Q_A_PARA_Prob": "min", "forget_nll": "max",
    "extraction_strength": "min", "exact_memorization": "min", "forget_truth_ratio": "max",
    "forget_truth_ratio_pc": "min",
    **{k: "max" for keys in tofu_metrics.UTILITY_KEYS.values() for k in keys},
}
TEXT_METRICS = {"forget_nll": "max", "retain_nll": "min"}
UTILITY_BLOCKS = {"retain_perturbed": ("retain", "retain"), "real_authors": ("ra", "options"),
                  "world_facts": ("wf", "options")}  # split -> (metric prefix, kind), as the suite's _BLOCKS


def metric_directions(benchmark: str) -> dict[str, str]:
    """The metrics an in-training evaluation of ``benchmark`` can report, each with its better direction."""
    return TEXT_METRICS if benchmark in ("muse", "wmdp") else TOFU_METRICS


def _first(rows: list[Any] | None, n: int) -> list[Any] | None:
    return None if rows is None else rows[:n]


class InTrainingEval:
    """The items, prompts and references of one run's evaluation, built once before training (bad or missing data
    fails then, before the model loads); ``__call__(head, lm)`` measures the current model on every rank."""

    def __init__(self, tokenizer: Any, *, benchmark: str, rows: int, max_new_tokens: int, batch_size: int,
                 impl: str, max_length: int = 512):
        self.tokenizer, self.benchmark, self.rows = tokenizer, benchmark, rows
        self.max_new_tokens, self.batch_size, self.impl, self.max_length = max_new_tokens, batch_size, impl, max_length
        self.items: list[dict[str, list[int]]] = []  # everything scored, in blocks
        self.stats: list[bool] = []  # which items need ES / EM
        self.spans: dict[str, tuple[int, int]] = {}
        self.counts: dict[str, list[int]] = {}  # answers per row of a block of answer lists
        self.prompts: list[list[int]] = []  # everything answered greedily, in blocks
        self.prompt_spans: dict[str, tuple[int, int]] = {}
        self.references: dict[str, list[str]] = {}
        self.utility: list[tuple[str, str]] = []  # (prefix, kind) of the utility blocks present
        self.notes: list[str] = []
        self.generator: GreedyGenerator | None = None
        self.sampler_ok = True
        self.seconds = 0.0  # wall time of every call so far

    # ---------------------------------------------------------------------------------------------- building

    def _score(self, key: str, items: list[dict[str, list[int]]], stats: bool = False) -> None:
        self.spans[key] = (len(self.items), len(self.items) + len(items))
        self.items += items
        self.stats += [stats] * len(items)

    def _answers(self, key: str, questions: list[str], answer_lists: list[list[str]]) -> None:
        self.counts[key] = [len(a) for a in answer_lists]
        self._score(key, [self._qa(q, a) for q, answers in zip(questions, answer_lists) for a in answers])

    def _qa(self, question: str, answer: str) -> dict[str, list[int]]:
        return encode_qa(self.tokenizer, question, answer, max_length=self.max_length)

    def _generate(self, key: str, questions: list[str], answers: list[str]) -> None:
        if self.max_new_tokens < 1:
            return
        self.prompt_spans[key] = (len(self.prompts), len(self.prompts) + len(questions))
        self.prompts += [encode_prompt(self.tokenizer, q) for q in questions]
        self.references[key] = answers

    @classmethod
    def for_tofu(cls, tokenizer: Any, source: Any, forget_split: str, utility_splits: tuple[str, ...],
                 **kw: Any) -> InTrainingEval:
        """The TOFU evaluation of the first ``rows`` rows of ``forget_split`` (+ ``_perturbed``) and of each utility
        split present in ``source`` (a folder, Hub id or mapping of splits)."""
        self = cls(tokenizer, benchmark="tofu", **kw)
        n = self.rows
        forget = _first(load_split(source, forget_split), n)
        q = [r["question"] for r in forget]
        self._score("forget", [self._qa(r["question"], r["answer"]) for r in forget], stats=True)
        self._generate("forget", q, [r["answer"] for r in forget])
        pert = _first(load_split(source, f"{forget_split}_perturbed", required=False), n)
        if pert is not None:
            if len(pert) != len(forget):
                raise ValueError(f"{forget_split}_perturbed has {len(pert)} rows but {forget_split} has "
                                 f"{len(forget)} (first {n}): train.eval_split needs matching rows")
            check_perturbed(pert, f"{forget_split}_perturbed", paraphrase=True)
            pq = [r["question"] for r in pert]
            self._answers("forget_para", pq, [[r["paraphrased_answer"]] for r in pert])
            self._answers("forget_pert", pq, [r["perturbed_answer"] for r in pert])
        else:
            self.notes.append(f"no {forget_split}_perturbed split: truth ratios and mem not measured")
        for split in utility_splits:
            prefix, kind = UTILITY_BLOCKS[split]
            rows = load_split(source, f"{split}_perturbed" if kind == "options" else split, required=False)
            if rows is None and kind == "options":
                rows = load_split(source, split, required=False)
            if rows is None:
                self.notes.append(f"no {split} split: left out of model utility")
                continue
            rows = rows[:n]
            check_perturbed(rows, split, paraphrase=kind == "retain")
            uq = [r["question"] for r in rows]
            self._answers(f"{prefix}_answer", uq, [[r["answer"]] for r in rows])
            if kind == "retain":
                self._answers(f"{prefix}_para", uq, [[r["paraphrased_answer"]] for r in rows])
                self._answers(f"{prefix}_wrong", uq, [r["perturbed_answer"] for r in rows])
            else:
                self._answers(f"{prefix}_wrong", uq, [wrong_answers(r) for r in rows])
            self._generate(prefix, uq, [r["answer"] for r in rows])
            self.utility.append((prefix, kind))
        if self.max_new_tokens < 1:
            self.notes.append("train.eval_max_new_tokens=0: no greedy answers, so no ROUGE, model utility, util or agg")
        return self

    @classmethod
    def for_text(cls, tokenizer: Any, forget: Any, retain: Any | None, **kw: Any) -> InTrainingEval:
        """The raw-text evaluation (MUSE, WMDP): the first ``rows`` windows of the forget and retain datasets."""
        self = cls(tokenizer, benchmark="text", **kw)
        self.max_new_tokens = 0  # no generation: its probes are the suites' own (module docstring)
        for key, ds in (("forget", forget), ("retain", retain)):
            if ds is not None:
                self._score(key, [{"input_ids": ds[i]["input_ids"], "labels": ds[i]["labels"]}
                                  for i in range(min(self.rows, len(ds)))])
        return self

    def names(self) -> list[str]:
        """The metrics this evaluation will report (what ``train.select_by`` and ``train.stop_if`` may name)."""
        if self.benchmark == "text":
            return [k for k in ("forget_nll", "retain_nll") if k.split("_")[0] in self.spans]
        gen = self.max_new_tokens > 0
        out = ["forget_Q_A_Prob", "extraction_strength", "exact_memorization", "forget_nll"]
        out += ["forget_Q_A_ROUGE"] if gen else []
        if "forget_para" in self.spans:
            out += ["forget_Q_A_PARA_Prob", "forget_truth_ratio", "forget_truth_ratio_pc", "mem"]
        for prefix, kind in self.utility:
            keys = tofu_metrics.UTILITY_KEYS["retain" if kind == "retain" else
                                        "real_authors" if prefix == "ra" else "world_facts"]
            out += [k for k in keys if gen or "ROUGE" not in k]
        if gen and self.utility:
            out += ["model_utility", "util"] + (["agg"] if "mem" in out else [])
        return out

    # ---------------------------------------------------------------------------------------------- measuring

    def __call__(self, head: torch.nn.Module, lm: torch.nn.Module, *, rank: int = 0, world: int = 1) -> dict[str, float]:
        """Measure the model now: every rank takes part and returns the same values. ``head`` is the run's
        ``LossHead`` (the FSDP2 root under torchrun), ``lm`` the causal LM inside it."""
        t0 = time.perf_counter()
        scored = score_rows(head, self.items, pad_id=self.tokenizer.pad_token_id, eos_id=self.tokenizer.eos_token_id,
                            batch_size=self.batch_size, impl=self.impl, rank=rank, world=world,
                            token_stats=self.stats)
        texts: list[str] = []
        if self.prompts:
            if self.generator is None:
                self.sampler_ok = check_generation(lm, world)
                self.generator = GreedyGenerator(self.tokenizer, max_new_tokens=self.max_new_tokens,
                                                 batch_size=self.batch_size, prompt_width=max(map(len, self.prompts)))
            texts = self.generator(head, lm, self.prompts, rank=rank, world=world, sampler_ok=self.sampler_ok)
        out = self.compute(scored, texts)
        self.seconds += time.perf_counter() - t0
        return out

    def _nll(self, scored: list[dict[str, float]], key: str) -> np.ndarray:
        lo, hi = self.spans[key]
        return np.array([s["avg_nll"] for s in scored[lo:hi]])

    def _lists(self, scored: list[dict[str, float]], key: str) -> list[np.ndarray]:
        nll = self._nll(scored, key)
        bounds = np.concatenate([[0], np.cumsum(self.counts[key])]).astype(int)
        return [nll[bounds[i]:bounds[i + 1]] for i in range(len(self.counts[key]))]

    def _rouge(self, texts: list[str], key: str) -> float:
        lo, hi = self.prompt_spans[key]
        return float(np.mean(metrics.rouge_l_recall(texts[lo:hi], self.references[key])))

    def compute(self, scored: list[dict[str, float]], texts: list[str]) -> dict[str, float]:
        """The metrics from the per-item results (``score_rows``) and greedy answers, with the suite's formulas."""
        if self.benchmark == "text":
            return {f"{k}_nll": float(self._nll(scored, k).mean()) for k in ("forget", "retain") if k in self.spans}
        lo, hi = self.spans["forget"]
        nll = self._nll(scored, "forget")
        res = {"forget_Q_A_Prob": float(metrics.probability(nll).mean()), "forget_nll": float(nll.mean()),
               "extraction_strength": float(np.mean([s["es"] for s in scored[lo:hi]])),
               "exact_memorization": float(np.mean([s["em"] for s in scored[lo:hi]]))}
        if texts:
            res["forget_Q_A_ROUGE"] = self._rouge(texts, "forget")
        if "forget_para" in self.spans:
            para, wrong = self._lists(scored, "forget_para"), self._lists(scored, "forget_pert")
            trs = [tofu_metrics.truth_ratio(p[0], w) for p, w in zip(para, wrong)]
            res["forget_Q_A_PARA_Prob"] = float(np.mean([metrics.probability(p)[0] for p in para]))
            res["forget_truth_ratio"] = tofu_metrics.truth_ratio_forget(trs)
            res["forget_truth_ratio_pc"] = tofu_metrics.truth_ratio_pc(trs)
            res["mem"] = tofu_metrics.mem_score(res["extraction_strength"], res["exact_memorization"],
                                           res["forget_Q_A_PARA_Prob"], res["forget_truth_ratio_pc"])
        for prefix, kind in self.utility:
            answer, wrong = self._lists(scored, f"{prefix}_answer"), self._lists(scored, f"{prefix}_wrong")
            if kind == "retain":
                para = self._lists(scored, f"{prefix}_para")
                res[f"{prefix}_Q_A_Prob"] = float(np.mean([metrics.probability(a)[0] for a in answer]))
            else:
                para = answer
                res[f"{prefix}_Q_A_Prob_normalised"] = float(np.mean(
                    [tofu_metrics.normalised_option_probability(a[0], w) for a, w in zip(answer, wrong)]))
            res[f"{prefix}_Truth_Ratio"] = tofu_metrics.truth_ratio_retain(
                [tofu_metrics.truth_ratio(p[0], w) for p, w in zip(para, wrong)])
            if texts:
                res[f"{prefix}_Q_A_ROUGE"] = self._rouge(texts, prefix)
        if texts and self.utility:
            res["model_utility"], _ = tofu_metrics.model_utility(res)
            res["util"] = tofu_metrics.util_score(res["model_utility"], None)
            if "mem" in res:
                res["agg"] = tofu_metrics.agg_score(res["mem"], res["util"])
        return res


def build(cfg: Any, tokenizer: Any, run_dir: Path, main_set: Any, retain_set: Any, impl: str) -> InTrainingEval:
    """The in-training evaluation of a run (``cfg`` a ``RunConfig`` with ``train.eval_every`` set), its data read
    now: TOFU rows from the run's data source (the generated set in the run folder for ``synthetic``), raw-text
    windows from the run's own datasets (built here when the run does not train on them)."""
    t = cfg.train
    kw = {"rows": t.eval_rows, "max_new_tokens": t.eval_max_new_tokens, "batch_size": t.eval_batch_size,
          "impl": impl}
    source = str(run_dir / "data") if cfg.data.source == "synthetic" else cfg.data.source
    if cfg.data.text:
        from ..data import TextDataset

        def windows(src: str, split: str):
            return TextDataset(load_texts(src, split), tokenizer, window=cfg.data.window_tokens, name=split,
                               prefix_tokens=cfg.method.bss_prefix_tokens)

        split = t.eval_split or cfg.data.forget_split
        forget = main_set if cfg.command == "unlearn" and split == cfg.data.forget_split else windows(source, split)
        retain = retain_set if retain_set is not None else windows(cfg.data.retain_source or source,
                                                                    cfg.data.retain_split)
        return InTrainingEval.for_text(tokenizer, forget, retain, **kw)
    return InTrainingEval.for_tofu(tokenizer, source, t.eval_split or cfg.data.forget_split,
                                   tuple(s for s in t.eval_utility_splits.split(",") if s), **kw)
