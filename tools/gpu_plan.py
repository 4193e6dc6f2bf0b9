"""The GPU machines a session may be lent, and whether each prepared job fits one session on them, checked here.

The workplace's ``device`` tool lends an H100 80 GB by default (kind ``nvidia-h100-x1``) and an H200 (~140 GiB,
``nvidia-h200``) only when a call names it; a session gets 15 minutes of device time in all (starts, transfers,
idle waits and give-backs included), 10 minutes per command, 64 MiB carried per call (its README). The jobs of
``tools/gpu_job.py`` are written to run unchanged on either: the benchmarks read the GPU's memory at run time and
choose their cases from it (``benchmarks/bench_train_step.planned_cases``), and results are filed under the
device's own folder. What this module adds is the arithmetic a lead needs before spending a session:

* ``session_plan(job, kind)``: the exact tool calls of a job, each call's worst-case seconds (its own internal
  deadline, not its ``timeout_s``), plus the machine's start and the transfers, against the 15 minutes;
* ``kind_report(kind)``: that for both jobs, the 8B train-step cases the kind's memory admits, and the TOFU
  recipe's time plan on that GPU (``bs-unlearn recipe --plan --plan-gpu``).

    python -m tools.gpu_job plan bench                    # the default kind; --kind nvidia-h200 for the other
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Kind:
    """A machine the device tool lends (its README.md and KINDS.md)."""

    name: str
    """The tool's kind, as ``run(kind=...)`` takes it."""
    gpu: str
    """What ``torch.cuda.get_device_name()`` reports there."""
    gpu_memory_gib: float
    """Total GPU memory (nvidia-smi as KINDS.md records it)."""
    host_memory_gib: float
    """Host memory."""
    plan_gpu: str
    """Its key in ``bs_train.recipes.plan.GPUS`` (the recipe's time model)."""


KINDS = {
    # 81559 MiB (KINDS.md, 2026-11-13); a call that names no kind gets this one
    "nvidia-h100-x1": Kind("nvidia-h100-x1", "NVIDIA H100 80GB HBM3", 79.6, 128.0, "h100"),
    # 143771 MiB (KINDS.md, 2026-10-27); only when a call names it
    "nvidia-h200": Kind("nvidia-h200", "NVIDIA H200", 140.4, 128.0, "h200"),
}
DEFAULT_KIND = "nvidia-h100-x1"

SESSION_S = 900
"""Device time of one session, everything included (device README, "Limits")."""
COMMAND_S = 600
"""One command's limit (``timeout_s`` at most)."""
START_S = 180
"""A machine's start and the first call's transfers (ours: the README says a minute or more; 3 minutes assumed). A
failed start of the default kind falls back to an H200 after 1-2 more minutes: ``margin_s`` says whether a job
survives that."""
TRANSFER_S = 20
"""Copies of one later call (the repository, <= 64 MiB carried, <= 64 MiB back; ours)."""
FALLBACK_S = 120
"""What a failed start of the default kind costs before the tool starts an H200 (device README: 1 to 2 minutes)."""


@dataclass(frozen=True)
class Call:
    """One tool call of a job: what to pass to ``run`` and the most seconds it can take there."""

    command: str
    carry: tuple
    timeout_s: int
    worst_s: float
    """Its own deadline plus what runs around it (wheels installed, results packed)."""


def job_calls(job: str) -> list[Call]:
    """The calls of ``job`` (``bench``: one; ``tofu``: two, the second at once after the first)."""
    from tools import gpu_job as g

    if job == "bench":
        # the stages' deadline, plus the wheels' install (~10 s) and the last tarball (~5 s), with room
        return [Call("python3 -m tools.gpu_job run bench", (".carry/bench",), g.BENCH_TIMEOUT_S,
                     g.BENCH_DEADLINE_S + 40)]
    if job == "tofu":
        return [Call("python3 -m tools.gpu_job stage tofu", (".carry/tofu1",), 120, 30),  # copies ~50 MB
                Call("python3 -m tools.gpu_job run tofu", (".carry/tofu2",), COMMAND_S, g.TOFU_CALL_S)]
    raise ValueError(f"job must be bench or tofu, got {job!r}")


def session_plan(job: str, kind: str = DEFAULT_KIND) -> dict:
    """The calls of ``job`` on ``kind`` and their worst-case device seconds, start included, against a session.

    ``fits``: within ``SESSION_S`` with every call's worst case under its ``timeout_s`` and the command limit; each
    call's ``needs_left_s``: the device time that must be left before it for it and the calls after it to fit;
    ``survives_fallback``: still within it after a failed start of the default kind (irrelevant for an H200 named)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    calls = job_calls(job)
    seconds = START_S + sum(c.worst_s for c in calls) + TRANSFER_S * (len(calls) - 1)
    # device time a session must still have before each call (the reply's lease.budget_left_s) for the rest to fit
    needs_left = [sum(c.worst_s + TRANSFER_S for c in calls[i:]) for i in range(len(calls))]
    needs_left[0] += START_S - TRANSFER_S
    ok_calls = all(c.worst_s <= c.timeout_s <= COMMAND_S for c in calls)
    fallback = FALLBACK_S if kind == DEFAULT_KIND else 0
    return {"job": job, "kind": kind, "calls": [{**asdict(c), "needs_left_s": n} for c, n in zip(calls, needs_left)],
            "seconds": seconds,
            "session_s": SESSION_S, "margin_s": SESSION_S - seconds, "fits": ok_calls and seconds <= SESSION_S,
            "survives_fallback": ok_calls and seconds + fallback <= SESSION_S,
            "assumed": {"start_s": START_S, "transfer_s": TRANSFER_S, "fallback_s": fallback}}


def train_step_cases(kind: str) -> list[dict]:
    """The 8B train-step cases ``bench_train_step`` runs on ``kind`` (chosen from its memory) and why not the rest."""
    from benchmarks.bench_train_step import BATCH, planned_cases
    from benchmarks.common import MODEL_PRESETS

    k = KINDS[kind]
    return planned_cases(MODEL_PRESETS["gpu"], BATCH["gpu"], k.gpu_memory_gib, k.host_memory_gib)


def tofu_time_plan(kind: str) -> dict:
    """``bs-unlearn recipe --plan`` with the tofu job's arguments on ``kind``'s GPU: total seconds and the verdict."""
    from bs_train.cli import main
    from tools.gpu_job import TOFU_ARGS, TOFU_CAP_S

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["recipe", "--data", str(Path(tmp) / "stats"), "--out", tmp, "--plan", "--plan-gpu",
                     KINDS[kind].plan_gpu, "--budget-s", str(TOFU_CAP_S), *TOFU_ARGS])
    text = out.getvalue()
    total = float(text.split("  total ")[1].split(" s")[0])
    return {"gpu": KINDS[kind].gpu, "seconds": total, "budget_s": TOFU_CAP_S, "fits": code == 0}


def kind_report(kind: str) -> dict:
    """Everything ``kind`` would be asked to do, checked without it: both jobs' session plans, the train-step cases
    its memory admits, and the TOFU recipe's time plan on its GPU."""
    return {"kind": asdict(KINDS[kind]), "bench": session_plan("bench", kind), "tofu": session_plan("tofu", kind),
            "train_step_cases": train_step_cases(kind), "tofu_time_plan": tofu_time_plan(kind)}
