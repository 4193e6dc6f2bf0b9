"""Typed run configuration: dataclasses with one docstring per field, validated in ``__post_init__``
(``sections.py``), read from YAML plus overrides (``loading.py``).

A run is described by a ``RunConfig`` built from a YAML file plus ``key=value`` overrides (``train.lr=1e-4``,
``method.name=npo``); the resolved config is written beside the run's outputs (``config.yaml``), so every result
can be traced to the exact settings that produced it. Defaults follow the paper's code: lr 1e-5, 10 epochs on TOFU,
effective batch 32, lambda_BST 0.2, k 20, gamma = alpha = 1. Every method default names its source: "paper" is the
BS paper (LLM Unlearning with LLM Beliefs, ICLR 2026), "fork" the authors' kemoulee/open-unlearning (branch dev)
configs/trainer/{BST,BSS}.yaml, "OU" locuslab/open-unlearning configs/trainer/<Method>.yaml; "ours" says why.
``load_config(..., preset="open-unlearning")`` applies ``methods.PRESETS`` (the references' reductions and settings).
"""

from .loading import RESOLVED_HEADER, apply_overrides, build_config, is_resolved_config, load_config
from .sections import (ALTPO_ROWS, BENCHMARKS, BSS_BASES, BSS_REGEN, KL_POSITIONS, MEMORY_PLANS, METHODS, OPTIMIZERS,
                       PDU_POSITIONS, PRESETS, REDUCTIONS, RETAIN_TERMS, RMU_PARAMS, SCHEDULES, SECTIONS,
                       SPLIT_DEFAULTS, TEXT_BENCHMARKS, UNDIAL_POSITIONS, WINDOW_DEFAULTS, DataConfig, MethodConfig,
                       ModelConfig, RunConfig, TrainConfig)

__all__ = ["ALTPO_ROWS", "BENCHMARKS", "BSS_BASES", "BSS_REGEN", "KL_POSITIONS", "MEMORY_PLANS", "METHODS",
           "OPTIMIZERS", "PDU_POSITIONS", "PRESETS", "REDUCTIONS", "RESOLVED_HEADER", "RETAIN_TERMS", "RMU_PARAMS",
           "SCHEDULES", "SECTIONS", "SPLIT_DEFAULTS", "TEXT_BENCHMARKS", "UNDIAL_POSITIONS", "WINDOW_DEFAULTS",
           "DataConfig", "MethodConfig", "ModelConfig", "RunConfig", "TrainConfig", "apply_overrides",
           "build_config", "is_resolved_config", "load_config"]
