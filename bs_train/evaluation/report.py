"""Report formatting: the markdown results table shared by ``bs-unlearn eval`` / ``compare``, the demo and the recipe.

One row per model (its ``name`` first), one column per headline number: TOFU's (forget quality, model utility,
forget probability / ROUGE-L / truth ratio), the memorisation and privacy numbers (ES, EM, PrivLeak), the judge's
(similarity, fluency) and the BS paper's aggregates (Mem., Util., Agg.). Only the columns some row has are printed;
a missing number reads ``n/a``. It sits below the CLI, the demo and the recipe, so none of them imports another for
its table.
"""

from __future__ import annotations

from typing import Any

# (result key, column title) of the markdown tables: the TOFU headline numbers, then the BS paper's aggregates.
# Each title says which way is better: ↑ higher, ↓ lower, →0 closest to zero. Forget-set probability, ROUGE-L, ES
# and EM are ↓ (less of the forget set left; the retain model's row shows the level a model that never saw it
# reaches); forget TR is min(tr, 1/tr), 1 when true and false answers are alike (↑); PrivLeak 0 = like the retain
# model (MUSE); Sim. (diff) is higher the more an answer differs from the forgotten one (bs_train/evaluation/judge.py).
COLUMNS = [
    ("forget_quality", "Forget quality ↑"), ("model_utility", "Model utility ↑"), ("forget_Q_A_Prob", "F. Prob ↓"),
    ("forget_Q_A_ROUGE", "F. ROUGE-L ↓"), ("forget_truth_ratio", "F. TR ↑"), ("extraction_strength", "ES ↓"),
    ("exact_memorization", "EM ↓"), ("privleak", "PrivLeak →0"), ("similarity", "Sim. (diff) ↑"),
    ("fluency", "Fluency ↑"), ("mem", "Mem. ↑"), ("util", "Util. ↑"), ("agg", "Agg. ↑"),
]
# MUSE's four criteria (bs_train/evaluation/muse/suite.py): VerbMem and KnowMem on the forget set ↓, KnowMem on the
# retain set ↑ (utility), PrivLeak →0 (0 = like the retain model), and the memorisation numbers beside them.
MUSE_COLUMNS = [
    ("forget_verbmem_ROUGE", "VerbMem F ↓"), ("forget_knowmem_ROUGE", "KnowMem F ↓"),
    ("retain_knowmem_ROUGE", "KnowMem R ↑"), ("privleak", "PrivLeak →0"), ("extraction_strength", "ES ↓"),
    ("exact_memorization", "EM ↓"), ("mia_min_k", "MIA min-k AUC"),
]
# WMDP's accuracies (bs_train/evaluation/wmdp/suite.py): hazardous knowledge ↓ (0.25 is chance), MMLU ↑.
WMDP_COLUMNS = [("wmdp_bio", "WMDP-Bio ↓"), ("wmdp_chem", "WMDP-Chem ↓"), ("wmdp_cyber", "WMDP-Cyber ↓"),
                ("wmdp", "WMDP all ↓"), ("mmlu", "MMLU ↑")]
BENCHMARK_COLUMNS = {"tofu": COLUMNS, "muse": MUSE_COLUMNS, "wmdp": WMDP_COLUMNS}
# what `bs-unlearn compare` adds from a run's training summary
# (a fine-tuning run logs its one term as train_nll: methods.Method.terms)
TRAIN_COLUMNS = [("steps", "Steps"), ("selected_step", "Selected step"), ("loss", "Final loss"),
                 ("forget", "Forget term"), ("retain", "Retain term"), ("train_nll", "Train NLL")]


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """One markdown row per result dict (``name`` first), only the columns some row has."""
    cols = [(k, t) for k, t in columns if any(r.get(k) is not None for r in rows)]
    lines = ["| model | " + " | ".join(t for _, t in cols) + " |", "| --- |" + " --- |" * len(cols)]
    lines += ["| " + " | ".join([str(r["name"])] + [_fmt(r.get(k)) for k, _ in cols]) + " |" for r in rows]
    return "\n".join(lines) + "\n"
