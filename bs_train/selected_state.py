"""Evaluation during training and checkpoint selection as the trainer holds them (``train.eval_every``,
``train.select_by``): when to evaluate, where the best state's weights are kept, and the export of the chosen step.

* ``InTrainingSelection.build``, before the model loads: the evaluation's rows are read and encoded
  (``evaluation/in_training.py``) and every metric ``select_by`` / ``stop_if`` names is checked to be one it will
  report, so a bad setting or split fails in one line before any heavy work;
* ``start``: the cadence in steps (N steps, or N epochs of the data sampler), the selector's state from a resumed
  checkpoint (trajectory, best-so-far, patience count), and best states a killed run left beyond it removed;
* ``evaluate`` at step 0 (the baseline), every ``eval_every`` and at the last step, on every rank: a new best's
  weights are copied to host memory (``snapshot``: each rank its own FSDP2 shards, the adapters alone with LoRA; no
  rank gathers the whole model), a copy of the weights rather than a write: a run without checkpoints never writes
  a best state at all;
* ``before_checkpoint``: the best state a checkpoint will name is put on disk first, if it is not yet, as
  ``best/step_N`` (``torch.distributed.checkpoint`` of the model alone, sharded, kill-safe as a checkpoint is:
  written beside, a manifest last, renamed); the selector's state rides in the checkpoint, and ``best/`` keeps
  every state a checkpoint on disk names, so whichever checkpoint a resume falls back to finds its best state;
* ``before_export``: the last step exported as ``last/`` when ``train.export_last``, then the best weights put into
  the model (from memory, or ``best/`` after a resume), which the trainer exports as ``final/``; ``summary`` and
  ``write`` (rank 0) say what was chosen and what it cost.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from .checkpoint import (_check_space, _model_options, _tensor_bytes, barrier, damage, dcp_call, export_hf,
                         fault_point, finish_before_interrupt, write_manifest)
from .evaluation import in_training
from .selection import Criterion, Selector, StopRule, parse_every

BEST = "best"
_STEP = re.compile(r"step_(\d{7})")


def best_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / BEST / f"step_{step:07d}"


def save_best(run_dir: Path, step: int, head: torch.nn.Module, rank: int) -> Path:
    """The model's weights now (trainable ones only with LoRA, as checkpoints) to ``best/step_N``, on every rank;
    a complete one of the same step already there is kept (a resumed run re-reaching it holds the same state).
    Ctrl-C during it lets it finish first, as a checkpoint's save does."""
    with finish_before_interrupt(f"the best state of step {step}"):
        return _save_best(run_dir, step, head, rank)


