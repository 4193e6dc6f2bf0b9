"""Tiny offline building blocks: a byte-level tokenizer and a small random Llama.

Tests and the offline demo need a tokenizer and a causal LM without downloading anything (the Hugging Face Hub may be
unreachable, and CI runs on a clean CPU machine). ``byte_tokenizer`` builds a byte-level BPE tokenizer in memory with
the ``tokenizers`` library: one token per byte (token id = byte value), no merges, so any text round-trips exactly,
plus the ChatML special tokens and a SmolLM2-style chat template, so prompt formatting takes the same path as for a
real instruct model. ``tiny_llama`` builds a few-layer ``LlamaForCausalLM`` with seeded random weights, without
touching the global RNG.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML, as in SmolLM2-Instruct: "<|im_start|>{role}\n{content}<|im_end|>\n" per message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in memory: ids 0..255 are the bytes, then ``<|pad|>``, ``<|im_start|>``,
    ``<|im_end|>`` (256, 257, 258). ``pad_token`` is ``<|pad|>``, ``eos_token`` is ``<|im_end|>``, no BOS.

    Encoding then decoding any text gives it back exactly (no merges, no normalisation, no prefix space).
    """
    byte_to_char = _bytes_to_unicode()
    if set(byte_to_char.values()) != set(pre_tokenizers.ByteLevel.alphabet()):  # pragma: no cover
        raise RuntimeError("byte_tokenizer: GPT-2 byte table differs from tokenizers' ByteLevel alphabet")
    vocab = {byte_to_char[b]: b for b in range(256)}  # token id = byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD_TOKEN, IM_START, IM_END])  # ids 256, 257, 258, in this order
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    ids = fast.convert_tokens_to_ids([PAD_TOKEN, IM_START, IM_END])
    if ids != [256, 257, 258]:  # pragma: no cover - guards against a tokenizers/transformers change
        raise RuntimeError(f"byte_tokenizer: unexpected special token ids {ids}")
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the same table ``ByteLevel`` uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A small ``LlamaForCausalLM`` (float32, SDPA attention, untied lm_head) with random weights from ``seed``.

    The same arguments always give the same weights; the global torch RNG is left as it was.
    """
    if vocab_size < 1:
        raise ValueError(f"tiny_llama: vocab_size must be >= 1, got {vocab_size}")
    if hidden_size % num_heads != 0:
        raise ValueError(f"tiny_llama: hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"tiny_llama: num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
