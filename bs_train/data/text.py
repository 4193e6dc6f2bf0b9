"""Raw text cut into fixed-length token windows: the training data of MUSE and WMDP.

MUSE trains unlearning on its raw forget and retain corpora (``muse-bench/MUSE-News`` subset ``raw``: ``forget``,
``retain1``, ``retain2``, ``holdout``; each row a ``text``), WMDP on its forget and retain corpora
(``cais/wmdp-corpora``: ``cyber-forget-corpus``, ``cyber-retain-corpus``, ``bio-retain-corpus``; or any local JSON
Lines of ``{"text": ...}``). As open-unlearning's ``PretrainingDataset`` (``src/data/pretraining.py``) does, the
texts of a split are joined with a blank line and tokenised once, and the token stream is cut into windows of
``window`` tokens, so a window may start mid-sentence and a document may span windows; every token of a window is a
label (all but the first, which nothing predicts). The window length is the benchmark's reference
(``data.window_tokens``: open-unlearning's ``MUSE_forget.yaml`` / ``MUSE_retain.yaml`` ``max_length: 2048``,
``WMDP_forget.yaml`` / ``WMDP_retain.yaml`` ``max_length: 512``).

One difference from the reference, on purpose: open-unlearning decodes each window back to text and tokenises it
again (with the tokenizer's special tokens, truncated to the window), which can re-split the tokens at a window's
edges and, when the stream is an exact multiple of the window, adds a window with no text. Here each window is the
stream's own tokens, with the tokens the tokenizer puts in front of any text (Llama's BOS; none for SmolLM2) first.

``TextDataset`` has the interface of ``qa.QADataset`` (items, ``lengths``, ``prompts``): the trainer and the BS-S
sampler take either. A window's *prompt*, what BS-S's beliefs continue, is its first ``prefix_tokens`` tokens
(``method.bss_prefix_tokens``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from bs_kernels import IGNORE_INDEX

from .rows import check_fields, load_rows

JOIN = "\n\n"
"""What separates the texts of a split in the token stream (open-unlearning's ``PretrainingDataset``)."""


def _check_text(row: Any, where: str) -> dict[str, Any]:
    return check_fields(row, where, ("text",), who="load_texts")


def load_texts(source: str | os.PathLike[str], split: str) -> list[str]:
    """The ``text`` of every row of ``split`` (``raw/forget``, ``cyber-forget-corpus``, ...: ``rows.load_rows``);
    ``a+b`` joins several splits in order (e.g. ``raw/forget+raw/retain1``, a target model's fine-tuning text)."""
    parts = [p.strip() for p in split.split("+")]
    if not all(parts):
        raise ValueError(f"load_texts: split {split!r} has an empty part")
    return [row["text"] for part in parts for row in load_rows(source, part, _check_text, who="load_texts")]


def special_prefix(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer puts in front of any text (its BOS, or none)."""
    empty = list(tokenizer("", add_special_tokens=True)["input_ids"])
    return empty if empty != list(tokenizer("", add_special_tokens=False)["input_ids"]) else []


def token_windows(texts: list[str], tokenizer: Any, window: int) -> list[list[int]]:
    """The texts joined by ``JOIN``, tokenised once, cut into windows of ``window`` tokens each (the special prefix
    included); a last window too short to hold a label is dropped."""
    prefix = special_prefix(tokenizer)
    body = window - len(prefix)
    if body < 1:
        raise ValueError(f"token_windows: window={window} leaves no room after the {len(prefix)} special token(s)")
    stream = list(tokenizer(JOIN.join(texts), add_special_tokens=False)["input_ids"])
    out = [prefix + stream[i:i + body] for i in range(0, len(stream), body)]
    return [w for w in out if len(w) >= 2]


class TextDataset(torch.utils.data.Dataset):
    """Raw text as token windows, tokenised once at construction; item ``i`` is ``{"input_ids", "labels", "index"}``
    with every token but the first a label. ``name`` (e.g. ``"raw/forget"``) appears in errors."""

    def __init__(self, texts: list[str], tokenizer: Any, *, window: int, name: str, prefix_tokens: int = 32) -> None:
        if prefix_tokens < 1:
            raise ValueError(f"TextDataset: prefix_tokens must be >= 1, got {prefix_tokens}")
        self.name, self.window, self.prefix_tokens = name, window, prefix_tokens
        self.windows = token_windows(texts, tokenizer, window)
        if not self.windows:
            raise ValueError(f"dataset {name!r}: its text makes no window of at least 2 tokens")

    def __len__(self) -> int:
        return len(self.windows)

    def lengths(self) -> list[int]:
        return [len(w) for w in self.windows]

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = self.windows[i]
        return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:], "index": i}

    def prompts(self) -> list[list[int]]:
        """What generation continues for each window: its first ``prefix_tokens`` tokens (at most all but one)."""
        return [w[:min(self.prefix_tokens, len(w) - 1)] for w in self.windows]
