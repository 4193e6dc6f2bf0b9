"""Resumable checkpoints, the final Hugging Face export and the run folder's lock: nothing a kill can break.

A checkpoint is ``torch.distributed.checkpoint`` of the model and optimizer state (sharded under FSDP2) plus, per
rank, its RNG states and, on rank 0, the scheduler, data position, method extras (BS-S beliefs, the squeezing curve)
and the run's config. Every step of a save leaves a complete checkpoint on disk, whenever the process is killed:

* it is written to ``step_N.tmp``; a ``manifest.json`` (size and sha256 of every file) is written *last*, so a folder
  whose manifest checks out is whole, and bad bytes anywhere in it are caught on resume;
* it is renamed to ``step_N``, then the pointer ``latest`` is replaced atomically; nothing ``latest`` names is removed
  before that (a complete ``step_N`` already there is kept, a damaged one is replaced); the two newest are kept;
* on resume (``latest_checkpoint``) every ``step_N`` is verified against its manifest, newest first: a damaged or
  missing one is reported by name and reason and the newest complete one is used;
* free space is checked before writing (``shutil.disk_usage`` against the state's size) and a full disk during the
  write removes only the partial ``.tmp`` and raises ``DiskFull``: "no space left on <dir>: need ~X GB".

``export_hf`` writes ``final/`` the same way (``final.tmp`` with a manifest, renamed; a previous ``final/`` is moved to
``final.old`` until the new one is in place; ``recover_export`` puts back a complete one a kill left under either
name). ``check_resumable`` lets a checkpoint resume only a run with the same ``identity`` (the settings that change
results: not the folder, so a copied or renamed run folder resumes); ``set_aside`` moves an old run away (never
deletes it, nor the run's lock: ``run_lock.py``) for a fresh start. ``fault_point`` marks the
named points inside save and export where the fault tests kill the process. ``kept_metrics`` trims a resumed
run's metrics.jsonl to the checkpoint's step.

Ctrl-C during a save lets the save finish, then stops (``finish_before_interrupt``; a second Ctrl-C stops at once):
the step just saved is the one a rerun resumes from. ``torch.distributed.checkpoint`` wraps every exception a rank
raised in a ``CheckpointException``, Ctrl-C's ``KeyboardInterrupt`` too; ``dcp_call`` gives that one back as a
``KeyboardInterrupt``, so the command ends with its one line and exit 130, never a traceback.

A LoRA run (``bs_train/lora.py``) checkpoints only its trainable parameters (the adapters; the frozen base is
reloaded from ``model.path``) and exports the merged model plus the adapter alone in ``final/adapter/``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_state_dict)

from .config import RunConfig
from .lora import has_adapters, lora_scalings, merged_state_dict, save_adapter
from .model import LossHead
from .outputs import atomic_write
from .run_lock import LOCK

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d{7})")
# Settings that do not change what a run computes, left out of its identity (ours): where the folder is, how often it
# checkpoints or logs, whether it exports and what it keeps. A run resumes across a change of any of them.
NOT_IDENTITY = ("output_dir", "train.checkpoint_every", "train.log_every", "train.export", "train.keep_checkpoints",
                "train.compile", "train.export_last")
FAULT_ENV = "BS_UNLEARN_KILL_AT"
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named point inside save and export. With ``BS_UNLEARN_KILL_AT=<name>`` (or ``<name>@<k>``: its k-th
    passage) in the environment the process SIGKILLs itself there, as an OOM kill or a lost node would; the fault
    tests use it to check that every such point leaves a resumable run. Without it, nothing happens."""
    want = os.environ.get(FAULT_ENV)
    if not want or not want.startswith(name):
        return
    _reached[name] = _reached.get(name, 0) + 1
    target, _, k = want.partition("@")
    if target == name and _reached[name] == int(k or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def finish_before_interrupt(what: str) -> Iterator[None]:
    """Ctrl-C (SIGINT) inside the block lets it finish, then raises ``KeyboardInterrupt``; a second Ctrl-C raises at
    once. Only where Python's own SIGINT handler is in place on the main thread (not under a handler someone else
    installed, nor with SIGINT ignored), so nothing changes for a caller that handles signals itself."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending: list[int] = []

    def note(signum: int, frame: object) -> None:
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)
        if os.environ.get("RANK", "0") == "0":  # one line for a torchrun job, whose every rank gets the Ctrl-C
            print(f"\ninterrupted: finishing {what} first (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def dcp_call(op: Callable[..., object], state: dict, path: Path) -> None:
    """``dcp.save`` or ``dcp.load`` of ``state`` at ``path``; a Ctrl-C that dcp wrapped comes back as itself."""
    try:
        op(state, checkpoint_id=str(path))
    except CheckpointException as e:
        if any(isinstance(exc, KeyboardInterrupt) for exc, _ in e.failures.values()):
            raise KeyboardInterrupt from None
        raise


def _model_options(head) -> StateDictOptions:
    """What a checkpoint holds of the model: every parameter, or with LoRA only the trainable ones (the adapters)."""
    lora = has_adapters(head)
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def atomic_write_text(path: Path, text: str) -> None:
    """Write beside, then rename: a kill leaves the old file or the new one, never half of one."""
    atomic_write(path, text)


# ---- manifests ----------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path, **info) -> None:
    """Record the size and sha256 of every file under ``folder``; written last (beside, fsynced, renamed), so a
    folder with a manifest was written whole. sha256 rather than a crc: with SHA-NI it hashed 1.34 GiB per CPU-second
    here (2026-12-01; crc32 2.05), about 1.3 s for a 1.7 GB SmolLM2 checkpoint, on save and again on resume."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, **info, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def damage(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint or export, in a few words; None when its manifest checks out."""
    if not folder.is_dir():
        return "it is not there"
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (written last: its save was cut off, or it predates manifests)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__})"
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes where {want['bytes']} were written (truncated or overwritten)"
        if _sha256(p) != want["sha256"]:
            return f"{name} fails its sha256 checksum (bad bytes inside)"
    return None


