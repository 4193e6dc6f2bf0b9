"""Evaluation: one package, a room per benchmark, sharing the model-facing pieces.

Shared by every benchmark: ``scoring.py`` (per-token log-probs and vocabulary statistics on the fused scores, no
logits held), ``generation.py`` (greedy or sampled text through the project's sampler, HF ``generate`` otherwise),
``metrics.py`` (the model-free formulas, each with its source), ``judge.py`` (similarity and fluency) and
``report.py`` (the markdown tables); ``in_training.py`` (the light evaluation a run makes of itself while it trains,
``train.eval_every``) over ``sharded.py`` (scoring and greedy answers on every rank, rows split, the model kept
sharded). Each benchmark's data, metrics and suite sit in its own subpackage:
``tofu/``, ``muse/`` and ``wmdp/`` (WMDP and MMLU accuracies through lm-evaluation-harness).
"""
