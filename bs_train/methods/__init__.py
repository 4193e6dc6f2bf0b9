"""Unlearning methods: each a small function over the fused per-token scores, declared once in the method table.

    registry.py   every method's forget loss, the retain terms, their set-up, the method table ``METHODS`` and the
                  presets (``PRESETS``); each loss a call of its pure function in ``bs_kernels.unlearning``
    base.py       what every method shares: the step's global counts (``Norms``), the method state, the head call
    beliefs.py    BS-S's belief sets: the model's own sampled responses to each forget prompt, drawn and regenerated
    refusals.py   IdkDPO's "I don't know" answers
    squeezing.py  the squeezing monitor: how the model's top beliefs on the forget set move during unlearning

The trainer, the recipes and the tests import the table and its helpers from here.
"""

from .base import MethodState, Norms, compute_dtype_pair, local_counts, sequence_logprob
from .registry import (CONFIGURED, METHODS, PRESETS, RETAIN_TERMS, Method, belief_config, belief_ref_logp,
                       forget_copies, forget_dpo, method_for, method_loss, needs_belief_ref_logp, needs_ref_logp,
                       needs_reference, needs_retain, needs_topk, precompute_ref_logp, preset_overrides, retain_term,
                       rmu_trainable, setup_bss, setup_dpo, setup_pdu, setup_rmu, step_pdu)

__all__ = ["CONFIGURED", "METHODS", "PRESETS", "RETAIN_TERMS", "Method", "MethodState", "Norms", "belief_config",
           "belief_ref_logp", "compute_dtype_pair", "forget_copies", "forget_dpo", "local_counts", "method_for",
           "method_loss", "needs_belief_ref_logp", "needs_ref_logp", "needs_reference", "needs_retain", "needs_topk",
           "precompute_ref_logp", "preset_overrides", "retain_term", "rmu_trainable", "sequence_logprob", "setup_bss",
           "setup_dpo", "setup_pdu", "setup_rmu", "step_pdu"]