def _save_best(run_dir: Path, step: int, head: torch.nn.Module, rank: int) -> Path:
    final = best_path(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    state = {"model": get_model_state_dict(head, options=_model_options(head))}
    _check_space(final.parent, _tensor_bytes(state), next(head.parameters()).device)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp_call(dcp.save, state, tmp)
    barrier()
    if rank == 0:
        write_manifest(tmp, step=step)
        if final.exists() and damage(final) is None:
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        fault_point("best:saved")
    barrier()
    return final


def load_best(path: Path, head: torch.nn.Module) -> None:
    """Put the weights of a ``save_best`` folder into ``head`` (every rank; checked against its manifest first)."""
    why = damage(path)
    if why is not None:
        raise ValueError(f"the selected state {path} is damaged ({why}); rerun with --no-resume to train again")
    options = _model_options(head)
    state = {"model": get_model_state_dict(head, options=options)}
    dcp_call(dcp.load, state, path)
    set_model_state_dict(head, state["model"], options=options)


def snapshot(head: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's share of the trainable weights (its FSDP2 shards; with LoRA the adapters), copied to host
    memory. Frozen weights never change, so they are not copied."""
    return {name: (p.to_local() if hasattr(p, "to_local") else p).detach().to("cpu", copy=True)
            for name, p in head.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore(head: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy a ``snapshot`` back into the model's (sharded) parameters, in place."""
    for name, p in head.named_parameters():
        if name in weights:
            (p.to_local() if hasattr(p, "to_local") else p).copy_(weights[name])


def _steps(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP.fullmatch(p.name))) \
        if folder.is_dir() else []


def named_by_checkpoints(run_dir: Path) -> set[int]:
    """The best steps that the run's checkpoints on disk recorded (any of them may be the one a resume uses)."""
    named = set()
    for step in _steps(Path(run_dir) / "checkpoints"):
        try:
            meta = torch.load(Path(run_dir) / "checkpoints" / f"step_{step:07d}" / "trainer_state.pt",
                              weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged checkpoint is never resumed from; its best is not needed
            continue
        best = ((meta.get("extra") or {}).get("selection") or {}).get("best")
        if best:
            named.add(int(best["step"]))
    return named


def prune(run_dir: Path, keep: set[int], *, after: int | None = None) -> None:
    """Remove the best states not in ``keep`` (and any of a step past ``after``: what a killed run measured after
    the checkpoint this one resumes from), and cut-off ``.tmp`` saves. Rank 0 only."""
    folder = Path(run_dir) / BEST
    for step in _steps(folder):
        if step not in keep or (after is not None and step > after):
            shutil.rmtree(best_path(run_dir, step), ignore_errors=True)
    for stale in folder.glob("step_*.tmp") if folder.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)


class InTrainingSelection:
    """A run's in-training evaluation, its selector and its best state."""

    def __init__(self, cfg: Any, evaluator: in_training.InTrainingEval, run_dir: Path):
        t = cfg.train
        self.cfg, self.evaluator, self.run_dir = cfg, evaluator, Path(run_dir)
        self.n, self.unit = parse_every(t.eval_every)
        benchmark = cfg.data.benchmark
        self.selector = Selector(Criterion.parse(t.select_by, benchmark) if t.select_by else None,
                                 patience=t.select_patience,
                                 stop_if=StopRule.parse(t.stop_if, benchmark) if t.stop_if else None)
        self.every, self.steps_per_epoch, self.total, self.plot_s = self.n, 1, 0, 0.0
        self.weights: dict[str, torch.Tensor] | None = None  # the best state's snapshot, this rank's share
        self.on_disk: int | None = None  # the step whose state best/ holds for this run
        self.persist_s = 0.0  # seconds spent writing best states to disk

    @classmethod
    def build(cls, cfg: Any, tokenizer: Any, run_dir: Path, main_set: Any, retain_set: Any,
              impl: str) -> InTrainingSelection | None:
        """None when ``train.eval_every`` is off. Reads the evaluation's data now and checks the metrics named."""
        if cfg.train.eval_every is None:
            return None
        evaluator = in_training.build(cfg, tokenizer, run_dir, main_set, retain_set, impl)
        names = evaluator.names()
        for setting in ("select_by", "stop_if"):
            text = getattr(cfg.train, setting)
            metric = re.split(r"[:<>]", text)[0].strip() if text else None
            if metric is not None and metric not in names:
                why = "; ".join(evaluator.notes) or "not measured on this data"
                raise ValueError(f"train.{setting}={text!r}: this run's evaluation does not measure {metric} ({why})")
        return cls(cfg, evaluator, run_dir)

    def start(self, steps_per_epoch: int, total: int, extra: dict, step: int, rank: int) -> None:
        """Set the cadence (``total``: the steps of the whole schedule) and take over a resumed checkpoint's
        selection; drop best states it does not know."""
        self.steps_per_epoch, self.total = steps_per_epoch, total
        self.every = self.n * (steps_per_epoch if self.unit == "epochs" else 1)
        if "selection" in extra:
            self.selector.load_state_dict(extra["selection"])
            self.persist_s = float(extra["selection"].get("persist_s", 0.0))
            if self.selector.best is not None:  # put on disk before its checkpoint was written
                self.on_disk = int(self.selector.best["step"])
                why = damage(best_path(self.run_dir, self.on_disk))
                if why is not None:  # said now, not after the rest of the run
                    raise ValueError(f"the checkpoint's selected state {best_path(self.run_dir, self.on_disk)} is "
                                     f"unusable ({why}); start over with --no-resume (the old run is set aside)")
        if rank == 0:
            prune(self.run_dir, self._keep(), after=step)
        barrier()

    def _keep(self) -> set[int]:
        best = self.selector.best
        return named_by_checkpoints(self.run_dir) | ({int(best["step"])} if best else set())

    def due(self, step: int, end: int) -> bool:
        return step % self.every == 0 or step == end

    @property
    def stopped(self) -> str | None:
        return self.selector.stopped

    def evaluate(self, step: int, head: torch.nn.Module, lm: torch.nn.Module, *, rank: int, world: int,
                 autocast=None) -> tuple[dict[str, float], float]:
        """Measure the model at ``step`` on every rank; keep its weights if it is the new best. Returns (metrics,
        seconds)."""
        t0 = time.perf_counter()
        with autocast if autocast is not None else nullcontext():
            values = self.evaluator(head, lm, rank=rank, world=world)
        seconds = time.perf_counter() - t0
        if self.selector.record(step, step / self.steps_per_epoch, values, seconds):
            t1 = time.perf_counter()
            self.weights = snapshot(head)
            self.selector.trajectory[-1]["save_s"] = round(time.perf_counter() - t1, 4)  # what keeping it cost
        if rank == 0:
            self.write(plot=False)
        return values, seconds

    def state_dict(self) -> dict[str, Any]:
        return {**self.selector.state_dict(), "persist_s": self.persist_s}

    def postfix(self) -> dict[str, str]:
        """The progress line's view of the last evaluation: the selection metric (else Agg.) and the best step."""
        sel = self.selector
        if not sel.trajectory:
            return {}
        metric, latest = sel.criterion.metric if sel.criterion else "agg", sel.trajectory[-1]
        out = {metric: f"{latest[metric]:.3f}"} if latest.get(metric) is not None else {}
        return {**out, "best": f"step {sel.best['step']}"} if sel.best else out

    def before_checkpoint(self, head: torch.nn.Module, rank: int) -> None:
        """Put the best state on disk (``best/step_N``) unless it is there: the checkpoint about to be written names
        it. The model's current weights are set aside in host memory meanwhile and put back exactly."""
        best = self.selector.best
        if best is None or self.on_disk == best["step"] or self.weights is None:
            return
        t0, current = time.perf_counter(), snapshot(head)
        restore(head, self.weights)
        try:
            save_best(self.run_dir, int(best["step"]), head, rank)
        finally:
            restore(head, current)
        self.on_disk = int(best["step"])
        self.persist_s += time.perf_counter() - t0

    def after_checkpoint(self, rank: int) -> None:
        """Once a checkpoint is saved (and older ones rotated out), only the best states still named are kept."""
        if rank == 0:
            prune(self.run_dir, self._keep())

    def before_export(self, head: torch.nn.Module, tokenizer: Any, rank: int, step: int) -> None:
        """``last/`` when asked, then the best state's weights into ``head`` for the export of ``final/``."""
        best = self.selector.best
        if self.cfg.train.export_last:
            export_hf(head, tokenizer, self.run_dir / "last", rank, base_path=self.cfg.model.path)
        if best is not None and best["step"] != step:
            if self.weights is not None:
                restore(head, self.weights)
            else:  # chosen before a resume: on disk since its checkpoint
                load_best(best_path(self.run_dir, best["step"]), head)

    def summary(self, step: int) -> dict[str, Any]:
        """What summary.json says of the selection: the criterion and chosen step, and the seconds it added
        (``eval_s`` the evaluations, ``save_s`` keeping the best states, ``plot_s`` the final plot)."""
        sel = self.selector
        return {"criterion": str(sel.criterion) if sel.criterion else None, "chosen": sel.best,
                "last_step": step, "schedule_steps": self.total, "steps_per_epoch": self.steps_per_epoch,
                "stopped": sel.stopped,
                "evaluations": len(sel.trajectory),
                "eval_s": round(sum(e["eval_s"] for e in sel.trajectory), 3),
                "save_s": round(sum(e.get("save_s", 0.0) for e in sel.trajectory) + self.persist_s, 3),
                "plot_s": self.plot_s,
                "exported": ("final/ = the chosen step" if sel.best else "final/ = the last step")
                + (", last/ = the last step" if self.cfg.train.export_last else "")}

    def write(self, *, plot: bool = True, step: int | None = None) -> None:
        """``trajectory.json`` (and ``trajectory.png`` with ``plot``) beside the run; rank 0 only."""
        t = self.cfg.train
        extra = {"settings": {"eval_every": t.eval_every, "every_steps": self.every, "rows": t.eval_rows,
                              "split": t.eval_split or self.cfg.data.forget_split,
                              "utility_splits": t.eval_utility_splits, "max_new_tokens": t.eval_max_new_tokens,
                              "steps_per_epoch": self.steps_per_epoch},
                 "notes": self.evaluator.notes, "last_step": step}
        if plot and self.selector.trajectory:
            t0 = time.perf_counter()
            self.selector.write(self.run_dir, method=self.cfg.method.name, **extra)
            self.plot_s = round(time.perf_counter() - t0, 3)
        else:
            from .outputs import write_json

            write_json(self.run_dir / "trajectory.json", self.selector.document(**extra))
