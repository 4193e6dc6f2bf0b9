"""The evaluation formulas against values computed by hand (bs_train/evaluation/metrics.py and tofu/metrics.py,
and the judge's text helpers).

Each test states the hand computation in a comment, so a reader can check the convention, not only the code.
"""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import pytest

from bs_train.evaluation import metrics as M
from bs_train.evaluation.tofu import metrics as T
from bs_train.evaluation.judge import fluency_score, parse_score, repetition_rate


def test_hmean_plain_and_with_a_zero():
    assert M.hmean([1.0, 0.5]) == pytest.approx(2 / (1 + 2))  # 2 / (1/1 + 1/0.5)
    assert M.hmean([0.2, 0.2, 0.2]) == pytest.approx(0.2)
    assert M.hmean([0.0, 0.5, 1.0]) == 0.0  # any zero: the harmonic mean is 0, no warning, no NaN
    for bad in ([], [-0.1, 0.5], [float("nan"), 0.5]):
        with pytest.raises(ValueError, match="hmean"):
            M.hmean(bad)


def _ks_pvalue_by_enumeration(a: list[float], b: list[float]) -> float:
    """Exact two-sided KS p-value: the share of all ways to split the pooled sample into groups of len(a) and
    len(b) whose statistic is at least the observed one (no ties in the pooled sample)."""

    def stat(x, y):
        grid = sorted(x + y)
        return max(abs(sum(v <= t for v in x) / len(x) - sum(v <= t for v in y) / len(y)) for t in grid)

    pooled, observed = a + b, stat(a, b)
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    hits = 0
    for idx in splits:
        x = [pooled[i] for i in idx]
        y = [pooled[i] for i in range(len(pooled)) if i not in idx]
        hits += stat(x, y) >= observed - 1e-12
    return hits / len(splits)


def test_forget_quality_is_the_ks_pvalue():
    # Fully separated samples of 3 and 3: D = 1, reached by 2 of the C(6, 3) = 20 splits -> p = 0.1.
    assert T.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(2 / 20)
    a, b = [0.1, 0.2, 0.3, 0.4], [0.25, 0.5, 0.6, 0.7]  # D = 3/4; 16 of the 70 splits reach it
    assert _ks_pvalue_by_enumeration(a, b) == pytest.approx(16 / 70)
    assert T.forget_quality(a, b) == pytest.approx(16 / 70)
    # OpenUnlearning feeds 1/tr to the test: a monotone map, so the p-value is the same.
    assert T.forget_quality(1 / np.array(a), 1 / np.array(b)) == pytest.approx(16 / 70)
    assert T.forget_quality(a, a) == 1.0  # a model against itself: the KS maximum
    with pytest.raises(ValueError, match="non-empty"):
        T.forget_quality([], a)


def test_truth_ratio_with_perturbed_lists_of_different_lengths():
    # Example 1: paraphrase NLL 1.0, two perturbed answers with NLL 2 and 3: P_pert = sqrt(e^-2 e^-3) = e^-2.5,
    # P_para = e^-1, tr = e^-1.5. Example 2: paraphrase NLL 2.0, four perturbed with mean NLL 1.0: tr = e^1.
    tr1 = T.truth_ratio(1.0, [2.0, 3.0])
    tr2 = T.truth_ratio(2.0, [1.0, 1.0, 0.0, 2.0])
    assert tr1 == pytest.approx(math.exp(-1.5))
    assert tr1 == pytest.approx(math.sqrt(math.exp(-2) * math.exp(-3)) / math.exp(-1))
    assert tr2 == pytest.approx(math.e)
    trs = [tr1, tr2]
    assert T.truth_ratio_forget(trs) == pytest.approx((math.exp(-1.5) + math.exp(-1)) / 2)  # mean min(tr, 1/tr)
    assert T.truth_ratio_retain(trs) == pytest.approx((1 - math.exp(-1.5) + 0.0) / 2)  # mean max(0, 1 - tr)
    assert T.truth_ratio_pc(trs) == pytest.approx((1 / (1 + math.exp(-1.5)) + 1 / (1 + math.e)) / 2)
    with pytest.raises(ValueError, match="empty"):
        T.truth_ratio(1.0, [])


def test_probabilities():
    assert M.probability([0.0, math.log(2)]).tolist() == pytest.approx([1.0, 0.5])  # exp(-mean NLL)
    # Options: P(correct) = 0.5, two wrong options of 0.25 each -> 0.5 / (0.5 + 0.5) = 0.5.
    assert T.normalised_option_probability(math.log(2), [math.log(4), math.log(4)]) == pytest.approx(0.5)


def test_rouge_l_recall_by_hand():
    # Reference "the cat sat on the mat" (6 tokens), generation "the cat on mat": LCS = the cat on mat = 4 -> 4/6.
    # With stemming: "running"/"runs" -> "run" and "quickly" -> "quickli" vs "quick"; "was" (3 letters) is not
    # stemmed. LCS of [she, was, run, quickli] and [she, run, quick] is 2 -> recall 2/4.
    got = M.rouge_l_recall(["the cat on mat", "she runs quick", ""], ["the cat sat on the mat",
                                                                       "She was running quickly", "anything"])
    assert got == pytest.approx([4 / 6, 2 / 4, 0.0])
    with pytest.raises(ValueError, match="references"):
        M.rouge_l_recall(["a"], [])


