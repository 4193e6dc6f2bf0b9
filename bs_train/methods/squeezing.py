"""Squeezing monitor: watch where the probability mass pushed off the forget targets goes during unlearning.

Gradient ascent lowers log p(y|x) of the forget answers, but softmax is zero-sum: the mass flows to the model's most
likely *other* answers, often paraphrases of the same fact (the squeezing effect). The BS paper shows it with a
probability-dynamics figure: the targets go down while the model's high-likelihood beliefs go *up*. This module
draws that figure for any run:

1. ``prepare(model)``, before unlearning: for each forget prompt draw ``n_beliefs`` answers from the current model
   (sampling at temperature 1 through ``bs_train.evaluation.generation.generate``, seeded, the caller's RNG untouched), drop exact
   duplicates and the target itself, score every belief by its mean per-token log-prob and bucket all beliefs
   together: high = top 20%, mid = middle 60%, low = bottom 20%. The initial measurement is recorded as step 0.
2. ``maybe_log(step, model)``, during unlearning: at step 0 and every ``every`` steps, the mean (over sequences) of
   the mean per-token log-prob of the targets and of each bucket, through the fused scores of ``bs_kernels``
   (``bs_train.evaluation.scoring.score_encoded``: the scoring evaluation uses, without importing the evaluation suite).
3. ``finish(out_dir)``: ``squeezing.json`` (settings, beliefs with their buckets, the history) and ``squeezing.png``
   (log-prob and change since step 0 per curve, matplotlib's Agg canvas; no pyplot, no global backend switch).

The model may be a Hugging Face causal LM or a wrapper holding one as ``.lm`` / ``.module`` (the trainer's
``LossHead``); it is put in eval mode under no_grad while measured and its training mode restored after. Under FSDP2,
pass the root module and call ``prepare`` / ``maybe_log`` on every rank (its shards are all-gathered once per call
with ``bs_train.sampler.gathered_parameters``; the forwards are collective) and ``finish`` on rank 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bs_kernels import IGNORE_INDEX

from ..data import encode_prompt, encode_qa
from ..evaluation.generation import generate
from ..outputs import save_figure, write_json
from ..sampler import gathered_parameters
from ..evaluation.scoring import score_encoded

BUCKETS = ("high", "mid", "low")
HIGH_FRACTION = LOW_FRACTION = 0.2


def _unwrap(model: Any, attr: str) -> Any:
    """The first of model, model.lm, model.module that has ``attr``."""
    for m in (model, getattr(model, "lm", None), getattr(model, "module", None)):
        if m is not None and hasattr(m, attr):
            return m
    raise ValueError(f"{type(model).__name__} has no {attr}() (nor a .lm / .module that has one)")


def bucket_indices(scores: list[float]) -> dict[str, list[int]]:
    """Indices of ``scores`` in the high (top 20%), mid and low (bottom 20%) buckets; with two or more scores high and
    low hold at least one each; ties are broken by position."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    n = len(order)
    if n < 2:
        return {"high": order, "mid": [], "low": []}
    n_high = max(1, int(round(HIGH_FRACTION * n)))
    n_low = max(1, int(round(LOW_FRACTION * n)))
    return {"high": order[:n_high], "mid": order[n_high:n - n_low], "low": order[n - n_low:]}


