"""The relearning attack: fine-tune a copy of a model for a few steps on a small slice, score the held-out rows.

Hu et al. 2024 ("Jogging the memory of unlearned LLMs via benign relearning") recover unlearned knowledge by
fine-tuning on a small part of the forget set or on related public text; Deeb & Roger 2024 score the facts that were
*not* relearned, so what comes back was still in the weights, not taught again. A model that truly forgot relearns
the held-out rows like the retain model (which never saw them), not like the original (Lynch et al. 2024).

Each relearning run is the project's own trainer (``bs_train.trainer.run``, the ``finetune`` command: NLL on the
slice through the fused losses) writing into a scratch folder; the input model's folder is only read. For the curve,
step count k is its own run of k steps from the model at a constant learning rate without warm-up: the trainer's
data order and schedule then make it exactly the first k steps of the longest run, and no callback into the
trainer is needed. Each run's weights are scored on the held-out rows and deleted.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import load_config
from .config import AttackConfig

CURVE_KEYS = ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "extraction_strength", "recovered")
DEFAULT_LR = 1e-5  # TOFU's fine-tuning learning rate (Maini et al. 2024), when the original's is unknown
ORIGINAL_LR_SHARE = 0.1  # relearn at a tenth of the original's fine-tuning lr (AttackConfig.relearn_lr says why)
ORIGINAL_KEEPS = 0.8  # below this share of its own probability under relearning, the original is being damaged


def default_lr(original: str | None) -> float:
    """``ORIGINAL_LR_SHARE`` of the original's fine-tuning lr when its run folder says it, else ``DEFAULT_LR``."""
    lr = original_lr(original)
    return ORIGINAL_LR_SHARE * lr if lr is not None else DEFAULT_LR


def damage_note(original_curve: dict[str, Any]) -> str | None:
    """A warning when relearning lowers the original's own held-out answer probability below ``ORIGINAL_KEEPS`` of
    where it started: the lr then damages the model and the curves no longer measure recovery."""
    probs = original_curve["forget_Q_A_Prob"]
    if len(probs) < 2 or probs[0] is None or min(probs[1:]) >= ORIGINAL_KEEPS * probs[0]:
        return None
    return (f"relearning at lr {original_curve['lr']:g} lowers the original's own held-out answer probability from "
            f"{probs[0]:.3g} to {min(probs[1:]):.3g}: the lr damages the model; lower --relearn-lr")


def original_lr(original: str | None) -> float | None:
    """The learning rate the original was fine-tuned with, from its run folder's config.yaml, or None."""
    if original is None:
        return None
    path = Path(original)
    path = path.parent if path.name == "final" else path
    cfg = path / "config.yaml"
    if not cfg.is_file():
        return None
    import yaml

    lr = ((yaml.safe_load(cfg.read_text()) or {}).get("train") or {}).get("lr")
    return float(lr) if lr is not None else None


def write_relearn_data(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """The relearning slice as ``{folder}/relearn.jsonl`` (question and answer only)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "relearn.jsonl").open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"question": r["question"], "answer": r["answer"]}, ensure_ascii=False) + "\n")
    return folder


def relearn_config(model_path: str, data_dir: Path, run_dir: Path, steps: int, lr: float, cfg: AttackConfig,
                   n_rows: int):
    """The trainer's ``RunConfig`` for ``steps`` relearning steps on the slice."""
    return load_config(None, [
        f"output_dir={run_dir}", f"model.path={model_path}", f"model.max_length={cfg.max_length}",
        f"data.source={data_dir}", "data.train_split=relearn", f"train.lr={lr}", f"train.max_steps={steps}",
        f"train.epochs={steps}", f"train.batch_size={min(cfg.relearn_batch_size, n_rows)}", "train.grad_accum=1",
        "train.warmup_steps=0", "train.schedule=constant", "train.weight_decay=0", f"train.seed={cfg.seed}",
        "train.checkpoint_every=0", "train.log_every=1"], command="finetune")


def relearn_curve(model_path: str, relearn_rows: list[dict[str, Any]], work: Path, cfg: AttackConfig, lr: float,
                  score: Callable[[Any, Any], dict[str, Any]], load: Callable[[str], tuple[Any, Any]],
                  step0: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"steps", "lr", "rows", <CURVE_KEYS>: [value per step], "loss": [...]}`` for the model at ``model_path``.

    ``score(model, tokenizer)`` measures the held-out rows; ``load(path)`` loads a model folder; ``step0`` is the
    model's score before relearning when the caller already has it."""
    from ..trainer import run

    data_dir = write_relearn_data(work / "data", relearn_rows)
    curve: dict[str, Any] = {"steps": list(cfg.relearn_steps), "lr": lr, "rows": len(relearn_rows),
                             **{k: [] for k in CURVE_KEYS}, "loss": []}
    for k in cfg.relearn_steps:
        if k == 0:
            res = step0 if step0 is not None else score(*load(model_path))
        else:
            run_dir = work / f"step{k}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run(relearn_config(model_path, data_dir, run_dir, k, lr, cfg, len(relearn_rows)), progress=False)
            model, tok = load(str(run_dir / "final"))
            res = score(model, tok)
            del model
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            curve["loss"] = [json.loads(ln)["loss"] for ln in lines if ln.strip()]  # the longest run's, in the end
            shutil.rmtree(run_dir, ignore_errors=True)
        for key in CURVE_KEYS:
            curve[key].append(res.get(key))
    shutil.rmtree(work, ignore_errors=True)
    return curve
