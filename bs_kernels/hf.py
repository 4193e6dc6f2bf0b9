"""Get hidden states and the lm_head (weight, bias, logit transform) from a Hugging Face causal LM without logits.

Duck-typed on the ``PreTrainedModel`` interface (``get_decoder`` / ``base_model``, ``get_output_embeddings``,
``config``), so ``bs_kernels`` still depends on torch and triton only. ``lm_head`` reads what turns a model's hidden
states into its logits: the output embedding's weight and bias, and the config's final logit processing, which the
fused ops then apply in their row pass (``head.py``):

* ``final_logit_softcapping`` (Gemma-2; Gemma-3 when set): ``z = c tanh(x / c)``;
* ``logit_scale`` (Cohere, Cohere-2): ``z = s x``;
* ``logits_scaling`` (Granite): ``z = x / s``.

The names are those of transformers' own causal-LM forwards (5.x). A model whose logits are changed some other way
is not seen here; the family tests hold each supported family's fused scores to the model's own logits.
"""

from __future__ import annotations

import torch

from .head import LMHead


def _text_config(model: torch.nn.Module):
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def lm_head(model: torch.nn.Module) -> LMHead:
    """The ``LMHead`` of ``model``: its output embedding's weight [V, D] and bias, and its config's logit transform."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) weight")
    config = _text_config(model)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        scale /= float(divisor)
    bias = getattr(head, "bias", None)
    return LMHead(head.weight, bias if isinstance(bias, torch.Tensor) else None, scale,
                  None if softcap is None else float(softcap))


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The [V, D] output-embedding weight of ``model``, for callers that compute ``h W^T`` themselves: refused (one
    line naming the transform) for a head whose logits are not plain ``h W^T``; use ``lm_head`` for those."""
    head = lm_head(model)
    if not head.is_plain:
        raise ValueError(f"{type(model).__name__}'s logits are not h W^T (bias: {head.bias is not None}, logit_scale="
                         f"{head.logit_scale}, softcap={head.softcap}); use bs_kernels.hf.lm_head and pass its "
                         "options() to the fused ops")
    return head.weight


def hidden_states_and_head(model: torch.nn.Module, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, LMHead]:
    """Run only the decoder of ``model``: returns ``(last hidden states [B, T, D], its LMHead)``; the losses of
    ``bs_kernels.unlearning`` take the head itself in place of the weight, the primitives (``linear_token_scores``,
    ...) ``head.weight`` and ``**head.options()``."""
    head = lm_head(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head
