"""LoRA unlearning through PEFT: adapters injected in place, the frozen base as the reference, adapter-only state.

``apply_lora`` injects LoRA layers into the Hugging Face model itself (``peft.inject_adapter_in_model``: no
``PeftModel`` wrapper), so everything that reads the model (``LossHead``, ``decoder_blocks``, the belief sampler,
``fully_shard`` per block, gradient checkpointing) sees the same module tree with each targeted ``nn.Linear``
replaced by a LoRA layer; the lm_head is never targeted, so the fused losses read the frozen lm_head weight as before.
Only the adapters train (fp32 master weights, whatever the base dtype: PEFT's own default upcast).

The reference that NPO / KL / RMU compare with is the base model: ``AdaptersOff(head)`` runs the trained model's
root with every adapter switched off (PEFT's ``disable_adapter`` mechanism: ``BaseTunerLayer.enable_adapters(False)``
on each layer), so no second copy of the weights exists. Checkpoints keep only the trainable parameters
(``checkpoint.py`` asks ``trainable_only``), and the export writes both the merged model (a plain Hugging Face folder,
W + (alpha / r) B A per layer, loadable without peft) and the adapter alone (``adapter/``, loadable with
``peft.PeftModel.from_pretrained``).
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch

ADAPTER = "default"  # PEFT's adapter name; one adapter per run


def _tuner_layer():
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def lora_config(model_cfg, target_modules=None):
    """The ``peft.LoraConfig`` of a ``ModelConfig`` (``target_modules`` overrides ``model.lora_targets``)."""
    from peft import LoraConfig

    targets = target_modules if target_modules is not None else model_cfg.lora_targets
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    alpha = model_cfg.lora_alpha if model_cfg.lora_alpha is not None else float(model_cfg.lora_rank)
    return LoraConfig(r=model_cfg.lora_rank, lora_alpha=alpha, lora_dropout=model_cfg.lora_dropout,
                      target_modules=targets, bias="none")


def apply_lora(lm: torch.nn.Module, model_cfg, target_modules=None) -> torch.nn.Module:
    """Inject LoRA adapters into ``lm`` in place and freeze everything else. B starts at zero (PEFT's init), so the
    adapted model equals the base until the first step. Raises ValueError when no module matches the targets."""
    try:
        from peft import inject_adapter_in_model
    except ImportError as e:
        raise ValueError(f"model.lora_rank={model_cfg.lora_rank} needs peft: pip install peft ({e})") from None
    config = lora_config(model_cfg, target_modules)
    try:
        inject_adapter_in_model(config, lm, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"model.lora_targets={model_cfg.lora_targets!r}: {e}") from None
    for name, p in lm.named_parameters():
        lora = ".lora_" in name
        p.requires_grad_(lora)
        if lora and p.dtype != torch.float32:  # fp32 adapter masters over bf16 base weights: exact small updates
            p.data = p.data.float()
    lm._bs_lora_config = config  # plain attribute (not a module): read by the adapter export
    return lm


def adapter_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Every PEFT tuner layer under ``module`` (empty for a model without adapters)."""
    try:
        layer_cls = _tuner_layer()
    except ImportError:
        return []
    return [m for m in module.modules() if isinstance(m, layer_cls)]


def has_adapters(module: torch.nn.Module) -> bool:
    return any(".lora_" in name for name, _ in module.named_parameters())


@contextmanager
def adapters_disabled(module: torch.nn.Module):
    """Run ``module`` as its base model: every adapter off inside, restored after. This is the flag
    ``PeftModel.disable_adapter`` sets (``BaseTunerLayer.disable_adapters``), on a model not wrapped in a
    ``PeftModel``. It is set directly rather than through ``enable_adapters``, which also rewrites every adapter's
    ``requires_grad``: switching back on would unfreeze the adapters RMU froze, mid-step (a checkpointed block would
    then recompute a different graph), and flip flags FSDP2 read when it sharded them."""
    layers = adapter_layers(module)
    was = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, off in zip(layers, was):
            layer._disable_adapters = off


class AdaptersOff:
    """The frozen reference of a LoRA run: the trained root ``head`` called with its adapters off and no grad.

    Called like a ``LossHead``: ``ref(input_ids, attention_mask, fn, layer=None)``. It holds no weights of its own
    and is not an ``nn.Module`` (the head is not registered twice); under FSDP2 it runs the same sharded root, so
    every rank joins the same collectives."""

    def __init__(self, head: torch.nn.Module):
        self.head = head

    def __call__(self, input_ids, attention_mask, fn, layer: int | None = None):
        with torch.no_grad(), adapters_disabled(self.head):
            return self.head(input_ids, attention_mask, fn, layer)

    def eval(self):  # what callers of a reference module may ask of it
        return self


def rmu_adapters(lm: torch.nn.Module, layers: list[int] | None) -> list[str]:
    """RMU over adapters: leave trainable only the ``mlp.down_proj`` adapters of decoder layers ``layers``, or every
    adapter (``layers=None``). Returns the trainable names; ValueError if none matches."""
    if layers is None:
        pattern = re.compile(rf".*\.lora_[AB]\.{ADAPTER}\.weight")
    else:
        where = "|".join(str(i) for i in layers)
        pattern = re.compile(rf"(.*\.)?layers\.({where})\.mlp\.down_proj\.lora_[AB]\.{ADAPTER}\.weight")
    keep = [name for name, _ in lm.named_parameters() if pattern.fullmatch(name)]
    if not keep:
        raise ValueError(f"method.rmu_params=down_proj with LoRA: no adapter of layers {layers} matches "
                         f"{pattern.pattern!r}; add down_proj to model.lora_targets or use method.rmu_params=all")
    for name, p in lm.named_parameters():
        p.requires_grad_(name in keep)
    return keep


def lora_scalings(lm: torch.nn.Module) -> dict[str, float]:
    """``{module name: alpha / r}`` of every LoRA layer (its scaling of B A)."""
    layers = set(map(id, adapter_layers(lm)))
    return {name: float(m.scaling[ADAPTER]) for name, m in lm.named_modules() if id(m) in layers}


def merged_state_dict(sd: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """A plain model's state dict from a full LoRA state dict: ``W = W_base + scale B A`` (computed in fp32, stored
    in the base dtype) under the base layer's own name; every other tensor unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".lora_" in key:
            continue
        module, _, leaf = key.rpartition(".")
        if module.endswith(".base_layer"):
            name = module.removesuffix(".base_layer")
            a, b = sd[f"{name}.lora_A.{ADAPTER}.weight"], sd[f"{name}.lora_B.{ADAPTER}.weight"]
            if leaf == "weight":
                value = (value.float() + scalings[name] * (b.float() @ a.float())).to(value.dtype)
            out[f"{name}.{leaf}"] = value
        else:
            out[key] = value
    return out


def save_adapter(lm: torch.nn.Module, sd: dict[str, torch.Tensor], out: Path, base_path: str) -> None:
    """The adapter alone, as PEFT writes it (``adapter_model.safetensors`` + ``adapter_config.json``), so
    ``PeftModel.from_pretrained(base, out)`` loads it over the base model ``base_path``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    adapter = {"base_model.model." + k.replace(f".{ADAPTER}.", "."): v.contiguous()
               for k, v in sd.items() if ".lora_" in k}
    save_file(adapter, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = lm._bs_lora_config.to_dict()
    config.update(base_model_name_or_path=base_path, task_type="CAUSAL_LM")
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
