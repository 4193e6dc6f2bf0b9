"""TOFU's own formulas, model-free (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"; computed as
open-unlearning does, Dorna et al. 2025), and the BS paper's aggregates over them; the formulas TOFU shares with the
other benchmarks (answer probability, ROUGE-L, ES, EM, the membership attacks, PrivLeak) are ``evaluation/metrics.py``.

* On real authors / world facts TOFU normalises the answer probability over the options:
  ``P(answer) / (P(answer) + sum_w P(wrong option w))``.
* **Truth ratio** (TOFU; OpenUnlearning ``truth_ratio``): per example ``tr = P_pert / P_para``, with ``P_pert`` the
  geometric mean of the length-normalised probabilities of the perturbed answers (``exp(-mean of their mean NLLs)``;
  the list may have any length) and ``P_para`` that of the paraphrased answer (on real authors / world facts the
  answer itself). Aggregated on the forget set as ``mean min(tr, 1/tr)`` ("closer to 1 is better") and on retain,
  real authors and world facts as ``mean max(0, 1 - tr)`` ("true is better").
* **Forget quality** (TOFU): p-value of the two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``, default
  ``method="auto"``) between the per-example forget truth ratios of the unlearned model and of a retain-only model.
  OpenUnlearning feeds ``1/tr`` to the test; the KS statistic and p-value are invariant under that monotone map.
* **Model utility** (TOFU): ``scipy.stats.hmean`` of the nine values (probability, ROUGE-L recall, truth ratio) x
  (retain, real authors, world facts); here any value equal to 0 makes the harmonic mean 0, explicitly.
* **Mem / Util / Agg** (the BS paper, "LLM Unlearning with LLM Beliefs", ICLR 2026, following OpenUnlearning's
  aggregates): ``Mem = HM(1 - ES, 1 - EM, 1 - P_para, 1 - TR)`` on the forget set with ``TR = mean P_c / (P_c + P_w)``
  (``P_c`` = paraphrased-answer probability, ``P_w`` = the perturbed answers' geometric-mean probability, per
  example), ``Util = HM(model utility, fluency)``, ``Agg = HM(Mem, Util)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..metrics import finite, hmean

OU_EPS = 1e-10  # open-unlearning's epsilon in the truth ratio, its aggregates and forget quality (memorization.py,
# utils.py get_forget_quality); the ``eps=`` of the functions below, 0 in the exact protocol
_MAX_LOG_TR = 700.0  # |log tr| beyond this would overflow a float64; reached only by a destroyed model


# ----------------------------------------------------------------------------------------------- probabilities


def normalised_option_probability(correct_nll: float, wrong_nlls: Sequence[float]) -> float:
    """TOFU's probability on real authors / world facts: ``P(c) / (P(c) + sum_w P(w))``, each ``P = exp(-mean NLL)``."""
    wrong = finite(wrong_nlls, "normalised_option_probability")
    # divide through by P(c) for stability: 1 / (1 + sum_w exp(nll_c - nll_w))
    return float(1.0 / (1.0 + np.sum(np.exp(float(correct_nll) - wrong))))


def truth_ratio(para_nll: float, pert_nlls: Sequence[float], eps: float = 0.0) -> float:
    """Per-example truth ratio ``P_pert / P_para`` from mean answer NLLs; ``P_pert`` is the geometric mean of the
    perturbed answers' normalised probabilities, so lists of any length compare on one scale. ``eps > 0``:
    ``P_pert / (P_para + eps)``, as open-unlearning computes it."""
    pert = finite(pert_nlls, "truth_ratio")
    if pert.size == 0:
        raise ValueError("truth_ratio: the perturbed-answer list is empty")
    if eps > 0:
        return float(math.exp(-float(pert.mean())) / (math.exp(-float(para_nll)) + eps))
    log_tr = float(para_nll) - float(pert.mean())
    return float(math.exp(min(max(log_tr, -_MAX_LOG_TR), _MAX_LOG_TR)))  # clipped so the ratio stays finite


