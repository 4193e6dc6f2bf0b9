"""Scoring and greedy generation on every rank of a run, the model kept sharded, the rows split across ranks.

What an evaluation *during* training needs (``bs_train/evaluation/in_training.py``): the model is the trainer's
``LossHead``, under FSDP2 its decoder blocks and root sharded on every rank, and nothing may gather the whole model
onto one rank. So:

* ``score_rows``: rank r scores rows r, r + world, ... through the ``LossHead`` forward, so FSDP2 all-gathers each
  block's parameters for the forward and frees them after, as in training; every forward is a collective, so every
  rank runs the same number of batches (a rank short of rows scores a copy of one and drops it). Per row: the mean
  answer NLL and token count, and with ``token_stats`` the teacher-forced extraction strength and exact memorisation
  (the answer's final EOS left out, as the suite's ``score_answers`` does);
* ``generate_rows``: greedy answers through the project's KV-cached sampler under ``gathered_parameters`` (each
  rank's parameters all-gathered once for the round, as BS-S belief sampling does; the sampler then calls the
  decoder's submodules, no collective per token, so ranks may hold different numbers of prompts);
* ``gather_rows``: the per-row results of every rank, in row order on every rank (``all_gather_object``). Metrics
  are then computed from whole per-row lists with the suite's own formulas (``evaluation/metrics.py``), in one
  order: a harmonic mean or a truth-ratio aggregate is not a sum, and the same lists in the same order make the
  values of any number of ranks those of one process, to the float error of the forwards themselves.

Works unchanged in one process and on a plain Hugging Face model wrapped in ``LossHead`` (how the selected export is
scored again after reloading).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

import bs_kernels as bk

from ..data import collate
from ..methods.base import compute_dtype_pair
from ..sampler import Sampler, SamplingConfig, check_supported, gathered_parameters
from . import metrics
from .generation import _cut, generate, stop_ids

ARGMAX_CHUNK_BYTES = 32 * 2**20  # bound on the float32 [rows, V] logits block of the teacher-forced argmax


def gather_rows(local: dict[int, Any], n: int) -> list[Any]:
    """Every rank's ``{row index: result}`` merged, as a list of ``n`` results in row order, on every rank."""
    merged = dict(local)
    if dist.is_initialized() and dist.get_world_size() > 1:
        pieces: list = [None] * dist.get_world_size()
        dist.all_gather_object(pieces, local)
        for piece in pieces:
            merged.update(piece)
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise RuntimeError(f"gather_rows: no result for rows {missing[:5]} (of {n})")
    return [merged[i] for i in range(n)]


def _mine(n: int, rank: int, world: int, order: list[int] | None = None) -> list[int]:
    order = list(range(n)) if order is None else order
    return order[rank::world]


