"""Which state of a run to keep: a criterion over the in-training evaluations, stopping rules, the trajectory.

``train.select_by=<metric>[:max|min]`` names a metric of the run's in-training evaluation
(``bs_train/evaluation/in_training.py``); without a direction, the metric's own "better" one (``agg``: max,
``forget_Q_A_Prob``: min, ...). ``Selector.record`` takes each evaluation in turn and keeps the best step: strictly
better values only, so of equal ones the earliest stands. Step 0, the model before any training step, is measured as
the trajectory's baseline and is never a candidate (a run that "selects" its starting point has unlearned nothing).
Two stopping rules read the same evaluations: ``train.select_patience=K`` (stop after K evaluations without a
better value: the patience of Hugging Face's ``EarlyStoppingCallback``) and ``train.stop_if=<metric><|><bound>``
(e.g. ``model_utility<0.3``: stop once utility collapses below the bound).

The selector's state (trajectory, best, patience count, stop reason) rides in every checkpoint, so a resumed run
keeps its best-so-far and its trajectory; ``write`` puts ``trajectory.json`` (criterion, chosen step, every
evaluation) and ``trajectory.png`` beside the run. The weights of the best state live in ``best/``
(``bs_train/selected_state.py``). Only parsing and bookkeeping here: the config validates its settings with
``check_settings`` before anything runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .evaluation.in_training import metric_directions
from .outputs import save_figure, write_json

_EVERY = re.compile(r"\s*(\d+)\s*(steps?|epochs?)?\s*")
_STOP = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*([<>])\s*(\S+)\s*")


def parse_every(text: str) -> tuple[int, str]:
    """``"50"`` / ``"50steps"`` -> (50, "steps"); ``"1epoch"`` / ``"2 epochs"`` -> (n, "epochs")."""
    m = _EVERY.fullmatch(str(text))
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"train.eval_every={text!r}: give N (steps) or N epochs, N >= 1, e.g. 50 or 1epoch")
    return int(m.group(1)), "epochs" if (m.group(2) or "").startswith("epoch") else "steps"


@dataclass(frozen=True)
class Criterion:
    """A metric and the direction that is better."""

    metric: str
    mode: str

    @classmethod
    def parse(cls, text: str, benchmark: str) -> Criterion:
        metric, _, mode = str(text).partition(":")
        known = metric_directions(benchmark)
        if metric not in known:
            raise ValueError(f"train.select_by={text!r}: {metric!r} is not a metric of the in-training {benchmark} "
                             f"evaluation; one of {sorted(known)}")
        if mode and mode not in ("max", "min"):
            raise ValueError(f"train.select_by={text!r}: the direction must be max or min, got {mode!r}")
        return cls(metric, mode or known[metric])

    def better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than

    def __str__(self) -> str:
        return f"{self.metric}:{self.mode}"


@dataclass(frozen=True)
class StopRule:
    """Stop once ``metric`` falls below (``<``) or rises above (``>``) ``bound``."""

    metric: str
    op: str
    bound: float

    @classmethod
    def parse(cls, text: str, benchmark: str) -> StopRule:
        m = _STOP.fullmatch(str(text))
        bound = None
        if m is not None:
            try:
                bound = float(m.group(3))
            except ValueError:
                bound = None
        if m is None or bound is None or not math.isfinite(bound):
            raise ValueError(f"train.stop_if={text!r}: write a metric, < or >, and a number, e.g. "
                             "model_utility<0.3")
        known = metric_directions(benchmark)
        if m.group(1) not in known:
            raise ValueError(f"train.stop_if={text!r}: {m.group(1)!r} is not a metric of the in-training {benchmark} "
                             f"evaluation; one of {sorted(known)}")
        return cls(m.group(1), m.group(2), bound)

    def hit(self, values: dict[str, float]) -> str | None:
        v = values.get(self.metric)
        if v is None or not (v < self.bound if self.op == "<" else v > self.bound):
            return None
        return f"{self.metric} {v:.4g} {self.op} {self.bound:g}"

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


def check_settings(train: Any, benchmark: str) -> None:
    """Validate the evaluation and selection settings of a ``TrainConfig`` for ``benchmark`` (one line each)."""
    if train.eval_every is not None:
        parse_every(train.eval_every)
    from .evaluation.in_training import UTILITY_BLOCKS

    bad = [s for s in train.eval_utility_splits.split(",") if s and s not in UTILITY_BLOCKS]
    if bad:
        raise ValueError(f"train.eval_utility_splits={train.eval_utility_splits!r}: {bad[0]!r} is not one of "
                         f"{tuple(UTILITY_BLOCKS)}")
    needs_eval = [name for name in ("select_by", "stop_if") if getattr(train, name) is not None]
    needs_eval += ["select_patience"] if train.select_patience else []
    needs_eval += ["export_last"] if train.export_last else []
    if needs_eval and train.eval_every is None:
        raise ValueError(f"train.{needs_eval[0]} reads the in-training evaluations: set train.eval_every too (e.g. "
                         "train.eval_every=1epoch)")
    if train.select_by is not None:
        Criterion.parse(train.select_by, benchmark)
    if train.stop_if is not None:
        StopRule.parse(train.stop_if, benchmark)
    if train.select_patience and train.select_by is None:
        raise ValueError("train.select_patience counts evaluations without a better train.select_by: set that too")
    if train.export_last and train.select_by is None:
        raise ValueError("train.export_last exports the last step beside the selected one: set train.select_by too")


class Selector:
    """The trajectory of a run's evaluations, its best step by ``criterion`` and the stopping rules' verdict."""

    def __init__(self, criterion: Criterion | None = None, *, patience: int = 0, stop_if: StopRule | None = None):
        self.criterion, self.patience, self.stop_if = criterion, patience, stop_if
        self.trajectory: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # {"step", "epoch", "value"}
        self.since_best = 0  # evaluations since the best one
        self.stopped: str | None = None  # why the run stops early, once a rule says so

    def record(self, step: int, epoch: float, values: dict[str, float], seconds: float) -> bool:
        """Add one evaluation; True when it is the new best state (the caller keeps its weights)."""
        entry = {"step": int(step), "epoch": round(float(epoch), 6), **values, "eval_s": round(seconds, 4)}
        self.trajectory = [e for e in self.trajectory if e["step"] != step] + [entry]
        if step == 0:
            return False
        new = False
        if self.criterion is not None and values.get(self.criterion.metric) is not None:
            v = float(values[self.criterion.metric])
            if self.best is None or self.criterion.better(v, self.best["value"]):
                self.best, self.since_best, new = {"step": int(step), "epoch": entry["epoch"], "value": v}, 0, True
            else:
                self.since_best += 1
                if self.patience and self.since_best >= self.patience:
                    plural = "s" if self.patience > 1 else ""
                    self.stopped = f"{self.patience} evaluation{plural} without a better {self.criterion}"
        if self.stop_if is not None and self.stopped is None:
            self.stopped = self.stop_if.hit(values)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"criterion": str(self.criterion) if self.criterion else None, "trajectory": self.trajectory,
                "best": self.best, "since_best": self.since_best, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = str(self.criterion) if self.criterion else None
        if state.get("criterion") != mine:
            raise ValueError(f"the checkpoint's selection was by {state.get('criterion')}, this run's is by {mine}")
        self.trajectory, self.best = list(state["trajectory"]), state["best"]
        self.since_best, self.stopped = int(state["since_best"]), state["stopped"]

    def document(self, **extra: Any) -> dict[str, Any]:
        """What ``trajectory.json`` holds: the criterion, the chosen step, the stop reason, every evaluation."""
        return {"criterion": str(self.criterion) if self.criterion else None, "chosen": self.best,
                "patience": self.patience or None, "stop_if": str(self.stop_if) if self.stop_if else None,
                "stopped": self.stopped, **extra, "trajectory": self.trajectory}

    def write(self, out_dir: Path, *, method: str | None = None, **extra: Any) -> tuple[Path, Path]:
        """``trajectory.json`` and ``trajectory.png`` in ``out_dir`` (rank 0 only)."""
        json_path, png_path = Path(out_dir) / "trajectory.json", Path(out_dir) / "trajectory.png"
        write_json(json_path, self.document(**extra))
        plot_trajectory(self.trajectory, png_path, chosen=self.best, criterion=self.criterion, method=method)
        return json_path, png_path


def best_of_runs(summaries: dict[float, dict[str, Any]]) -> dict[str, Any]:
    """The best (rate, step) of one method's selection runs, ``{lr: the run's summary}`` (each selected by the same
    criterion): the best value any evaluated state reached; of equal ones the first rate given. Returns ``{"lr",
    "step", "epoch", "value", "by_lr": {lr: {"step", "value"}}}``; a run whose evaluations gave no candidate counts
    as its last step with no value."""
    by_lr, mode = {}, None
    for lr, summary in summaries.items():
        sel = summary["selection"]
        mode = mode or (sel["criterion"] or "x:max").split(":")[1]
        chosen = sel["chosen"] or {"step": summary["steps"], "epoch": None, "value": None}
        by_lr[lr] = chosen
    scored = {lr: c for lr, c in by_lr.items() if c["value"] is not None}
    pick = max if mode == "max" else min
    lr = pick(scored, key=lambda k: scored[k]["value"]) if scored else next(iter(by_lr))
    return {"lr": lr, "step": by_lr[lr]["step"], "epoch": by_lr[lr]["epoch"], "value": by_lr[lr]["value"],
            "by_lr": {f"{k:g}": {"step": c["step"], "value": c["value"]} for k, c in by_lr.items()}}


# The curves of the plot: the aggregates (TOFU) or the window NLLs (MUSE, WMDP) on the left, with the criterion; the
# forget and utility side of TOFU on the right.
_LEFT = (("agg", "mem", "util"), ("forget_nll", "retain_nll"))
_RIGHT = ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "model_utility", "retain_Q_A_Prob", "extraction_strength")


def plot_trajectory(trajectory: list[dict[str, Any]], path: str | Path, *, chosen: dict | None = None,
                    criterion: Criterion | None = None, method: str | None = None) -> Path:
    """Two panels over training steps: the aggregates (and the criterion, drawn bold) and the forget / utility
    metrics, with the chosen step marked; matplotlib's Agg canvas, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not trajectory:
        raise ValueError("plot_trajectory: no evaluations")
    def present(keys):
        return [k for k in keys if any(e.get(k) is not None for e in trajectory)]

    left = next((present(g) for g in _LEFT if present(g)), [])
    target = criterion.metric if criterion else None
    left += [target] if target and target not in left and target not in _RIGHT else []
    right = present(_RIGHT)
    fig = Figure(figsize=(10 if right else 5.5, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if right else 1)
    axes = list(axes) if right else [axes]
    for ax, keys, title in zip(axes, (left, right), ("Aggregates" if "agg" in left else "Selection", "Forget and utility")):
        for key in keys:
            steps, vals = zip(*[(e["step"], e[key]) for e in trajectory if e.get(key) is not None])
            ax.plot(steps, vals, marker="o", markersize=3, linewidth=2.5 if key == target else 1.2, label=key)
        if chosen is not None:
            ax.axvline(chosen["step"], color="grey", linestyle="--", linewidth=1,
                       label=f"chosen: step {chosen['step']}")
        ax.set(xlabel="training step", title=title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="best")
    head = f"{method}: " if method else ""
    fig.suptitle(f"{head}in-training evaluation" + (f", selected by {criterion}" if criterion else ""), fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)
