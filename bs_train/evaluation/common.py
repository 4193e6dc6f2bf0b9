"""What every benchmark's suite does the same way: load a model for evaluation, and bound a data source's splits.

* ``load_eval_model(spec, device=, dtype=)``: a run folder (its ``final/``), model folder, ``smollm2-135m``, ``tiny``
  or Hub id, in eval mode: bf16 on CUDA and fp32 elsewhere unless a dtype is named; no liger patching (evaluation
  reads the model as it is);
* ``resolve_device(spec)``: ``auto`` (CUDA when there is one) or a device name.
"""

from __future__ import annotations

import os

import torch

from ..model import load_model, resolve_model_path


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else as named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_eval_model(spec: str | os.PathLike[str], *, device: str | torch.device = "auto", dtype: str = "auto"):
    """``(model in eval mode, tokenizer)`` of a run folder, model folder, ``smollm2-135m``, ``tiny`` or Hub id."""
    dev = resolve_device(device)
    dt = (torch.bfloat16 if dev.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    model, tok = load_model(resolve_model_path(spec), dtype=dt, device=dev, use_liger=False)
    return model.eval(), tok
