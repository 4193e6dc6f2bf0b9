"""The evaluation formulas, model-free: every number ``bs-unlearn eval`` reports is computed here from per-example
log-probabilities, token predictions and texts, so each convention lives in one place and is unit-tested by hand.

Sources, per quantity; the formulas of one benchmark alone sit beside its suite (``tofu/metrics.py``: truth ratio,
forget quality, model utility, Mem / Util / Agg), and the model-facing side (``scoring.py``, each suite) only
produces the inputs:

* **Answer probability** (TOFU, Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"; computed as in
  OpenUnlearning, Dorna et al. 2025, ``evaluate_probability``): ``exp(-mean answer-token NLL)``, i.e. the
  length-normalised probability of the answer given the question.
* **ROUGE-L recall** (TOFU; OpenUnlearning ``eval_text_similarity``): ``rouge_score`` ``rougeL`` recall of the greedy
  generation against the ground-truth answer, with the Porter stemmer; **ROUGE-L F1** the same score's F-measure,
  MUSE's VerbMem (greedy continuation of a forget passage) and KnowMem (greedy answers with in-context examples).
* **Extraction strength** (Carlini et al. 2021 / Wang et al. 2024, as in OpenUnlearning): with teacher-forced argmax
  predictions ``p`` of the answer tokens ``y`` (EOS excluded), ``ES = 1 - k/|y|`` for the smallest ``k`` such that
  ``p[k:] == y[k:]``. When not even the last token matches, the definition gives ``k = |y|`` (ES = 0), but
  OpenUnlearning's loop stops at ``k = |y| - 1`` and so reports ``1/|y|``; we follow OpenUnlearning, since the
  paper's numbers come from its code (``extraction_strength`` below).
* **Exact memorisation** (Tirumala et al. 2022, as in OpenUnlearning): fraction of answer tokens (EOS excluded) whose
  teacher-forced argmax equals the label.
* **Membership inference** (MUSE, Shi et al. 2024 "MUSE: Machine Unlearning Six-Way Evaluation"; OpenUnlearning's
  attacks). Every score is oriented like a loss (higher = less likely a member): *loss* = mean answer NLL;
  *zlib* (Carlini et al. 2021, "Extracting Training Data from Large Language Models") = mean NLL / zlib-compressed
  byte length of the answer text; *min-k%* (Shi et al. 2024, "Detecting Pretraining Data from LLMs") = minus the
  mean of the lowest ``max(1, int(k n))`` token log-probs; *min-k%++* (Zhang et al. 2024, "Min-K%++") = the same over
  ``(log p(y_t) - mu_t) / sigma_t`` with ``mu_t = E_{v~p_t}[log p_t(v)]`` and ``sigma_t^2`` its variance over the
  vocabulary (clamped at 1e-6). AUC = P(score(holdout) > score(forget)) + P(tie)/2, i.e. forget = negative class;
  1 means the forget set is fully recognisable. **PrivLeak** (MUSE, with OpenUnlearning's AUC orientation):
  ``((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain) * 100``; 0 = like the retain model, -100 = fully leaking.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

MIN_K_DEFAULT = 0.4  # OpenUnlearning / MUSE default fraction for min-k% and min-k%++
_EPS = 1e-10  # the epsilon OpenUnlearning adds to the privleak denominator


def finite(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite numbers, got {arr.tolist()!r:.200}")
    return arr


# ----------------------------------------------------------------------------------------------- aggregates


def hmean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative numbers; 0 if any of them is 0 (``scipy.stats.hmean``'s limit, made explicit).

    Raises ``ValueError`` for an empty list, negative or non-finite values."""
    arr = finite(values, "hmean")
    if arr.size == 0:
        raise ValueError("hmean: no values")
    if np.any(arr < 0):
        raise ValueError(f"hmean: values must be >= 0, got {arr.tolist()}")
    if np.any(arr == 0):
        return 0.0
    return float(arr.size / np.sum(1.0 / arr))


# ----------------------------------------------------------------------------------------------- probabilities


def probability(avg_nll: Any) -> np.ndarray:
    """Length-normalised answer probability ``exp(-mean answer-token NLL)``, elementwise."""
    return np.exp(-finite(avg_nll, "probability"))


# ----------------------------------------------------------------------------------------------- generations


class _StemmedTokens:
    """``rouge_score``'s default tokenizer with ``use_stemmer=True`` (the same ``tokenize.tokenize`` and Porter
    stemmer, so the same tokens), each word's stem computed once per process: stemming was 70% of scoring TOFU's
    answers (about 3 ms of 4 a pair here), and the in-training evaluation scores the same references every time."""

    def __init__(self):
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()
        self.stem = functools.lru_cache(maxsize=1 << 16)(self._stemmer.stem)

    def tokenize(self, text: str) -> list[str]:
        from rouge_score import tokenize

        return tokenize.tokenize(text, self)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_StemmedTokens())