def changes(folder: Path) -> list[str] | None:
    """How ``folder`` differs from its manifest, one phrase per file (``config.json changed``, ``notes.txt added``,
    ``model.safetensors missing``); [] when it matches, None when it has no readable manifest."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    out = []
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            out.append(f"{name} missing")
        elif p.stat().st_size != want["bytes"] or _sha256(p) != want["sha256"]:
            out.append(f"{name} changed")
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    out += [f"{name} added" for name in sorted(on_disk - set(files))]
    return out


# ---- disk space ---------------------------------------------------------------------------------------------


class DiskFull(ValueError):
    """Not enough free space for a checkpoint or export; nothing complete was touched."""

    def __init__(self, where: Path, need: int, free: int | None = None):
        have = f", {free / 1e9:.3g} GB free" if free is not None else ""
        super().__init__(f"no space left on {where}: need ~{need / 1e9:.3g} GB{have}; free some space (finished "
                         "runs keep no checkpoints unless train.keep_checkpoints=true) and rerun to resume")


def _tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        t = tree.to_local() if hasattr(tree, "to_local") else tree
        return t.numel() * t.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def _free_bytes(folder: Path) -> int:
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _check_space(folder: Path, local_bytes: int, device: torch.device | None = None) -> int:
    """Raise ``DiskFull`` on every rank unless ``folder``'s disk holds the whole save (every rank's share, plus 5%
    and 16 MB for headers and small files) with room to spare; returns the expected size."""
    free = _free_bytes(folder)
    if dist.is_initialized():  # one decision for all ranks: the summed size, rank 0's view of the disk
        t = torch.tensor([float(local_bytes), float(free) if dist.get_rank() == 0 else 0.0], dtype=torch.float64,
                         device=device)
        dist.all_reduce(t)
        local_bytes, free = int(t[0]), int(t[1])
    need = int(local_bytes * 1.05) + (16 << 20)
    if free < need:
        raise DiskFull(folder, need, free)
    return need


def _disk_full(e: BaseException) -> bool:
    """Was this write error a full disk? torch's zip writer reports a short write as "unexpected pos"."""
    while e is not None:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
                s in str(e) for s in ("No space left", "unexpected pos", "Disk quota exceeded")):
            return True
        e = e.__cause__ or e.__context__
    return False


