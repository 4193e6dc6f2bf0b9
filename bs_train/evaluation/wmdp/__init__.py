"""WMDP (Li et al. 2024) with MMLU: multiple-choice accuracy through lm-evaluation-harness on the in-memory model.
``tasks.py`` writes task configs that include lm-eval's own ``wmdp_*`` / ``mmlu`` YAML and read local JSON Lines;
``harness.py`` runs them (``HFLM`` over the loaded model); ``suite.py`` is the benchmark's evaluation.
"""

from .suite import evaluate_loaded, evaluate_model
from .tasks import MMLU_TASK, TASKS, WMDP_TASKS, write_tasks

__all__ = ["MMLU_TASK", "TASKS", "WMDP_TASKS", "evaluate_loaded", "evaluate_model", "write_tasks"]