def _rouge_l(generations: Sequence[str], references: Sequence[str], field: str, who: str) -> list[float]:
    if len(generations) != len(references):
        raise ValueError(f"{who}: {len(generations)} generations but {len(references)} references")
    scorer = _rouge_scorer()
    return [float(getattr(scorer.score(ref, gen)["rougeL"], field)) for gen, ref in zip(generations, references)]


def rouge_l_recall(generations: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each generation against its reference (``rouge_score``, ``use_stemmer=True``): TOFU."""
    return _rouge_l(generations, references, "recall", "rouge_l_recall")


def rouge_l_f1(generations: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each generation against its reference (``rouge_score``, ``use_stemmer=True``): MUSE's VerbMem
    and KnowMem (MUSE, Shi et al. 2024; open-unlearning's ``rouge`` metric with ``rouge_type: rougeL_f1``)."""
    return _rouge_l(generations, references, "fmeasure", "rouge_l_f1")


# ----------------------------------------------------------------------------------------------- memorisation


def _pred_label(pred: Sequence[int], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(pred).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions ({p.size}) and labels ({y.size}) must have the same length")
    if y.size == 0:
        raise ValueError("no answer tokens to score")
    return p, y


def exact_memorization(pred: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of answer tokens whose teacher-forced argmax prediction equals the label."""
    p, y = _pred_label(pred, labels)
    return float(np.mean(p == y))


def extraction_strength(pred: Sequence[int], labels: Sequence[int]) -> float:
    """``1 - k/n`` for the smallest k with ``pred[k:] == labels[k:]`` (Carlini et al. 2021), computed as
    open-unlearning does, which the paper's numbers come from: its search stops at k = n - 1, so an answer whose last
    token is missed too scores 1/n, not 0."""
    p, y = _pred_label(pred, labels)
    n = y.size
    mismatch = np.nonzero(p != y)[0]
    k = 0 if mismatch.size == 0 else int(mismatch[-1]) + 1  # the longest matching suffix starts after the last miss
    return 1.0 - min(k, n - 1) / n


# ----------------------------------------------------------------------------------------------- membership


def zlib_entropy(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (Carlini et al. 2021)."""
    return len(zlib.compress(text.encode("utf-8")))


def mia_zlib_score(avg_nll: float, text: str) -> float:
    """zlib attack score: mean NLL divided by the zlib entropy of the text (higher = less likely a member)."""
    return float(avg_nll) / max(1, zlib_entropy(text))


def _lowest_k_mean(values: np.ndarray, k: float) -> float:
    if not 0 < k <= 1:
        raise ValueError(f"min-k: k must be in (0, 1], got k={k}")
    if values.size == 0:
        raise ValueError("min-k: no tokens")
    num = max(1, int(values.size * k))
    return float(np.mean(np.sort(values)[:num]))


def min_k_score(token_logps: Sequence[float], k: float = MIN_K_DEFAULT) -> float:
    """Min-k% score: minus the mean of the lowest ``max(1, int(k n))`` token log-probs (higher = non-member)."""
    return -_lowest_k_mean(finite(token_logps, "min_k_score"), k)


def min_k_plus_plus_score(token_logps: Sequence[float], mu: Sequence[float], var: Sequence[float],
                          k: float = MIN_K_DEFAULT) -> float:
    """Min-k%++ score: min-k% over ``(log p(y_t) - mu_t) / sqrt(max(var_t, 1e-6))``; ``mu_t``, ``var_t`` are the mean
    and variance of ``log p_t(v)`` under ``v ~ p_t`` (the model's next-token distribution)."""
    lp, m, v = (finite(x, "min_k_plus_plus_score") for x in (token_logps, mu, var))
    if not lp.shape == m.shape == v.shape:
        raise ValueError(f"min_k_plus_plus_score: lengths differ ({lp.size}, {m.size}, {v.size})")
    z = (lp - m) / np.sqrt(np.maximum(v, 1e-6))
    return -_lowest_k_mean(z, k)


def auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """ROC AUC with holdout as the positive class and loss-like scores: P(holdout > forget) + P(tie)/2, from ranks
    (the Mann-Whitney U statistic; equal to ``sklearn.metrics.roc_auc_score``)."""
    from scipy.stats import rankdata

    f, h = finite(forget_scores, "auc"), finite(holdout_scores, "auc")
    if f.size == 0 or h.size == 0:
        raise ValueError(f"auc: both groups must be non-empty, got {f.size} forget and {h.size} holdout scores")
    ranks = rankdata(np.concatenate([f, h]))  # ties get their average rank
    u = ranks[f.size:].sum() - h.size * (h.size + 1) / 2
    return float(u / (f.size * h.size))


def privleak(auc_value: float, retain_auc: float = 0.5) -> float:
    """MUSE PrivLeak in %: ``((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain) * 100`` (0.5 = no retain model)."""
    for name, v in (("auc", auc_value), ("retain_auc", retain_auc)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"privleak: {name} must be in [0, 1], got {v}")
    ref = 1.0 - retain_auc
    return float(((1.0 - auc_value) - ref) / (ref + _EPS) * 100.0)
