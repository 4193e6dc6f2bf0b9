"""Text generation for evaluation, judging and the squeezing monitor: one function, the project's sampler first.

``generate(model, tokenizer, prompts, ...)`` returns, for each prompt (token ids), ``num_samples`` continuations as
token-id lists cut after the first stop token: the tokenizer's EOS or any EOS id of the model's generation config
(``stop_ids``: Llama-3.2-Instruct also stops at 128001 and 128008). The families the KV-cached sampler of
``bs_train/sampler.py`` drives (what ``bs_train.sampler.check_supported`` accepts: ``bs_train.decoder.FAMILIES``) go
through it, held token for token to HF greedy decoding by the tests; any other model goes through Hugging Face
``generate`` (``hf_generate``: left padding, a KV cache, the same arguments). ``generate_text`` is the greedy answers to questions in the chat format
of ``bs_train/data/qa.py``, as text;
with ``protocol="open-unlearning"`` the prompts are open-unlearning's and go through HF ``generate`` with its
attention mask (``input_ids != pad``: with pad == eos, every EOS of the prompt is masked, as its collator does).

This module sits beside the sampler, below everything that generates (``evaluate``, ``judge``, ``squeezing``,
``recipe``); BS-S belief sampling during training drives the sampler directly (``bs_train/methods/beliefs.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..data import encode_prompt
from ..model import model_device, stop_token_ids
from ..sampler import Sampler, SamplingConfig, check_supported


def stop_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Token ids generation stops at: the tokenizer's EOS, then the model's ``generation_config.eos_token_id``(s)."""
    ids = stop_token_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer)
    return [ids] if isinstance(ids, int) else ids


def _cut(seq: list[int], stops: list[int]) -> list[int]:
    """``seq`` up to and including its first stop token."""
    for j, t in enumerate(seq):
        if t in stops:
            return seq[:j + 1]
    return seq


def _check_arguments(max_new_tokens: int, num_samples: int, batch_size: int, do_sample: bool) -> None:
    if max_new_tokens < 1 or num_samples < 1 or batch_size < 1:
        raise ValueError(f"generate: max_new_tokens, num_samples and batch_size must be >= 1, got "
                         f"{max_new_tokens}, {num_samples}, {batch_size}")
    if num_samples > 1 and not do_sample:
        raise ValueError("generate: num_samples > 1 needs do_sample=True (greedy decoding is deterministic)")


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 200,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             num_samples: int = 1, seed: int = 0, batch_size: int = 16,
             on_batch: Callable[[int], None] | None = None) -> list[list[list[int]]]:
    """For each prompt (token ids), ``num_samples`` continuations as token-id lists, each cut after the first stop
    token (``stop_ids``; kept when generated). Greedy unless ``do_sample``; sampling is seeded by ``seed`` without
    touching the caller's RNG state; the model's training mode is restored.

    The families the project's KV-cached sampler drives go through it (``bs_train.sampler``, held token for token to
    HF greedy decoding by its tests); any other model through HF ``generate`` (``hf_generate``). This is the single
    generation function of evaluation, the judge and the squeezing monitor. ``on_batch(n)`` is called after each
    batch of ``n`` prompts (a progress bar's ``update``)."""
    _check_arguments(max_new_tokens, num_samples, batch_size, do_sample)
    try:
        check_supported(model)
    except (ValueError, AttributeError):
        return hf_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature, top_p=top_p, top_k=top_k, num_samples=num_samples, seed=seed,
                           batch_size=batch_size, on_batch=on_batch)
    cfg = SamplingConfig(n=num_samples, max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                         top_k=top_k if do_sample else 0, top_p=top_p if do_sample else 1.0)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if not prompts:
        return []
    gen = torch.Generator(device=model_device(model)).manual_seed(seed)
    # one sampler for every batch: one cache and one compiled decode step
    sampler = Sampler(model, cfg, max_prompts=min(batch_size, len(prompts)), prompt_width=max(map(len, prompts)),
                      eos_id=eos, pad_id=pad)
    results: list[list[list[int]]] = []
    stops = stop_ids(model, tokenizer)  # the sampler stops a row at the tokenizer's EOS; the others are cut here
    for start in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[start:start + batch_size]]
        results.extend([[_cut(s, stops) for s in row] for row in sampler(batch, gen).sequences()])
        if on_batch is not None:
            on_batch(len(batch))
    return results


def hf_generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], *,
                max_new_tokens: int = 200, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                top_k: int = 0, num_samples: int = 1, seed: int = 0, batch_size: int = 16,
                mask_pad_tokens: bool = False, on_batch: Callable[[int], None] | None = None,
                ) -> list[list[list[int]]]:
    """``generate`` through HF ``generate`` with left padding and a KV cache (the fallback for models the sampler
    does not drive); same arguments and returns. ``mask_pad_tokens``: attention mask ``input_ids != pad`` (every
    prompt token equal to the pad id masked, as open-unlearning's collator does)."""
    _check_arguments(max_new_tokens, num_samples, batch_size, do_sample)
    device, was_training = model_device(model), model.training
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_ids(model, tokenizer)
    eos = stops if stops else None
    # Keyword arguments, not a GenerationConfig: they override the model's own generation_config (an instruct
    # model's do_sample=True / temperature) in every transformers version.
    options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_return_sequences": num_samples,
               "pad_token_id": pad, "eos_token_id": eos, "use_cache": True,
               **({"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {})}
    results: list[list[list[int]]] = []
    model.eval()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                batch = [list(p) for p in prompts[start:start + batch_size]]
                width = max(len(p) for p in batch)
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], dtype=torch.int64, device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
                if mask_pad_tokens:
                    mask = (ids != pad).to(mask.dtype)
                out = model.generate(input_ids=ids, attention_mask=mask, **options)[:, width:].tolist()
                for i in range(len(batch)):
                    samples = []
                    for seq in out[i * num_samples:(i + 1) * num_samples]:
                        samples.append(_cut(seq, stops))
                    results.append(samples)
                if on_batch is not None:
                    on_batch(len(batch))
    finally:
        model.train(was_training)
    return results


def generate_text(model: torch.nn.Module, tokenizer: Any, questions: Sequence[str], *, max_new_tokens: int = 200,
                  batch_size: int = 16, protocol: str = "exact",
                  on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers to ``questions`` (chat prompt of ``bs_train.data``), decoded without special tokens. With
    ``protocol="open-unlearning"``: its prompts and attention mask, through HF ``generate``."""
    prompts = [encode_prompt(tokenizer, q, protocol) for q in questions]
    if protocol == "open-unlearning":
        outs = hf_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           mask_pad_tokens=True, on_batch=on_batch)
    else:
        outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        on_batch=on_batch)
    return [tokenizer.decode(o[0], skip_special_tokens=True).strip() for o in outs]
