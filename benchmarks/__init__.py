"""Benchmarks of bs-unlearn, run from the repository root as modules: ``python -m benchmarks.bench_losses ...``.

A package (not scripts on ``sys.path``) so that the scripts share ``benchmarks.common`` and the tests import them by
their full names. ``benchmarks/README.md`` says what each measures; committed results live in ``benchmarks/results/``.
"""
