"""Model-facing scoring: per-example answer NLL, per-token log-probs and vocabulary statistics of a causal LM.

The one place that turns a model and (prompt, answer) token ids into numbers, below both the evaluation suite
(``bs_train/evaluation/tofu/suite.py``) and the training-time squeezing monitor (``bs_train/methods/squeezing.py``), so neither imports
the other. Every number comes from the fused scores of ``bs_kernels`` (``linear_cross_entropy`` on the decoder's
hidden states and the lm_head), never from [B, T, V] logits:

* ``score_encoded``: per item, the mean answer NLL and, when asked, per-token log-probs, the teacher-forced argmax
  and the mean / variance of log p over the vocabulary (min-k%++), the last three from the same hidden states in
  bounded chunks of rows (``vocab_statistics``, at most ``VOCAB_CHUNK_BYTES`` of float32 logits at once);
* ``score_answers``: ``score_encoded`` of question/answer text pairs in the chat format of ``bs_train/data/qa.py``,
  ``protocol="exact"`` (ours) or ``"open-unlearning"`` (its inputs, labels and pad-token attention mask);
* ``resolve_impl``: ``impl="auto"`` -> the Triton kernels on CUDA, plain PyTorch elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from bs_kernels import IGNORE_INDEX, LMHead, linear_cross_entropy, shift_labels
from bs_kernels.hf import hidden_states_and_head

from ..data import collate, encode_qa
from ..model import model_device

VOCAB_CHUNK_BYTES = 32 * 2**20  # bound on the float32 [rows, V] block used for argmax / mean / variance of log p


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA, ``torch`` elsewhere."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be auto, torch or triton, got impl={impl!r}")
    return ("triton" if device.type == "cuda" else "torch") if impl == "auto" else impl


@torch.no_grad()
def vocab_statistics(hidden: torch.Tensor, head: LMHead) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows ``hidden [M, D]``: ``(argmax [M], mu [M], var [M])`` of ``log p = log_softmax(z)``, z the head's
    logits, with ``mu = E_p[log p]`` and ``var = E_p[(log p)^2] - mu^2``. Chunked so at most ``VOCAB_CHUNK_BYTES`` of
    float32 logits exist at once."""
    vocab = head.weight.shape[0]
    rows = max(1, VOCAB_CHUNK_BYTES // (4 * vocab))
    arg, mus, vs = [], [], []
    for c0 in range(0, hidden.shape[0], rows):
        z = head.logits(hidden[c0:c0 + rows]).float()
        lp = torch.log_softmax(z, dim=-1)
        p = lp.exp()
        mu = (p * lp).sum(-1)
        arg.append(z.argmax(-1))
        mus.append(mu)
        vs.append(((p * lp * lp).sum(-1) - mu * mu).clamp_min(0))
        del z, lp, p
    if not arg:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return hidden.new_zeros(0, dtype=torch.int64), empty, empty
    return torch.cat(arg), torch.cat(mus), torch.cat(vs)


@torch.no_grad()
def score_encoded(model: torch.nn.Module, items: Sequence[dict[str, Sequence[int]]], *, pad_id: int,
                  eos_id: int | None = None, batch_size: int = 16, impl: str = "auto",
                  vocab_stats: bool = False, mask_pad_tokens: bool = False,
                  on_batch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Per item (``input_ids``, unshifted ``labels``): ``avg_nll`` (mean NLL over labelled tokens) and ``n_tokens``.

    With ``vocab_stats``, also ``token_logp``, ``pred`` (teacher-forced argmax), ``labels``, ``mu``, ``var`` as numpy
    arrays over the labelled tokens, dropping a final ``eos_id`` label (OpenUnlearning's token-wise metrics ignore the
    EOS prediction). ``mask_pad_tokens``: attention mask ``input_ids != pad_id`` (open-unlearning's collator). The
    model is put in eval mode for the call and its training mode restored after.
    ``on_batch(n)`` is called after each batch of ``n`` items (a progress bar's ``update``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, was_training = model_device(model), model.training
    impl = resolve_impl(impl, device)
    model.eval()
    out: list[dict[str, Any]] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = [{"input_ids": list(it["input_ids"]), "labels": list(it["labels"]), "index": start + j}
                     for j, it in enumerate(items[start:start + batch_size])]
            b = collate(chunk, pad_id, mask_pad_tokens=mask_pad_tokens)
            ids, mask, labels = (b[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            hidden, head = hidden_states_and_head(model, ids, mask)
            hidden = hidden.to(head.weight.dtype)
            nll = linear_cross_entropy(hidden, head.weight, labels, reduction="none", shift=True, impl=impl,
                                       **head.options()).float()
            shifted = shift_labels(labels, IGNORE_INDEX)
            active = shifted != IGNORE_INDEX
            counts = active.sum(-1)
            if bool((counts == 0).any()):
                raise ValueError(f"score_encoded: item {start + int((counts == 0).nonzero()[0, 0])} has no labels")
            sums = torch.where(active, nll, torch.zeros_like(nll)).sum(-1)
            rows = [{"avg_nll": float(s / c), "n_tokens": int(c)} for s, c in zip(sums.cpu(), counts.cpu())]
            if vocab_stats:
                pred, mu, var = vocab_statistics(hidden[active], head)
                flat = {"token_logp": -nll[active], "pred": pred, "labels": shifted[active], "mu": mu, "var": var}
                flat = {k: v.cpu().numpy() for k, v in flat.items()}
                offsets = np.concatenate([[0], np.cumsum(counts.cpu().numpy())])
                for j, row in enumerate(rows):
                    lo, hi = int(offsets[j]), int(offsets[j + 1])
                    if eos_id is not None and hi - lo > 1 and int(flat["labels"][hi - 1]) == eos_id:
                        hi -= 1
                    row.update({k: v[lo:hi] for k, v in flat.items()})
            out.extend(rows)
            if on_batch is not None:
                on_batch(len(rows))
    finally:
        model.train(was_training)
    return out


def score_answers(model: torch.nn.Module, tokenizer: Any, questions: Sequence[str], answers: Sequence[str], *,
                  max_length: int = 512, protocol: str = "exact", **kwargs: Any) -> list[dict[str, Any]]:
    """``score_encoded`` of ``encode_qa(question, answer, protocol=)`` pairs (chat prompt + answer + EOS, labels on
    the answer; open-unlearning's construction and attention mask with ``protocol="open-unlearning"``)."""
    if len(questions) != len(answers):
        raise ValueError(f"score_answers: {len(questions)} questions but {len(answers)} answers")
    items = [encode_qa(tokenizer, q, a, max_length=max_length, protocol=protocol) for q, a in zip(questions, answers)]
    kwargs.setdefault("mask_pad_tokens", protocol == "open-unlearning")  # a caller may measure the mask alone
    return score_encoded(model, items, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, **kwargs)