class SqueezingMonitor:
    """Log-prob dynamics of forget targets and of the model's own beliefs, bucketed by initial likelihood."""

    def __init__(self, prompts: list[list[int]], targets: list[dict[str, list[int]]], tokenizer: Any, *,
                 n_beliefs: int = 5, every: int = 10, max_new_tokens: int = 64, seed: int = 0, impl: str = "torch",
                 batch_size: int = 16, temperature: float = 1.0, method: str | None = None) -> None:
        """``prompts[i]``: the token ids beliefs continue for forget example ``i``; ``targets[i]``: the example as
        trained (``input_ids``, unshifted ``labels`` on the target tokens). ``from_examples`` builds both from
        question/answer rows, ``from_dataset`` from a training dataset (question/answer or raw-text windows)."""
        if not prompts or len(prompts) != len(targets):
            raise ValueError(f"SqueezingMonitor: need one target per prompt, got {len(prompts)} prompts and "
                             f"{len(targets)} targets")
        for name, v in (("n_beliefs", n_beliefs), ("every", every), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SqueezingMonitor: {name} must be an integer >= 1, got {name}={v!r}")
        self.prompts, self.targets, self.tokenizer = [list(p) for p in prompts], targets, tokenizer
        self.n_beliefs, self.every, self.max_new_tokens, self.seed = n_beliefs, every, max_new_tokens, seed
        self.impl, self.batch_size, self.temperature = impl, batch_size, temperature
        self.method = method  # named in the plot's title: plots of several runs side by side say which is which
        self.beliefs: list[dict[str, Any]] = []
        self.buckets: dict[str, list[int]] = {b: [] for b in BUCKETS}
        self.history: list[dict[str, Any]] = []
        self._prepared = False

    @classmethod
    def from_examples(cls, forget_examples: list[dict], tokenizer: Any, *, max_length: int = 512,
                      **kwargs: Any) -> SqueezingMonitor:
        """From question/answer rows: each question's chat prompt, and prompt + answer + EOS as the target."""
        if not forget_examples:
            raise ValueError("SqueezingMonitor: forget_examples is empty")
        for i, ex in enumerate(forget_examples):
            if not isinstance(ex, dict) or not isinstance(ex.get("question"), str) or not isinstance(
                    ex.get("answer"), str):
                raise ValueError(f"SqueezingMonitor: forget example {i} must be a dict with string question/answer")
        prompts = [encode_prompt(tokenizer, ex["question"]) for ex in forget_examples]
        targets = [encode_qa(tokenizer, ex["question"], ex["answer"], max_length=max_length) for ex in forget_examples]
        return cls(prompts, targets, tokenizer, **kwargs)

    @classmethod
    def from_dataset(cls, dataset: Any, tokenizer: Any, **kwargs: Any) -> SqueezingMonitor:
        """From a training dataset (``QADataset`` or ``TextDataset``): its prompts, and its items as targets."""
        items = [dataset[i] for i in range(len(dataset))]
        targets = [{"input_ids": list(it["input_ids"]), "labels": list(it["labels"])} for it in items]
        return cls(dataset.prompts(), targets, tokenizer, **kwargs)

    # ------------------------------------------------------------------------------------------- measuring

    def _scores(self, model: Any, items: list[dict[str, list[int]]]) -> list[float]:
        """Mean per-token log-prob of each item's labelled tokens."""
        if not items:
            return []
        scored = score_encoded(_unwrap(model, "get_decoder"), items, pad_id=self.tokenizer.pad_token_id,
                               batch_size=self.batch_size, impl=self.impl)
        return [-s["avg_nll"] for s in scored]

    def _score_all(self, model: Any) -> tuple[list[float], list[float]]:
        """Mean per-token log-probs of the targets and of every belief, the model in eval mode under no_grad."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), gathered_parameters(model):
                return self._scores(model, self.targets), self._scores(model, [b["item"] for b in self.beliefs])
        finally:
            model.train(was_training)

    def _record(self, step: int, target: list[float], belief: list[float]) -> dict[str, Any]:
        entry: dict[str, Any] = {"step": int(step), "target": float(np.mean(target))}
        for name, idx in self.buckets.items():
            entry[name] = float(np.mean([belief[i] for i in idx])) if idx else None
        self.history = sorted([h for h in self.history if h["step"] != entry["step"]] + [entry],
                              key=lambda h: h["step"])
        return entry

    def prepare(self, model: Any) -> None:
        """Draw, dedupe, score and bucket the beliefs with the current model; record the step-0 measurement."""
        gen_model = _unwrap(model, "generate")
        was_training = model.training
        eos = self.tokenizer.eos_token_id
        prompts = self.prompts
        try:
            with gathered_parameters(model):
                samples = generate(gen_model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                                   do_sample=True, temperature=self.temperature, num_samples=self.n_beliefs,
                                   seed=self.seed, batch_size=self.batch_size)
        finally:
            model.train(was_training)
        self.beliefs = []
        for i, (prompt, target, outs) in enumerate(zip(prompts, self.targets, samples)):
            answer = [t for t in target["labels"] if t != IGNORE_INDEX]
            seen = {tuple(answer), tuple(a for a in answer if a != eos)}
            for ids in outs:
                core = tuple(t for t in ids if t != eos)
                if not core or tuple(ids) in seen or core in seen:
                    continue
                seen.update((tuple(ids), core))
                self.beliefs.append({"example": i, "text": self.tokenizer.decode(list(core), skip_special_tokens=True),
                                     "item": {"input_ids": prompt + list(ids),
                                              "labels": [IGNORE_INDEX] * len(prompt) + list(ids)}})
        target, initial = self._score_all(model)
        for b, score in zip(self.beliefs, initial):
            b["initial_logp"] = score
        self.buckets = bucket_indices(initial)
        for name, idx in self.buckets.items():
            for j in idx:
                self.beliefs[j]["bucket"] = name
        self.history = []
        self._record(0, target, initial)
        self._prepared = True

    def maybe_log(self, step: int, model: Any) -> dict[str, Any] | None:
        """At step 0 and every ``every`` steps: measure and return ``{"step", "target", "high", "mid", "low"}`` (mean
        per-token log-probs; a bucket with no beliefs is None); otherwise None."""
        if not self._prepared:
            raise ValueError("SqueezingMonitor.maybe_log called before prepare(model)")
        if step < 0:
            raise ValueError(f"SqueezingMonitor.maybe_log: step must be >= 0, got {step}")
        if step % self.every != 0:
            return None
        return self._record(step, *self._score_all(model))

    # ------------------------------------------------------------------------------------------- resuming

    def _settings(self) -> dict[str, Any]:
        return {"n_beliefs": self.n_beliefs, "every": self.every, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "temperature": self.temperature, "n_examples": len(self.prompts)}

    def state_dict(self) -> dict[str, Any]:
        """Everything ``prepare`` drew and everything measured since (plain lists and numbers, so it fits a
        ``weights_only`` checkpoint): a resumed run continues the same curves over the same beliefs."""
        if not self._prepared:
            raise ValueError("SqueezingMonitor.state_dict called before prepare(model)")
        return {"settings": self._settings(), "beliefs": self.beliefs, "buckets": self.buckets,
                "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("settings") != self._settings():
            raise ValueError(f"SqueezingMonitor: the saved monitor had settings {state.get('settings')}, this one has "
                             f"{self._settings()}")
        self.beliefs, self.buckets, self.history = state["beliefs"], state["buckets"], state["history"]
        self._prepared = True

    # ------------------------------------------------------------------------------------------- output

    def finish(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``squeezing.json`` and ``squeezing.png`` into ``out_dir``; returns their paths."""
        if not self._prepared:
            raise ValueError("SqueezingMonitor.finish called before prepare(model)")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "settings": {**self._settings(), "method": self.method,
                         "buckets": "high = top 20%, mid = middle 60%, low = bottom 20% of initial belief log-prob"},
            "bucket_sizes": {k: len(v) for k, v in self.buckets.items()},
            "history": self.history,
            "beliefs": [{k: b[k] for k in ("example", "text", "initial_logp", "bucket")} for b in self.beliefs],
        }
        json_path, png_path = out / "squeezing.json", out / "squeezing.png"
        write_json(json_path, doc)
        plot_history(self.history, png_path, method=self.method)
        return json_path, png_path


