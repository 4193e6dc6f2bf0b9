"""TOFU (Maini et al. 2024): the evaluation suite of its question/answer splits (``suite.py``): answer probability,
ROUGE-L, truth ratio, forget quality, model utility, extraction strength, exact memorisation, membership inference
and PrivLeak, and the BS paper's Mem. / Util. / Agg.
"""

from .suite import (UTILITY_SPLITS, FirstRows, estimate, evaluate_loaded, evaluate_model, first_rows,
                    forget_statistics, generation_perplexity, plan, reference_statistics)

__all__ = ["UTILITY_SPLITS", "FirstRows", "estimate", "evaluate_loaded", "evaluate_model", "first_rows",
           "forget_statistics", "generation_perplexity", "plan", "reference_statistics"]
