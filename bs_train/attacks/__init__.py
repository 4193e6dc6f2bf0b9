"""Did it really forget? Attacks that try to bring the forgotten knowledge back, and how much of it they recover.

Four attacks, each scored on the forget rows held out from relearning (``bs-unlearn attack``, or from Python)::

    from bs_train.attacks import AttackConfig, run_attacks
    doc = run_attacks(["runs/ga", "runs/bs_t"], original="runs/original", retain="runs/retain",
                      cfg=AttackConfig(attacks=("relearn", "quantize", "paraphrase", "sample")), out="attacks")

* ``relearn`` (``relearn.py``): a few steps of fine-tuning on a small slice of the forget set (Hu et al. 2024);
* ``quantize`` (``bs_train/quantize.py``): int8 / int4 weight-only round-to-nearest (Zhang et al. 2024);
* ``paraphrase`` (``probes.py``): TOFU's paraphrased questions, a completion prefill, a third-person framing, and a
  multiple-choice form scored by truth probability;
* ``sample`` (``probes.py``): N answers at temperature 1, the share of questions where any recovers the answer.

Recovery (``measure.py``) puts every number between the retain model (0) and the original (1) under the same attack;
a model's summary is its worst case over the attacks. ``runner.py`` runs it all; ``report.py`` writes the table and
the relearning plot.
"""

from .config import ATTACKS, AttackConfig

__all__ = ["ATTACKS", "AttackConfig", "run_attacks"]


def __getattr__(name: str):
    """``run_attacks`` is imported on first use: the CLI builds its parser from ``AttackConfig`` alone, without
    torch and the models."""
    if name == "run_attacks":
        from .runner import run_attacks

        return run_attacks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