def truth_ratio_forget(ratios: Sequence[float], eps: float = 0.0) -> float:
    """Forget-set aggregate ``mean min(tr, 1/(tr + eps))``: 1 when true and false answers are equally likely."""
    tr = finite(ratios, "truth_ratio_forget")
    if tr.size == 0 or np.any(tr < 0) or (eps == 0 and np.any(tr == 0)):
        raise ValueError(f"truth_ratio_forget: need positive ratios, got {tr.tolist()!r:.200}")
    return float(np.mean(np.minimum(tr, 1.0 / (tr + eps))))


def truth_ratio_retain(ratios: Sequence[float]) -> float:
    """Retain / real-author / world-fact aggregate ``mean max(0, 1 - tr)``: higher when the true answer wins."""
    tr = finite(ratios, "truth_ratio_retain")
    if tr.size == 0:
        raise ValueError("truth_ratio_retain: no ratios")
    return float(np.mean(np.maximum(0.0, 1.0 - tr)))


def truth_ratio_pc(ratios: Sequence[float]) -> float:
    """The BS paper's forget-set TR: ``mean P_c / (P_c + P_w)`` = ``mean 1 / (1 + tr)`` per example (from
    ``eps=0`` ratios; open-unlearning's ``prob_mean`` adds 1e-10 to a sum of probabilities of order 1)."""
    tr = finite(ratios, "truth_ratio_pc")
    if tr.size == 0:
        raise ValueError("truth_ratio_pc: no ratios")
    return float(np.mean(1.0 / (1.0 + tr)))


def forget_quality(unlearned_ratios: Sequence[float], retain_ratios: Sequence[float], eps: float = 0.0) -> float:
    """TOFU forget quality: ``scipy.stats.ks_2samp`` p-value of the two per-example forget truth-ratio samples
    (``eps > 0``: of ``1 / (tr + eps)``, open-unlearning's get_forget_quality; the same p-value unless eps makes ties).
    The p-value itself; the BS authors' fork reports its natural log (src/evals/metrics/privacy.py ``np.log``)."""
    from scipy.stats import ks_2samp

    a, b = finite(unlearned_ratios, "forget_quality"), finite(retain_ratios, "forget_quality")
    if a.size == 0 or b.size == 0:
        raise ValueError(f"forget_quality: both samples must be non-empty, got sizes {a.size} and {b.size}")
    if eps > 0:
        a, b = 1.0 / (a + eps), 1.0 / (b + eps)
    return float(ks_2samp(a, b).pvalue)


# ----------------------------------------------------------------------------------------------- model utility


UTILITY_KEYS = {
    "retain": ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio"),
    "real_authors": ("ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio"),
    "world_facts": ("wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio"),
}


def model_utility(values: Mapping[str, float | None]) -> tuple[float, list[str]]:
    """TOFU model utility: harmonic mean of the available ``UTILITY_KEYS`` triples; returns ``(value, splits used)``.

    A split counts when all three of its values are present (not None); raises ``ValueError`` if none is."""
    used = [split for split, keys in UTILITY_KEYS.items() if all(values.get(k) is not None for k in keys)]
    if not used:
        raise ValueError(f"model_utility: none of the splits {list(UTILITY_KEYS)} has all three values")
    return hmean([float(values[k]) for s in used for k in UTILITY_KEYS[s]]), used


# ----------------------------------------------------------------------------------------------- aggregates


def mem_score(extraction_strength: float, exact_memorization: float, para_prob: float, truth_ratio_pc: float) -> float:
    """The BS paper's memorisation score: ``HM(1 - ES, 1 - EM, 1 - P_para, 1 - TR)`` (higher = less memorised)."""
    return hmean([1 - extraction_strength, 1 - exact_memorization, 1 - para_prob, 1 - truth_ratio_pc])


def util_score(model_utility: float, fluency: float | None) -> float:
    """``Util = HM(model utility, fluency)``; without a fluency score, the model utility alone."""
    return model_utility if fluency is None else hmean([model_utility, fluency])


def agg_score(mem: float, util: float) -> float:
    """``Agg = HM(Mem, Util)``."""
    return hmean([mem, util])
