"""Tiny offline building blocks: a byte-level tokenizer, a small random Llama, and one of every model family.

Tests and the offline demo need a tokenizer and a causal LM without downloading anything (the Hugging Face Hub may be
unreachable, and CI runs on a clean CPU machine). ``byte_tokenizer`` builds a byte-level BPE tokenizer in memory with
the ``tokenizers`` library: one token per byte (token id = byte value), no merges, so any text round-trips exactly,
plus the ChatML special tokens and a SmolLM2-style chat template, so prompt formatting takes the same path as for a
real instruct model. ``tiny_llama`` builds a few-layer ``LlamaForCausalLM`` with seeded random weights, without
touching the global RNG.

``tiny_model(family)`` builds the same kind of model for every family of ``FAMILIES`` (the decoders unlearning papers
and harnesses use) from transformers' own config classes, with each family's distinguishing features switched on and
sized to matter at this scale: Mistral's and Gemma's sliding windows bind at 16 tokens, Gemma-2's final and attention
soft-caps bite on logits of a few units (3 and 1 here; 30 and 50 in the released models), GPT-NeoX rotates a quarter
of each head and Phi half, Phi's lm_head has a bias. ``load_model("tiny:<family>")`` loads one with the byte tokenizer.
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


# ---- one tiny model of every family ------------------------------------------------------------------------------

_SHARED = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 512, "pad_token_id": 256,
           "eos_token_id": 258, "bos_token_id": None, "initializer_range": 0.2}
"""Every family's common size: 2 layers, width 32, 4 query heads of 8 over 2 kv heads (grouped-query attention), the
byte tokenizer's special ids. ``initializer_range`` 0.2 (ours; the families' default is 0.02) gives logits of a few
units at width 32, so top-k beliefs and the soft-caps are not all ties of near-zero logits."""


def _gemma_like(**extra) -> dict:
    return {"query_pre_attn_scalar": 8, "sliding_window": 16, **extra}


FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {}),  # per-head q/k RMSNorm
    "gemma": ("GemmaConfig", {}),  # (1 + w) RMSNorm, sqrt(D)-scaled embedding, tied head, GeLU-tanh MLP
    "gemma2": ("Gemma2Config", _gemma_like(final_logit_softcapping=3.0, attn_logit_softcapping=1.0)),
    "gemma3": ("Gemma3TextConfig", _gemma_like(layer_types=["sliding_attention", "full_attention"])),
    "phi": ("PhiConfig", {}),  # TOFU's Phi-1.5: lm_head bias, one shared LayerNorm, parallel residual, half rotary
    "phi3": ("Phi3Config", {}),  # fused qkv and gate/up projections
    "olmo2": ("Olmo2Config", {}),  # norms after attention and MLP, q/k RMSNorm over all heads
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.25}),  # Pythia: parallel residual, LayerNorm, partial rotary
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "decoder_sparse_step": 1}),
}
"""family -> (transformers config class, the family's settings on top of ``_SHARED``)."""


def tiny_config(family: str, vocab_size: int):
    """The transformers config of ``family``'s tiny model (``FAMILIES``)."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; the tiny families are {sorted(FAMILIES)}")
    cls_name, extra = FAMILIES[family]
    kwargs = {**_SHARED, **extra, "vocab_size": vocab_size}
    if family == "gpt_neox":  # multi-head attention only, head width from hidden / heads
        for key in ("num_key_value_heads", "head_dim"):
            kwargs.pop(key)
    if family == "phi":  # head width from hidden / heads
        kwargs.pop("head_dim")
    return getattr(transformers, cls_name)(**kwargs)


def tiny_model(family: str, vocab_size: int, *, seed: int = 0) -> torch.nn.Module:
    """``family``'s tiny causal LM (float32, eval mode) with random weights from ``seed``; the global RNG is left as
    it was. Biases are drawn too (transformers starts them at 0), so a bias a code path drops shows: Qwen2's q/k/v
    biases, Phi's lm_head bias. The attention implementation is the one transformers picks for the family (SDPA, or
    eager for Gemma-2, whose soft-capped attention SDPA cannot express)."""
    import transformers

    config = tiny_config(family, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias") and "norm" not in name:
                    p.normal_(0.0, config.initializer_range)
    return model.eval()

