"""What every attack measures on the held-out forget rows, and how a measurement becomes a recovery.

* ``split_forget``: the forget rows, with their TOFU ``_perturbed`` fields (paraphrased question, wrong-fact answers)
  merged in, split into the relearning slice and the held-out rows every attack is scored on (seeded);
* ``Matcher``: does an answer say the forgotten one? Its similarity to the true answer (MiniLM cosine through the
  offline judge, or ROUGE-L recall) must reach the threshold and, where the row has wrong-fact answers, exceed its
  similarity to each of them, so an answer in the right template with the wrong fact does not count;
* ``knowledge``: forget answer probability (TOFU's Prob), extraction strength (ES), greedy ROUGE-L recall and the
  share of greedy answers the matcher accepts, per model, through ``bs_train.evaluation.scoring`` and ``bs_train.evaluation.generation``;
* ``recovery``: where an attacked model's number sits between the retain model (0: never trained on the forget rows)
  and the original (1) *under the same attack*, so what an attack does to every model (a quantized model's lower
  probabilities, the matcher's rate on template answers) cancels out. Lynch et al. 2024 ("Eight methods to evaluate
  robust unlearning in LLMs") hold an unlearned model to a model that never learnt the data in the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..evaluation import metrics
from ..data import load_split
from ..evaluation.generation import generate_text
from ..evaluation.scoring import score_answers

EXTRA_FIELDS = ("paraphrased_question", "paraphrased_answer", "perturbed_answer")


def forget_rows(data: Any, forget_split: str) -> list[dict[str, Any]]:
    """The forget rows, each with the ``{forget_split}_perturbed`` fields of the same question when that split
    exists (TOFU keeps them there, row for row)."""
    rows = [dict(r) for r in load_split(data, forget_split)]
    pert = load_split(data, f"{forget_split}_perturbed", required=False)
    if pert is not None and len(pert) == len(rows):
        for row, p in zip(rows, pert):
            if p.get("question") == row["question"]:
                row.update({k: p[k] for k in EXTRA_FIELDS if p.get(k)})
    return rows


def split_forget(rows: list[dict[str, Any]], fraction: float, seed: int, *, relearn_on_forget: bool = True
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(relearn rows, held-out rows)``: a seeded ``fraction`` of the rows (at least one, at most all but one) and
    the rest, in their original order. Without ``relearn_on_forget`` every row is held out."""
    if not relearn_on_forget:
        return [], list(rows)
    if len(rows) < 2:
        raise ValueError(f"the forget split has {len(rows)} row(s): relearning on part of it needs at least 2")
    n = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(order[:n])
    return [r for i, r in enumerate(rows) if i in chosen], [r for i, r in enumerate(rows) if i not in chosen]


class Matcher:
    """``recovered(answers, rows)``: per answer, whether it says the row's forgotten answer (see the module)."""

    def __init__(self, kind: str, threshold: float, *, device: str | torch.device = "cpu", judge: Any = None):
        if kind not in ("embedding", "rouge"):
            raise ValueError(f"judge must be embedding or rouge, got {kind!r}")
        self.kind, self.threshold = kind, float(threshold)
        self.judge = judge if kind == "embedding" else None  # an EmbeddingJudge already loaded, or one made here
        if kind == "embedding" and self.judge is None:
            from ..evaluation.judge import EmbeddingJudge

            self.judge = EmbeddingJudge(device=device)

    @property
    def rule(self) -> str:
        sim = "MiniLM cosine" if self.kind == "embedding" else "ROUGE-L recall"
        return f"{sim} to the answer >= {self.threshold:g} and above that to every wrong-fact answer"

    def _similarities(self, texts: Sequence[str], refs: Sequence[Sequence[str]]) -> list[list[float]]:
        """``out[i][j]`` = similarity of ``texts[i]`` to ``refs[i][j]``."""
        if self.kind == "rouge":
            flat_t = [t for t, rs in zip(texts, refs) for _ in rs]
            flat_r = [r for rs in refs for r in rs]
            flat = metrics.rouge_l_recall(flat_t, flat_r)
        else:
            uniq = sorted({*texts, *(r for rs in refs for r in rs)})
            emb = self.judge.embed(uniq)
            pos = {t: i for i, t in enumerate(uniq)}
            a = emb[[pos[t] for t, rs in zip(texts, refs) for _ in rs]]
            b = emb[[pos[r] for rs in refs for r in rs]]
            flat = (a * b).sum(-1).tolist()
        out, k = [], 0
        for rs in refs:
            out.append(flat[k:k + len(rs)])
            k += len(rs)
        return out

    def recovered(self, answers: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[bool]:
        if len(answers) != len(rows):
            raise ValueError(f"recovered: {len(answers)} answers for {len(rows)} rows")
        refs = [[r["answer"], *r.get("perturbed_answer", [])] for r in rows]
        sims = self._similarities([a if a.strip() else " " for a in answers], refs)
        return [s[0] >= self.threshold and all(s[0] > w for w in s[1:]) for s in sims]


def knowledge(model: torch.nn.Module, tok: Any, rows: list[dict[str, Any]], matcher: Matcher, *,
              max_new_tokens: int, batch_size: int, max_length: int, with_generation: bool = True
              ) -> dict[str, Any]:
    """Mean forget answer probability, ES, and (``with_generation``) greedy ROUGE-L recall and matcher rate of
    ``model`` on ``rows``, with the greedy answers."""
    q, a = [r["question"] for r in rows], [r["answer"] for r in rows]
    sc = score_answers(model, tok, q, a, vocab_stats=True, batch_size=batch_size, max_length=max_length)
    out: dict[str, Any] = {
        "forget_Q_A_Prob": float(metrics.probability([s["avg_nll"] for s in sc]).mean()),
        "extraction_strength": float(np.mean([metrics.extraction_strength(s["pred"], s["labels"]) for s in sc])),
    }
    if with_generation:
        gens = generate_text(model, tok, q, max_new_tokens=max_new_tokens, batch_size=batch_size)
        out["forget_Q_A_ROUGE"] = float(np.mean(metrics.rouge_l_recall(gens, a)))
        hits = matcher.recovered(gens, rows)
        out["recovered"] = float(np.mean(hits))
        out["generations"] = gens
    return out


def retain_knowledge(model: torch.nn.Module, tok: Any, rows: list[dict[str, Any]], *, batch_size: int,
                     max_length: int) -> dict[str, float]:
    """Mean answer probability on retain rows (what the model must still know); empty without rows."""
    if not rows:
        return {}
    sc = score_answers(model, tok, [r["question"] for r in rows], [r["answer"] for r in rows],
                       batch_size=batch_size, max_length=max_length)
    return {"retain_Q_A_Prob": float(metrics.probability([s["avg_nll"] for s in sc]).mean())}


def recovery(value: float | None, floor: float | None, ceiling: float | None, min_gap: float) -> float | None:
    """``(value - floor) / (ceiling - floor)``: 0 = the retain model's number, 1 = the original's; None when a number
    is missing or the two references are less than ``min_gap`` apart (nothing was forgotten to recover)."""
    if value is None or floor is None or ceiling is None or ceiling - floor < min_gap:
        return None
    return float((value - floor) / (ceiling - floor))
