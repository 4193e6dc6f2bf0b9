"""The optimizer and the learning-rate schedule of a run, from its ``TrainConfig``: AdamW in one of three memory plans,
weight decay with Hugging Face's Trainer's exemptions when asked, and the warm-up and decay of each schedule
(``train.schedule``), open-unlearning's conversion of warm-up epochs to steps included."""

from __future__ import annotations

import math
import re

import torch

from .config import TrainConfig

# Hugging Face's Trainer leaves these out of weight decay (Trainer.get_decay_parameter_names' name patterns)
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def optimizer_params(module: torch.nn.Module, train: TrainConfig) -> list:
    """The trainable parameters of ``module``, or with ``train.decay_exempt=bias_norm`` two groups: those the weight
    decay applies to and the biases and norm weights it skips (by name, as Hugging Face's Trainer)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if train.decay_exempt == "none":
        return [p for _, p in named]
    exempt = [_NO_DECAY.search(n.lower()) is not None for n, _ in named]
    return [{"params": [p for (_, p), e in zip(named, exempt) if not e]},
            {"params": [p for (_, p), e in zip(named, exempt) if e], "weight_decay": 0.0}]


def build_optimizer(params, train: TrainConfig, use_cuda: bool) -> torch.optim.Optimizer:
    """AdamW in one of three memory plans (see ``TrainConfig.optimizer``); torchao is imported only when asked."""
    t = train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=use_cuda or None)
    try:
        from torchao.optim import AdamW8bit, _AdamW
    except ImportError as e:
        raise ValueError(f"train.optimizer={t.optimizer} needs torchao: pip install torchao ({e})") from None
    cls = AdamW8bit if t.optimizer == "adamw8bit" else _AdamW
    return cls(params, lr=t.lr, weight_decay=t.weight_decay, bf16_stochastic_round=True)


def warmup_steps(train: TrainConfig, rows: int, world: int) -> int:
    """``train.warmup_steps``, or with ``train.warmup_epochs`` > 0 open-unlearning's conversion of epochs to steps
    (src/trainer/__init__.py: int(epochs x rows // (batch x accumulation x devices)))."""
    t = train
    if t.warmup_epochs > 0:
        return int(t.warmup_epochs * rows // (t.batch_size * t.grad_accum * world))
    return t.warmup_steps


def lr_lambda(train: TrainConfig, total_steps: int, warm: int | None = None):
    """The learning-rate factor of each step (``train.schedule``) after ``warm`` warm-up steps (default
    ``train.warmup_steps``)."""
    warm, kind = train.warmup_steps if warm is None else warm, train.schedule

    def f(step: int) -> float:
        if step < warm:
            if kind == "hf_linear":  # transformers' get_linear_schedule_with_warmup: the first step at rate 0
                return step / max(1, warm)
            return (step + 1) / (warm + 1)
        frac = (step - warm) / max(1, total_steps - warm)
        if kind == "hf_linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warm))
        if kind == "linear":
            return max(0.0, 1.0 - frac)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
        return 1.0

    return f