# ---- checkpoints ----------------------------------------------------------------------------------------------


def _step_dirs(root: Path) -> list[Path]:
    """The ``step_N`` folders (never ``.tmp``), newest first."""
    return sorted((p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()),
                  reverse=True) if root.is_dir() else []


def _install(tmp: Path, final: Path) -> None:
    """Rename a complete ``tmp`` into place. A complete ``final`` of the same step is kept (``latest`` may name it;
    it holds the same state); only a damaged one is removed first."""
    if final.exists():
        if damage(final) is None:
            shutil.rmtree(tmp)
            return
        shutil.rmtree(final)
    fault_point("save:before_rename")
    os.replace(tmp, final)


def save_checkpoint(run_dir: Path, step: int, head, optim, sched, sampler, rank: int, world: int,
                    extra: dict | None = None, config: dict | None = None) -> Path:
    """Write ``checkpoints/step_N`` (see the module's docstring); Ctrl-C during it lets it finish first."""
    with finish_before_interrupt(f"the checkpoint of step {step}"):
        final = _save_checkpoint(run_dir, step, head, optim, sched, sampler, rank, world, extra, config)
    return final


def _save_checkpoint(run_dir: Path, step: int, head, optim, sched, sampler, rank: int, world: int,
                     extra: dict | None, config: dict | None) -> Path:
    ckpt_root = run_dir / "checkpoints"
    final, tmp = ckpt_root / f"step_{step:07d}", ckpt_root / f"step_{step:07d}.tmp"
    state = {"model": get_model_state_dict(head, options=_model_options(head)),
             "optim": get_optimizer_state_dict(head, optim)}
    device = next(head.parameters()).device
    need = _check_space(ckpt_root, _tensor_bytes(state), device)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save cut off before: never complete, never named by latest
        tmp.mkdir(parents=True)
    barrier()
    try:
        fault_point("save:begin")
        dcp_call(dcp.save, state, tmp)
        fault_point("save:weights")
        torch.save({"rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            torch.save({"step": step, "world": world, "sched": sched.state_dict(), "sampler": sampler.state_dict(),
                        "extra": extra or {}, "config": config}, tmp / "trainer_state.pt")
        fault_point("save:state")
        barrier()
        if rank == 0:
            write_manifest(tmp, step=step, world=world)
    except (Exception, CheckpointException) as e:  # safetensors, torch's zip writer and dcp each say it their way
        if not _disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # only the partial folder this save wrote
        raise DiskFull(ckpt_root, need) from None
    fault_point("save:manifest")
    if rank == 0:
        _install(tmp, final)
        fault_point("save:renamed")
        atomic_write_text(ckpt_root / "latest", final.name)
        fault_point("save:pointer")
        # Checkpoints of later steps than this one are those a resume skipped as damaged (a complete one would have
        # been resumed from): they go, then all but the two newest.
        later = [p for p in _step_dirs(ckpt_root) if int(p.name[5:]) > step]
        for old in later + [p for p in _step_dirs(ckpt_root) if p not in later][2:]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_root.glob("step_*.tmp"):  # cut-off saves of other steps
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def named_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, unverified (for messages)."""
    pointer = run_dir / "checkpoints" / "latest"
    return run_dir / "checkpoints" / pointer.read_text(errors="replace").strip() if pointer.is_file() else None


def latest_checkpoint(run_dir: Path, say: Callable[[str], None] | None = print) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` (its manifest checks out), or None when it has none. Any newer
    one that is damaged, or a ``latest`` naming a missing one, is reported through ``say`` with the reason; when
    checkpoints exist but none is complete, a ``ValueError`` says why for each."""
    root = run_dir / "checkpoints"
    rejected = []
    named = named_checkpoint(run_dir)
    if named is not None and not named.is_dir():
        rejected.append(f"`latest` names {named.name}, which is not there")
    for path in _step_dirs(root):
        why = damage(path)
        if why is None:
            if rejected and say is not None:
                say(f"bs-unlearn: resuming from {path}: {'; '.join(rejected)}")
            return path
        rejected.append(f"{path.name} is damaged: {why}")
    if rejected:
        raise ValueError(f"no complete checkpoint in {root} ({'; '.join(rejected)}); move the folder away or start "
                         "over with --no-resume (the old run is set aside, not deleted)")
    return None