def test_min_k_and_min_k_plus_plus_by_hand():
    lp = [-1.0, -5.0, -2.0, -4.0, -3.0]
    assert M.min_k_score(lp, 0.4) == pytest.approx(4.5)  # int(5 * 0.4) = 2 lowest: -5, -4 -> -(-4.5)
    assert M.min_k_score(lp, 0.1) == pytest.approx(5.0)  # max(1, int(0.5)) = 1 lowest
    # min-k%++: z = (log p - mu) / sigma = ((-1 + 2) / 2, (-3 + 2) / 1) = (0.5, -1).
    assert M.min_k_plus_plus_score([-1.0, -3.0], [-2.0, -2.0], [4.0, 1.0], 0.5) == pytest.approx(1.0)
    assert M.min_k_plus_plus_score([-1.0, -3.0], [-2.0, -2.0], [4.0, 1.0], 1.0) == pytest.approx(0.25)
    assert M.min_k_plus_plus_score([-1.0], [-2.0], [0.0], 1.0) == pytest.approx(-1.0 / 1e-3)  # var clamped at 1e-6
    with pytest.raises(ValueError, match="k must be"):
        M.min_k_score(lp, 0.0)


def test_zlib_score_auc_and_privleak():
    text = "Lisbon, Portugal"
    assert M.mia_zlib_score(2.0, text) == pytest.approx(2.0 / len(zlib.compress(text.encode())))
    # Forget scores (1, 2) vs holdout (3, 2): holdout higher in 3 of 4 pairs and one tie -> (3 + 0.5) / 4.
    assert M.auc([1.0, 2.0], [3.0, 2.0]) == pytest.approx(0.875)
    assert M.auc([1.0, 1.0], [1.0, 1.0]) == pytest.approx(0.5)
    assert M.privleak(1.0, 0.5) == pytest.approx(-100.0)  # fully recognisable forget set vs a chance-level retain
    assert M.privleak(0.5, 0.5) == pytest.approx(0.0)
    assert M.privleak(0.25, 0.5) == pytest.approx(50.0)  # ((1 - .25) - .5) / .5 * 100
    with pytest.raises(ValueError, match="auc"):
        M.privleak(1.5)


def test_auc_matches_sklearn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    f, h = rng.integers(0, 5, 30).astype(float), rng.integers(1, 7, 20).astype(float)  # many ties
    want = metrics.roc_auc_score([0] * len(f) + [1] * len(h), np.concatenate([f, h]))
    assert M.auc(f, h) == pytest.approx(want)


def test_extraction_strength_and_exact_memorization():
    # Mismatch at index 1 only: the longest matching suffix starts at k = 2 -> ES = 1 - 2/4; EM = 3/4.
    assert M.extraction_strength([1, 2, 3, 4], [1, 9, 3, 4]) == pytest.approx(0.5)
    assert M.exact_memorization([1, 2, 3, 4], [1, 9, 3, 4]) == pytest.approx(0.75)
    assert M.extraction_strength([5, 6], [5, 6]) == 1.0
    assert M.extraction_strength([5, 6], [5, 7]) == 0.5  # not even the last token: open-unlearning's k = n - 1
    assert M.extraction_strength([1, 2, 3, 4], [1, 9, 3, 8]) == pytest.approx(0.25)
    assert M.extraction_strength([7], [8]) == 1.0  # one token: k = n - 1 = 0, as open-unlearning's loop gives
    with pytest.raises(ValueError, match="same length"):
        M.exact_memorization([1], [1, 2])


def test_mem_util_agg_and_model_utility():
    assert T.mem_score(0.5, 0.5, 0.5, 0.5) == pytest.approx(0.5)  # HM of four 0.5
    assert T.mem_score(1.0, 0.2, 0.1, 0.3) == 0.0  # ES = 1 -> 1 - ES = 0 -> Mem = 0
    assert T.util_score(0.4, 0.6) == pytest.approx(2 / (1 / 0.4 + 1 / 0.6))  # 0.48
    assert T.util_score(0.4, None) == 0.4
    assert T.agg_score(0.5, 0.48) == pytest.approx(2 / (1 / 0.5 + 1 / 0.48))
    values = {"retain_Q_A_Prob": 0.5, "retain_Q_A_ROUGE": 0.25, "retain_Truth_Ratio": 0.5}
    mu, splits = T.model_utility(values)
    assert splits == ["retain"] and mu == pytest.approx(3 / (2 + 4 + 2))
    full = {k: 0.5 for keys in T.UTILITY_KEYS.values() for k in keys}
    assert T.model_utility(full) == (pytest.approx(0.5), ["retain", "real_authors", "world_facts"])
    assert T.model_utility({**full, "wf_Q_A_ROUGE": 0.0})[0] == 0.0
    with pytest.raises(ValueError, match="none of the splits"):
        T.model_utility({})


def test_judge_text_helpers():
    for reply, want in [("4", 4), ("Score: 3/5", 3), ("I would rate it 2 out of 5.", 2), ("Rating (0-5): 5", 5),
                        ("4.6", 5), ("10", None), ("no idea", None), ("0", 0)]:
        assert parse_score(reply) == want, reply
    # "the cat the cat the cat": bigrams (the cat)(cat the)(the cat)(cat the)(the cat): 2 unique of 5 -> 3/5.
    assert repetition_rate("the cat the cat the cat") == pytest.approx(3 / 5)
    assert repetition_rate("one") == 0.0
    assert fluency_score("She writes in Portuguese.") == 1.0
    assert fluency_score("   ") == 0.0