_STYLE = {"target": ("target (forget answer)", "black", "-"), "high": ("high-likelihood beliefs", "tab:red", "-"),
          "mid": ("mid-likelihood beliefs", "tab:orange", "--"), "low": ("low-likelihood beliefs", "tab:blue", ":")}


def plot_history(history: list[dict[str, Any]], path: str | Path, *, method: str | None = None) -> Path:
    """Two panels over steps: mean per-token log-prob of each curve, and its change since the first measurement;
    ``method`` (the unlearning method) heads the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("plot_history: empty history")
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_abs, ax_delta = fig.subplots(1, 2)
    for key, (label, color, ls) in _STYLE.items():
        pts = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        if not pts:
            continue
        steps, vals = zip(*pts)
        ax_abs.plot(steps, vals, color=color, linestyle=ls, marker="o", markersize=3, label=label)
        ax_delta.plot(steps, [v - vals[0] for v in vals], color=color, linestyle=ls, marker="o", markersize=3,
                      label=label)
    ax_abs.set(xlabel="unlearning step", ylabel="mean log-prob per token", title="Probability dynamics")
    ax_delta.set(xlabel="unlearning step", ylabel="change since start", title="Squeezing: target down, beliefs up?")
    ax_delta.axhline(0.0, color="grey", linewidth=0.8)
    if method:
        fig.suptitle(f"Unlearning with {method}", fontsize=12)
    ax_abs.legend(fontsize=8, loc="best")
    for ax in (ax_abs, ax_delta):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)