def _flat_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def identity(config: dict) -> dict:
    """The settings of a run that change its results (flat ``section.key`` -> value): all but ``NOT_IDENTITY``."""
    return {k: v for k, v in _flat_keys(config).items() if k not in NOT_IDENTITY}


def check_same_run(then: dict | None, cfg: RunConfig, where: Path) -> None:
    """A checkpoint or finished run resumes only a run of the same ``identity``; the error names every setting
    that differs."""
    if then is None:
        return
    a, b = identity(then), identity(cfg.to_dict())
    # a setting newer than the saved run (absent there) had its default then: a run from before it still resumes
    a = {**{k: v for k, v in identity(RunConfig().to_dict()).items() if k not in a}, **a}
    diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        raise ValueError(f"{where} was written by a run with other settings ({'; '.join(diff)}); use a new "
                         "output_dir, or --no-resume (resume=False) to set the old run aside and start over")


def _load(path: Path):
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # only reached for a file that passed its checksum and still does not load
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def check_resumable(ckpt: Path, cfg: RunConfig, saved_cfg: Path) -> None:
    """A checkpoint resumes only the run that wrote it: its config (kept inside it; config.yaml for checkpoints from
    before that) must have this one's identity."""
    then = _load(ckpt / "trainer_state.pt").get("config")
    if then is None and saved_cfg.exists():
        then = yaml.safe_load(saved_cfg.read_text())
    check_same_run(then, cfg, ckpt)