@torch.no_grad()
def _argmax(hidden: torch.Tensor, head: bk.LMHead) -> torch.Tensor:
    """The argmax of the head's logits per row, in chunks of at most ``ARGMAX_CHUNK_BYTES`` of float32 logits."""
    rows = max(1, ARGMAX_CHUNK_BYTES // (4 * head.weight.shape[0]))
    return torch.cat([head.logits(hidden[c:c + rows]).float().argmax(-1) for c in range(0, hidden.shape[0], rows)]
                     or [hidden.new_zeros(0, dtype=torch.long)])


def _row_stats(pred: torch.Tensor, labels: torch.Tensor, eos_id: int | None) -> tuple[float, float]:
    """(extraction strength, exact memorisation) of one row's answer tokens, a final EOS label left out."""
    if eos_id is not None and labels.numel() > 1 and int(labels[-1]) == eos_id:
        pred, labels = pred[:-1], labels[:-1]
    p, y = pred.cpu().numpy(), labels.cpu().numpy()
    return metrics.extraction_strength(p, y), metrics.exact_memorization(p, y)


@torch.no_grad()
def score_rows(head: torch.nn.Module, items: list[dict[str, list[int]]], *, pad_id: int, eos_id: int | None = None,
               batch_size: int = 16, impl: str = "torch", rank: int = 0, world: int = 1,
               token_stats: list[bool] | None = None) -> list[dict[str, float]]:
    """Per item (``input_ids``, unshifted ``labels``), on every rank: ``{"avg_nll", "n_tokens"}`` plus ``"es"`` and
    ``"em"`` where ``token_stats[i]``. ``head`` is a ``LossHead`` (sharded or not); it is put in eval mode for the
    call, its mode restored after, and under FSDP2 its root resharded (the root keeps its parameters after a forward
    otherwise; only a backward would free them). Rows are scored shortest first, so a batch holds little padding."""
    if batch_size < 1:
        raise ValueError(f"score_rows: batch_size must be >= 1, got {batch_size}")
    if not items:
        return []
    stats = token_stats or [False] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    mine = _mine(len(items), rank, world, order)
    n_batches = math.ceil(math.ceil(len(items) / world) / batch_size)  # the same on every rank: no collective
    device = next(head.parameters()).device
    was_training = head.training
    head.eval()
    local: dict[int, dict[str, float]] = {}
    try:
        for b in range(n_batches):
            rows = mine[b * batch_size:(b + 1) * batch_size]
            batch = collate([{"input_ids": list(items[i]["input_ids"]), "labels": list(items[i]["labels"]),
                              "index": i} for i in (rows or [order[0]])], pad_id)  # no rows: a copy, dropped
            labels = batch["labels"].to(device)

            def fn(hidden, head, _):
                h, head = compute_dtype_pair(hidden, head)
                h, y = h.reshape(-1, h.shape[-1]), bk.shift_labels(labels, bk.IGNORE_INDEX)
                flat = y.reshape(-1)
                keep = (flat != bk.IGNORE_INDEX).nonzero().squeeze(1)  # a host sync: evaluation only
                logp = bk.linear_token_scores(h[keep], head.weight, flat[keep], impl=impl, **head.options()).float()
                pred = _argmax(h[keep], head) if any(stats[i] for i in rows) else None
                return logp, pred, (y != bk.IGNORE_INDEX).sum(-1)

            logp, pred, counts = head(batch["input_ids"].to(device), batch["attention_mask"].to(device), fn)
            if not rows:
                continue
            if bool((counts == 0).any()):
                raise ValueError(f"score_rows: item {rows[int((counts == 0).nonzero()[0, 0])]} has no labels")
            kept_labels = bk.shift_labels(labels, bk.IGNORE_INDEX)
            kept_labels = kept_labels[kept_labels != bk.IGNORE_INDEX]
            bounds = [0, *torch.cumsum(counts, 0).tolist()]
            for j, i in enumerate(rows):
                lo, hi = bounds[j], bounds[j + 1]
                row = {"avg_nll": float(-logp[lo:hi].mean()), "n_tokens": int(hi - lo)}
                if stats[i]:
                    row["es"], row["em"] = _row_stats(pred[lo:hi], kept_labels[lo:hi], eos_id)
                local[i] = row
    finally:
        if hasattr(head, "reshard"):  # FSDP2's root keeps its parameters after a forward without backward
            head.reshard()
        head.train(was_training)
    return gather_rows(local, len(items))


def check_generation(lm: torch.nn.Module, world: int) -> bool:
    """Can ``generate_rows`` drive ``lm`` with the project's sampler? In one process any model can be evaluated
    (Hugging Face ``generate`` otherwise); under torchrun only a sampler-driven model, since ``generate`` runs the
    FSDP-wrapped blocks, a collective per token whose count would differ between ranks. Raises ``ValueError`` then."""
    try:
        check_supported(lm)
        return True
    except (ValueError, AttributeError) as e:
        if world > 1:
            raise ValueError(f"in-training generation under torchrun needs a model the project's sampler drives "
                             f"({e}); set train.eval_max_new_tokens=0 to evaluate without generated answers") from None
        return False


class GreedyGenerator:
    """Greedy answers of up to ``max_new_tokens`` for a run's evaluations: one sampler for the whole run (one KV
    cache, one compiled decode step on CUDA, reused by every evaluation), built at first use for the prompts of that
    call (a rank's share, at most ``batch_size`` at once: the sampler pads every batch to its fixed size)."""

    def __init__(self, tokenizer: Any, *, max_new_tokens: int, batch_size: int, prompt_width: int):
        self.tokenizer, self.max_new_tokens, self.batch_size = tokenizer, max_new_tokens, batch_size
        self.prompt_width, self.sampler = prompt_width, None

    @torch.no_grad()
    def __call__(self, head: torch.nn.Module, lm: torch.nn.Module, prompts: list[list[int]], *, rank: int = 0,
                 world: int = 1, sampler_ok: bool = True) -> list[str]:
        """The decoded greedy answer to every prompt, on every rank; rank r answers prompts r, r + world, ...."""
        tok = self.tokenizer
        mine = _mine(len(prompts), rank, world)
        local: dict[int, str] = {}
        was_training = head.training
        try:
            if not sampler_ok:  # one process, a model the sampler does not drive: Hugging Face generate
                outs = generate(lm, tok, [prompts[i] for i in mine], max_new_tokens=self.max_new_tokens,
                                batch_size=self.batch_size)
                local = {i: o[0] for i, o in zip(mine, outs)}
            else:
                if self.sampler is None:
                    eos = tok.eos_token_id if tok.eos_token_id is not None else -1
                    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                    self.sampler = Sampler(lm, SamplingConfig(n=1, max_new_tokens=self.max_new_tokens,
                                                              temperature=0.0),
                                           max_prompts=min(self.batch_size, math.ceil(len(prompts) / world)),
                                           prompt_width=self.prompt_width, eos_id=eos, pad_id=pad)
                stops = stop_ids(lm, tok)
                with gathered_parameters(head):  # every rank, once for the round
                    for c in range(0, len(mine), self.batch_size):
                        chunk = mine[c:c + self.batch_size]
                        out = self.sampler([prompts[i] for i in chunk]).sequences()
                        local.update({i: _cut(s[0], stops) for i, s in zip(chunk, out)})
        finally:
            head.train(was_training)
        texts = {i: tok.decode(ids, skip_special_tokens=True).strip() for i, ids in local.items()}
        return gather_rows(texts, len(prompts))
