"""Resumable checkpoints and the final Hugging Face export of a training run.

A checkpoint is ``torch.distributed.checkpoint`` of the model and optimizer state (sharded under FSDP2) plus, per
rank, its RNG states and, on rank 0, the scheduler, data position, method extras (BS-S beliefs, the squeezing curve)
and the run's config. It is written to ``step_N.tmp`` and renamed, and ``latest`` is replaced atomically, so a
checkpoint either exists whole or not at all; the two newest are kept. ``check_resumable`` lets a checkpoint resume
only the run that wrote it; ``set_aside`` moves an old run away (never deletes it) for a fresh start; ``export_hf``
gathers the full weights on rank 0 and writes safetensors. A LoRA run (``bs_train/lora.py``) checkpoints only its
trainable parameters (the adapters; the frozen base is reloaded from ``model.path``) and exports the merged model
plus the adapter alone in ``final/adapter/``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_state_dict)

from .config import RunConfig
from .lora import has_adapters, lora_scalings, merged_state_dict, save_adapter
from .model import LossHead


def _model_options(head) -> StateDictOptions:
    """What a checkpoint holds of the model: every parameter, or with LoRA only the trainable ones (the adapters)."""
    lora = has_adapters(head)
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(run_dir: Path, step: int, head, optim, sched, sampler, rank: int, world: int,
                    extra: dict | None = None, config: dict | None = None) -> Path:
    ckpt_root = run_dir / "checkpoints"
    final, tmp = ckpt_root / f"step_{step:07d}", ckpt_root / f"step_{step:07d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    opts = _model_options(head)
    state = {"model": get_model_state_dict(head, options=opts), "optim": get_optimizer_state_dict(head, optim)}
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save({"rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save({"step": step, "world": world, "sched": sched.state_dict(), "sampler": sampler.state_dict(),
                    "extra": extra or {}, "config": config}, tmp / "trainer_state.pt")
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = ckpt_root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, ckpt_root / "latest")
        for old in sorted(ckpt_root.glob("step_???????"))[:-2]:  # keep the two newest
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not path.is_dir():
        raise ValueError(f"{pointer} names {path.name}, which is not there: the checkpoints of {run_dir} were "
                         "changed by hand or by another run; move the folder away or start with --no-resume")
    return path


def _flat_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resumable(ckpt: Path, cfg: RunConfig, saved_cfg: Path) -> None:
    """A checkpoint resumes only the run that wrote it: its config (kept inside it; config.yaml for checkpoints from
    before that) must equal this one. The error names every setting that differs."""
    then = torch.load(ckpt / "trainer_state.pt", weights_only=True).get("config")
    if then is None and saved_cfg.exists():
        then = yaml.safe_load(saved_cfg.read_text())
    if then is None or then == cfg.to_dict():
        return
    a, b = _flat_keys(then), _flat_keys(cfg.to_dict())
    diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    raise ValueError(f"{ckpt} was written by a run with other settings ({'; '.join(diff)}); use a new output_dir, "
                     "or --no-resume (resume=False) to set the old run aside and start over")


def set_aside(run_dir: Path) -> Path | None:
    """Move whatever a previous run left in ``run_dir`` to ``run_dir/replaced/<time>/`` (a rename: nothing is
    deleted, so a fresh start never loses a checkpoint or a result). Returns that folder, or None if empty."""
    old = [p for p in run_dir.iterdir() if p.name != "replaced"] if run_dir.is_dir() else []
    if not old:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run_dir / "replaced" / stamp, 1
    while dest.exists():  # two fresh starts within one second
        dest, n = run_dir / "replaced" / f"{stamp}-{n}", n + 1
    dest.mkdir(parents=True)
    for p in old:
        os.replace(p, dest / p.name)
    return dest


def load_checkpoint(path: Path, head, optim, sched, sampler, rank: int, world: int) -> tuple[int, dict]:
    meta = torch.load(path / "trainer_state.pt", weights_only=True)
    if meta["world"] != world:
        raise ValueError(f"checkpoint {path} was written by {meta['world']} ranks; this run has {world}")
    opts = _model_options(head)
    state = {"model": get_model_state_dict(head, options=opts), "optim": get_optimizer_state_dict(head, optim)}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(head, optim, model_state_dict=state["model"], optim_state_dict=state["optim"], options=opts)
    sched.load_state_dict(meta["sched"])
    sampler.load_state_dict(meta["sampler"])
    rng = torch.load(path / f"rng_rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["rng_cpu"])
    if rng["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["rng_cuda"])
    return int(meta["step"]), meta.get("extra", {})


def export_hf(head: LossHead, tokenizer, out: Path, rank: int, base_path: str = "") -> None:
    """Gather the full weights on rank 0 and write a Hugging Face folder with safetensors. With LoRA: the merged
    weights (a plain folder, no peft needed) and the adapter alone in ``adapter/`` (over ``base_path``)."""
    sd = get_model_state_dict(head, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # written beside, then renamed: a kill mid-export leaves no final/ that looks complete
        sd = {k.removeprefix("lm."): v for k, v in sd.items()}
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if has_adapters(head):
            save_adapter(head.lm, sd, tmp / "adapter", base_path)
            sd = merged_state_dict(sd, lora_scalings(head.lm))
        head.lm.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier()