def set_aside(run_dir: Path, only: list[Path] | None = None) -> Path | None:
    """Move whatever a previous run left in ``run_dir`` (or just the paths ``only``) to ``run_dir/replaced/<time>/``
    (a rename: nothing is deleted, so a fresh start never loses a checkpoint or a result). Returns that folder, or
    None if there was nothing to move."""
    if only is not None:
        old = [p for p in only if p.exists()]
    else:
        old = [p for p in run_dir.iterdir() if p.name not in ("replaced", LOCK)] if run_dir.is_dir() else []
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
    meta = _load(path / "trainer_state.pt")
    if meta["world"] != world:
        raise ValueError(f"checkpoint {path} was written by {meta['world']} ranks; this run has {world}")
    opts = _model_options(head)
    state = {"model": get_model_state_dict(head, options=opts), "optim": get_optimizer_state_dict(head, optim)}
    try:
        dcp_call(dcp.load, state, path)
    except (Exception, CheckpointException) as e:
        raise ValueError(f"{path}: its weights cannot be read ({type(e).__name__})") from None
    set_state_dict(head, optim, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=opts)
    sched.load_state_dict(meta["sched"])
    sampler.load_state_dict(meta["sampler"])
    rng = _load(path / f"rng_rank{rank}.pt")
    torch.set_rng_state(rng["rng_cpu"])
    if rng["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["rng_cuda"])
    return int(meta["step"]), meta.get("extra", {})


def export_hf(head: LossHead, tokenizer, out: Path, rank: int, base_path: str = "") -> None:
    """Gather the full weights on rank 0 and write a Hugging Face folder with safetensors, kill-safe: written to
    ``final.tmp`` with a manifest, and a previous ``final/`` stays (as ``final.old``) until the new one is in place.
    With LoRA: the merged weights (a plain folder, no peft needed) and the adapter alone in ``adapter/`` (over
    ``base_path``)."""
    sd = get_model_state_dict(head, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # every rank takes the same decision (only rank 0 holds the gathered weights), so none waits for a rank that quit
    need = _check_space(out.parent, _tensor_bytes(sd) if rank == 0 else 0, next(head.parameters()).device)
    if rank == 0:
        sd = {k.removeprefix("lm."): v for k, v in sd.items()}
        tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            fault_point("export:begin")
            if has_adapters(head):
                save_adapter(head.lm, sd, tmp / "adapter", base_path)
                sd = merged_state_dict(sd, lora_scalings(head.lm))
            head.lm.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            fault_point("export:written")
            write_manifest(tmp)
        except Exception as e:
            if not _disk_full(e):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise DiskFull(out.parent, need) from None
        fault_point("export:manifest")
        if out.exists() and changes(out) != []:  # a final/ with a user's edits or files in it: kept, never deleted
            moved = set_aside(out.parent, only=[out])
            print(f"bs-unlearn: {out} held changes of yours; it is now in {moved}", flush=True)
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            fault_point("export:old_aside")
        os.replace(tmp, out)
        fault_point("export:renamed")
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def recover_export(out: Path, say: Callable[[str], None] = print) -> None:
    """After a kill inside ``export_hf``: with no ``final/``, put back a complete export left as ``final.tmp`` (the
    new one) or ``final.old`` (the previous one of the same run). Partial ones are left for the next export."""
    if out.exists():
        return
    for cand in (out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")):
        if cand.is_dir() and damage(cand) is None:
            os.replace(cand, out)
            say(f"bs-unlearn: {out} restored from {cand.name}, a complete export a kill left under that name")
            return


def finished_summary(run_dir: Path, cfg: RunConfig, say: Callable[[str], None] | None = print) -> dict | None:
    """The summary of a finished run of this identity in ``run_dir`` (its summary.json, and a complete ``final/``
    when it exports), or None. A finished run of other settings is refused by name."""
    summary, saved = run_dir / "summary.json", run_dir / "config.yaml"
    if not summary.is_file() or not saved.is_file():
        return None
    try:
        result, then = json.loads(summary.read_text()), yaml.safe_load(saved.read_text())
    except (ValueError, yaml.YAMLError, UnicodeDecodeError):
        return None  # written before these were atomic and cut off: the run is not known to be finished
    if not isinstance(then, dict) or not isinstance(result, dict):
        return None
    check_same_run(then, cfg, run_dir)
    final = run_dir / "final"
    if cfg.train.export:
        # final/ is only ever put in place whole (export_hf renames a complete folder), so any difference from its
        # manifest came afterwards, from a user: edits and added files are kept and the run stands; a missing file
        # means the model is incomplete, and the run trains again (export_hf then sets the old final/ aside).
        diff = changes(final) if final.is_dir() else ["the folder is missing"]
        missing = [d for d in diff or [] if d.endswith("missing")]
        if missing:
            if say is not None:
                say(f"bs-unlearn: {run_dir} has a summary but its final/ is incomplete ({', '.join(missing)}): "
                    "training again")
            return None
        if say is not None and diff:
            say(f"bs-unlearn: {final} differs from what this run exported ({', '.join(diff)}); kept as it is "
                "(--no-resume trains again, setting this run aside)")
        elif say is not None and diff is None:
            say(f"bs-unlearn: {final} has no {MANIFEST} (written last by the export), so it cannot be checked; kept "
                "as it is")
    return {**result, "output_dir": str(run_dir)}


def kept_metrics(metrics_path: Path, step: int, rank: int) -> dict:
    """Keep the metrics of steps up to the checkpoint, drop any written after it; the last kept line (a resumed run
    that has no steps left reports it, not an empty result)."""
    if rank != 0:
        return {}
    kept, unreadable = [], 0
    lines = metrics_path.read_bytes().decode("utf-8", "replace").splitlines() if metrics_path.exists() and step else []
    for ln in lines:  # a line a kill cut short, or damaged, is dropped (and said), not a reason to refuse resuming
        try:
            row = json.loads(ln)
            if not isinstance(row["step"], int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            unreadable += bool(ln.strip())
            continue
        if row["step"] <= step and (not kept or row["step"] > kept[-1]["step"]):
            kept.append(row)
    if unreadable:
        print(f"bs-unlearn: {metrics_path}: dropped {unreadable} unreadable line(s) (a write cut off by a kill)",
              flush=True)
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept[-1] if kept else {}
