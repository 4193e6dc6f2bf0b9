"""Get hidden states and the lm_head weight from a Hugging Face causal LM without computing logits.

Duck-typed on the ``PreTrainedModel`` interface (``get_decoder`` / ``base_model``, ``get_output_embeddings``), so
``bs_kernels`` still depends on torch and triton only. Models whose logits are not plain ``h W^T`` (a bias on the
head, a logit scale or soft-capping) are refused with a clear error rather than scored wrongly.
"""

from __future__ import annotations

import torch

# Config attributes that make logits differ from h W^T, with the value that means "off".
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The [V, D] output-embedding weight of ``model``, after checking its logits are exactly ``h W^T``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) weight")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}'s lm_head has a bias; fused scores assume logits = h W^T")
    config = getattr(model, "config", None)
    for attr, off in _LOGIT_TRANSFORMS.items():
        value = getattr(config, attr, off)
        if value is not None and value != off:
            raise ValueError(f"config.{attr}={value} changes the logits; fused scores assume logits = h W^T")
    return head.weight


def hidden_states_and_head(model: torch.nn.Module, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run only the decoder of ``model``: returns ``(last hidden states [B, T, D], lm_head weight [V, D])``."""
    weight = lm_head_weight(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, weight
