"""bs_train: the unlearning trainer, methods, belief sampler, data and evaluation built on ``bs_kernels``.

The command line is ``bs-unlearn`` (``bs_train.cli``): ``finetune``, ``unlearn``, ``eval``, ``compare``, ``demo``
and ``recipe``. The modules are imported by name (``from bs_train.trainer import run``); nothing is re-exported here,
so importing the package loads nothing heavy. The import direction is fixed: ``bs_train`` imports ``bs_kernels``,
never the reverse. The "Layout" table of docs/development/index.md says which module holds what.
"""
