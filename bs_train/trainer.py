"""The lean unlearning trainer: one loop for fine-tuning and every unlearning method, 1 process or FSDP2.

``run`` reads top to bottom as setup, loop, finish:
1. set up the process group when launched by torchrun (NCCL on CUDA, gloo on CPU), take the run folder's lock,
   the run folder (a finished run returns its summary; resume from the newest complete checkpoint, or set aside),
   device and dtypes;
2. the cheap checks first (model path, tokenizer, data, k <= V), then the model on the CPU (with ``model.lora_rank``,
   LoRA adapters injected and the base frozen: ``lora.py``), before any GPU work;
3. ``init_method_state``: what the method table (``methods.METHODS``) says the method needs of the initial model,
   built before the model moves: a frozen reference for KL / RMU / BS-S's NPO base after the first belief round
   (``frozen_reference``: compute dtype, its blocks sharded under torchrun; with LoRA none is copied, the
   reference is the trained model with its adapters off, ``lora.AdaptersOff``, set in step 5) and the row's setup
   hook (RMU's trainable parameters and direction, BS-S's encoded prompts);
4. ``parallelize``: compiled blocks when asked, activation checkpointing, then ``fully_shard`` per decoder block and
   at the root (torchtitan's order), bf16 compute, fp32 gradient reduction, CPU offload when asked. Losses are sums
   over global counts (``methods.Norms``): backward scales by the world size to cancel FSDP's mean (gloo lacks
   PREMUL_SUM); the optimizer and the schedule (``optim.py``);
5. ``prepare_method_state``: what needs the placed model: NPO reference log-probs (computed once, kept beside the
   run); then resume from the latest checkpoint (``checkpoint.py``), BS-S beliefs and the squeezing curve included;
6. the loop: BS-S beliefs redrawn on their schedule, ``train_step`` (one optimizer step: micro-batches, global
   norms, backward, clipping, the non-finite flag, optimizer and scheduler step), metrics.jsonl, the squeezing
   monitor, the in-training evaluation and selection (``train.eval_every`` / ``select_by``, ``selected_state.py``:
   step 0, every N steps or epochs, the last step; a new best's weights copied to host memory, and to ``best/``
   before a checkpoint names them; the stopping rules end the loop), the row's ``after_step`` hook (PDU's dual
   step), checkpoints (model, optimizer, scheduler, data position, RNG, step, method extras: beliefs, PDU's dual
   variable, the selection's trajectory and best);
7. finish: a last checkpoint only when asked (``train.export`` off or ``train.keep_checkpoints`` on), the kill-safe
   Hugging Face export (safetensors) of the selected step (and ``last/`` when asked), summary.json, and the
   checkpoints deleted unless kept.
The same code runs single-process on a CPU.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from . import console
from .checkpoint import (atomic_write_text, barrier, check_resumable, export_hf, finished_summary,
                         kept_metrics, latest_checkpoint, load_checkpoint, named_checkpoint, recover_export,
                         save_checkpoint, set_aside)
from .config import RESOLVED_HEADER, RunConfig
from .data import ForgetRetainSampler, QADataset, TextDataset, collate, load_qa, load_texts
from .lora import AdaptersOff, apply_lora, has_adapters
from .methods import (METHODS, MethodState, Norms, belief_config, belief_ref_logp, forget_copies, local_counts,
                      method_loss, needs_belief_ref_logp, needs_ref_logp, needs_reference, needs_retain, needs_topk,
                      precompute_ref_logp)
from .methods.beliefs import BeliefSet, belief_sampler, draw_beliefs
from .model import (LossHead, apply_liger, cast_parameters, check_model_path, decoder_blocks, load_model,
                    load_tokenizer, resolve_attention)
from .optim import build_optimizer, lr_lambda, optimizer_params, warmup_steps
from .sampler import check_supported
from .run_lock import RunLock
from .selected_state import BEST, InTrainingSelection


# ---- setup ------------------------------------------------------------------------------------------------------


class StopRun(RuntimeError):
    """Raised by ``run(stop_after=...)`` to end a run abruptly, as a kill would (used by the resume test)."""


class NonFiniteError(RuntimeError):
    """A loss or gradient norm became NaN / inf. Raised before anything is saved from the corrupted weights."""


def setup_distributed(single_group: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world, device); a process group when launched by torchrun, or a 1-rank one when ``single_group``
    (FSDP2's CPU offload needs ``fully_shard`` even on one GPU)."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        elif single_group:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def build_data(cfg: RunConfig, tokenizer, run_dir: Path):
    """(forget-or-train dataset, retain dataset or None): question/answer pairs (``QADataset``) or, for MUSE and
    WMDP, raw-text windows (``TextDataset``); synthetic data is generated into the run folder."""
    source = cfg.data.source
    if source == "synthetic":
        from .data.synthetic import make_splits, write_folder

        folder = run_dir / "data"
        made_with = {"authors": cfg.data.synthetic_authors, "qa_per_author": cfg.data.synthetic_qa_per_author,
                     "seed": cfg.train.seed}
        stamp = folder / "settings.json"
        if not (folder / "full.jsonl").exists() or not stamp.exists() or json.loads(stamp.read_text()) != made_with:
            write_folder(folder, make_splits(made_with["authors"], made_with["qa_per_author"], seed=made_with["seed"]))
            stamp.write_text(json.dumps(made_with) + "\n")
        source = str(folder)
    def dataset(src: str, split: str, copies: int = 1):
        """``copies``: each row that many times (AltPO with one row per alternate; QA only, as AltPO is)."""
        if cfg.data.text:  # MUSE / WMDP: raw text in token windows, every token scored
            return TextDataset(load_texts(src, split), tokenizer, window=cfg.data.window_tokens, name=split,
                               prefix_tokens=cfg.method.bss_prefix_tokens)
        rows = [ex for ex in load_qa(src, split) for _ in range(copies)]
        return QADataset(rows, tokenizer, max_length=cfg.model.max_length, name=split)

    if cfg.command == "finetune":
        return dataset(source, cfg.data.train_split), None
    retain = dataset(cfg.data.retain_source or source, cfg.data.retain_split) if needs_retain(cfg.method) else None
    return dataset(source, cfg.data.forget_split, forget_copies(cfg.method)), retain


def parallelize(head: LossHead, cfg: RunConfig, world: int, compute_dtype: torch.dtype | None) -> LossHead:
    """``torch.compile`` per decoder block (``train.compile``), activation checkpointing, then FSDP2 per decoder block
    and at the root (under torchrun, or with CPU offload).

    With LoRA the embeddings are frozen, so the embedding output does not require grad; reentrant checkpointing would
    then give every recomputed block no gradient and the adapters would never train (open-unlearning #178).
    ``enable_input_require_grads`` makes the embedding output require grad, whichever checkpointing is used."""
    if cfg.train.compile == "on" or (cfg.train.compile == "auto" and torch.cuda.is_available()):
        for block in decoder_blocks(head.lm):  # per block, as torchtitan: one graph reused by every layer
            block.compile(dynamic=True)
    if cfg.train.activation_checkpointing:
        head.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if has_adapters(head.lm):
            head.lm.enable_input_require_grads()
    if not dist.is_initialized():
        return head
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.train.cpu_offload else OffloadPolicy()
    for block in decoder_blocks(head.lm):
        fully_shard(block, mp_policy=mp, offload_policy=offload)
    fully_shard(head, mp_policy=mp, reshard_after_forward=False, offload_policy=offload)
    return head


def frozen_reference(lm: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype | None, *,
                     liger: bool = False) -> LossHead:
    """The frozen initial model that KL retain and RMU compare against, built to cost as little as it can.

    It is never updated, so it is held in the compute dtype (no fp32 master copy), and under torchrun its decoder
    blocks are sharded with ``fully_shard`` like the trained model's and resharded after every forward: an 8B
    reference costs each rank its 1/world share of the blocks plus one block at a time. The root (embeddings, final
    norm, lm_head) stays whole, because ``retain_kl`` reads the reference's lm_head weight after its forward and its
    checkpointed chunks read it again during the trained model's backward."""
    ref = copy.deepcopy(lm).eval().requires_grad_(False)
    ref.to(device)
    if compute_dtype is not None:
        cast_parameters(ref, compute_dtype)
    if liger:
        apply_liger(ref)
    if dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        for block in decoder_blocks(ref):
            fully_shard(block)
    return LossHead(ref)


# ---- method state -----------------------------------------------------------------------------------------------


def init_method_state(cfg: RunConfig, lm: torch.nn.Module, tokenizer, dataset, device: torch.device,
                      compute_dtype: torch.dtype | None, impl: str, liger: bool) -> MethodState:
    """What the method needs of the initial model, built while ``lm`` is still on the CPU: the frozen reference
    (copied before the trained model reaches the device) and the table row's setup hook."""
    state = MethodState(cfg.method, impl)
    if needs_reference(cfg.method) and not has_adapters(lm):  # with LoRA: the base itself (prepare_method_state)
        state.reference = frozen_reference(lm, device, compute_dtype, liger=liger)
    setup = METHODS[cfg.method.name].setup
    if setup is not None:
        setup(state, lm, tokenizer=tokenizer, dataset=dataset, seed=cfg.train.seed, device=device)
    return state


def prepare_method_state(state: MethodState, cfg: RunConfig, head, main_set, pad_id: int, run_dir: Path,
                         resuming: bool, autocast, rank: int, device) -> None:
    """What needs the placed model, before a checkpoint is loaded: with LoRA, the reference (``AdaptersOff``: the
    trained root with its adapters off, no second copy of the weights); NPO's reference log-probs of the forget set
    under the initial model (computed once and kept in the run folder, so a resumed run reads them back), and those of
    the alternate answers of an ``alternates`` row (IdkDPO; a resumed run reads them back from the checkpoint)."""
    if needs_reference(cfg.method) and state.reference is None and has_adapters(head):
        state.reference = AdaptersOff(head)
    if METHODS[cfg.method.name].alternates and state.beliefs is not None:  # built by the setup hook (IdkDPO)
        with autocast:
            state.beliefs.logp = belief_ref_logp(head, state.beliefs, state.impl, pad_id, device)
        if hasattr(head, "reshard"):
            head.reshard()
    if not needs_ref_logp(cfg.method):
        return
    ref_path = run_dir / "npo_ref_logp.pt"
    if resuming and ref_path.exists():
        try:
            state.ref_logp = torch.load(ref_path, weights_only=True)
            return
        except Exception as e:  # damaged: the model is still the initial one here, so it is recomputed exactly
            print(f"bs-unlearn: {ref_path} is unreadable ({type(e).__name__}); computing it again", flush=True)
    loader = torch.utils.data.DataLoader(main_set, batch_size=cfg.train.batch_size,
                                         collate_fn=lambda b: collate(b, pad_id))
    with autocast:
        state.ref_logp = precompute_ref_logp(head, loader, state.impl, len(main_set), device)
    if hasattr(head, "reshard"):  # FSDP2: free the root's gathered parameters (no backward will)
        head.reshard()
    if rank == 0:  # beside, then renamed: a kill leaves the whole file or none
        torch.save(state.ref_logp, ref_path.with_name(ref_path.name + ".tmp"))
        os.replace(ref_path.with_name(ref_path.name + ".tmp"), ref_path)


def _beliefs_due(cfg: RunConfig, step: int, position: dict, beliefs: BeliefSet | None) -> bool:
    """BS-S schedule: always before the first step; then every R steps, at the start of every R-th epoch, or never."""
    m = cfg.method
    if beliefs is None:
        return True
    if not METHODS[m.name].beliefs:  # sampled alternates (AltPO): drawn once, by the initial model
        return False
    if m.bss_regen == "steps":
        return step % m.bss_regen_every == 0
    if m.bss_regen == "epochs":
        return position["step"] == 0 and position["epoch"] % m.bss_regen_every == 0 and step > 0
    return False


def refresh_beliefs(state: MethodState, cfg: RunConfig, head, lm, tokenizer, rank: int, world: int, device) -> None:
    """Draw a new round of beliefs for every forget prompt with the current weights (BS-S). One sampler serves the
    whole run: its cache and compiled step are reused by every round."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if state.sampler is None:
        state.sampler = belief_sampler(lm, state.prompts, belief_config(cfg.method), eos_id=eos_id, pad_id=pad_id)
    state.beliefs = draw_beliefs(head, lm, state.prompts, belief_config(cfg.method), eos_id=eos_id, pad_id=pad_id,
                                 seed=cfg.train.seed, round_=state.beliefs.round + 1 if state.beliefs else 1,
                                 rank=rank, world=world, sampler=state.sampler)
    if state.beliefs.round > 1 and needs_belief_ref_logp(cfg.method):  # the initial model's log-probs
        state.beliefs.logp = belief_ref_logp(state.reference, state.beliefs, state.impl, pad_id, device)


# ---- one optimizer step -----------------------------------------------------------------------------------------


def _micro_batches(indices: list[int], parts: int) -> list[list[int]]:
    size = math.ceil(len(indices) / parts) if indices else 0
    return [indices[i * size:(i + 1) * size] for i in range(parts)]


def _batch(dataset, idx: list[int], pad_id: int) -> dict | None:
    return collate([dataset[i] for i in idx], pad_id) if idx else None


def _step_inputs(main_set, retain_set, state: MethodState, f: list[int], r: list[int], pad_id: int):
    """(forget, retain, beliefs) CPU batches of one micro-batch; beliefs are those of exactly these prompts."""
    beliefs = state.beliefs.batch(f, pad_id) if state.beliefs is not None and f else None
    return _batch(main_set, f, pad_id), (_batch(retain_set, r, pad_id) if retain_set else None), beliefs


def _to(batch: dict | None, device) -> dict | None:
    return {k: v.to(device) for k, v in batch.items()} if batch is not None else None


def train_step(head, optim, sched, state: MethodState, main_set, retain_set, f_idx: list[int], r_idx: list[int], *,
               pad_id: int, micro: int, rank: int, world: int, device, autocast, max_grad_norm: float,
               nonfinite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One optimizer step on this rank's share of the step's examples. Returns ([loss, forget, retain] summed over
    ranks, the gradient norm, this rank's tokens); sets ``nonfinite`` on device if either is NaN / inf."""
    f_all, r_all = _micro_batches(f_idx, world * micro), _micro_batches(r_idx, world * micro)
    mine = slice(rank * micro, (rank + 1) * micro)
    batches = [_step_inputs(main_set, retain_set, state, f, r, pad_id) for f, r in zip(f_all[mine], r_all[mine])]
    # A short last step can leave a micro-batch (or a whole rank) without examples; it still runs a
    # zero-weighted pass on the step's first micro-batch so every rank joins every FSDP collective.
    stand_in = _step_inputs(main_set, retain_set, state, f_all[0], r_all[0], pad_id)
    counts = sum(local_counts(*b) for b in batches).to(device)  # CPU batches: no device sync
    tokens = sum(int(b["attention_mask"].sum()) for bs in batches for b in bs if b is not None)
    if dist.is_initialized():
        dist.all_reduce(counts)
    norms = Norms(*counts.float().clamp_min(1).unbind())
    sums = torch.zeros(3, device=device)
    for f, r, bel in batches:
        scale = 1.0
        if f is None:
            (f, r, bel), scale = stand_in, 0.0
        f, r, bel = (_to(x, device) for x in (f, r, bel))
        with autocast:
            loss, parts = method_loss(head, f, r, state, norms, beliefs=bel)
        (loss * (scale * world)).backward()  # x world: FSDP averages, our loss is a global sum
        sums += torch.stack([loss.detach(), parts["forget"], parts["retain"]]).float() * scale
    if dist.is_initialized():
        dist.all_reduce(sums)
    grad_norm = torch.nn.utils.clip_grad_norm_(head.parameters(), max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    nonfinite |= ~(torch.isfinite(grad_norm) & torch.isfinite(sums).all())
    optim.step()
    optim.zero_grad(set_to_none=True)
    sched.step()
    return sums, grad_norm, tokens


# ---- around the loop --------------------------------------------------------------------------------------------


def _precision(cfg: RunConfig, device: torch.device, world: int):
    """(compute dtype or None for fp32, fused-loss implementation, autocast context): bf16 compute on CUDA unless
    asked otherwise, and on the CPU when asked (``bf16``), through autocast in one process and FSDP2's mixed
    precision under torchrun. The Triton interpreter has no bf16 arithmetic, so bf16 with ``impl=triton`` off a GPU
    is refused here, before any work starts."""
    use_cuda = device.type == "cuda"
    mp = cfg.train.mixed_precision
    compute_dtype = torch.bfloat16 if (mp == "bf16" or (mp == "auto" and use_cuda)) else None
    impl = cfg.train.impl if cfg.train.impl != "auto" else ("triton" if use_cuda else "torch")
    if compute_dtype is not None and impl == "triton" and not use_cuda:
        raise ValueError(f"train.mixed_precision={mp} with train.impl=triton needs a GPU (the Triton interpreter "
                         f"has no bf16 arithmetic); on {device.type} use train.impl=torch or mixed_precision=fp32")
    autocast = (torch.autocast(device.type, dtype=compute_dtype)
                if compute_dtype is not None and world == 1 else nullcontext())
    return compute_dtype, impl, autocast


def _schedule(cfg: RunConfig, optim, main_set, retain_set, world: int):
    """(data sampler, total optimizer steps, learning-rate scheduler, the step the run ends at): ``train.stop_at_epoch``
    ends it early (at the nearest step, at least one) and leaves the schedule of all ``train.epochs`` as it is."""
    bucket = cfg.train.bucket_window
    sampler = ForgetRetainSampler(len(main_set), len(retain_set) if retain_set is not None else 0,
                                  cfg.train.batch_size * cfg.train.grad_accum * world, seed=cfg.train.seed,
                                  bucket_window=bucket, forget_lengths=main_set.lengths() if bucket else None,
                                  retain_lengths=retain_set.lengths() if bucket and retain_set else None)
    total = sampler.steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    warm = warmup_steps(cfg.train, len(main_set), world)
    stop = cfg.train.stop_at_epoch
    end = total if stop is None else min(total, max(1, round(stop * sampler.steps_per_epoch)))
    return sampler, total, torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg.train, total, warm)), end


def _extra(state: MethodState, regen_s: float, monitor, selection) -> dict:
    """What a checkpoint holds beyond weights, optimizer, scheduler and data position."""
    extra = {"beliefs": state.beliefs.state_dict(), "regen_s": regen_s} if state.beliefs is not None else {}
    if monitor is not None:
        extra["squeezing"] = monitor.state_dict()
    if selection is not None:  # the trajectory and the best-so-far of train.eval_every / select_by
        extra["selection"] = selection.state_dict()
    if state.dual is not None:
        extra["dual"] = float(state.dual)  # host sync, at checkpoints only
    return extra


def _stop_if_nonfinite(flag: torch.Tensor, step: int, sums: torch.Tensor, grad_norm, run_dir: Path) -> None:
    if not bool(flag):  # host sync, only on steps that log or checkpoint
        return
    ckpt = named_checkpoint(run_dir)
    raise NonFiniteError(
        f"non-finite loss or gradient by step {step} (now: loss {float(sums[0]):.4g}, gradient norm "
        f"{float(grad_norm):.4g}); stopped without saving the corrupted weights. The last good checkpoint is "
        f"{ckpt if ckpt is not None else 'none (none was written yet)'}. Lower train.lr or set train.max_grad_norm; "
        f"a run with a changed config needs a new output_dir")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _start_run_dir(cfg: RunConfig, run_dir: Path, resume: bool, rank: int) -> tuple[Path | None, dict | None]:
    """Set the old run aside (fresh start) or find its newest complete checkpoint (resume), check it belongs to this
    config, and save the config. Returns (the checkpoint to resume from or None, the summary of a finished run of
    this config or None)."""
    if rank == 0:
        moved = None if resume else set_aside(run_dir)
        if moved is not None:
            print(f"bs-unlearn: starting over in {run_dir}; what was there is now in {moved}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        recover_export(run_dir / "final", say=_say)
        recover_export(run_dir / "last", say=_say)
    barrier()
    done = finished_summary(run_dir, cfg, say=_say if rank == 0 else None) if resume else None
    if done is not None:
        return None, done
    ckpt = latest_checkpoint(run_dir, say=_say if rank == 0 else None) if resume else None
    saved_cfg = run_dir / "config.yaml"
    if ckpt is not None:
        check_resumable(ckpt, cfg, saved_cfg)
    if rank == 0:
        atomic_write_text(saved_cfg, RESOLVED_HEADER + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return ckpt, None


def _squeezing_monitor(cfg: RunConfig, main_set, tokenizer, impl: str, extra: dict, head, autocast):
    """The squeezing monitor of an unlearning run (None when off): resumed from the checkpoint, or its beliefs drawn
    from the initial model now."""
    if not (cfg.train.squeezing_every and cfg.command == "unlearn"):
        return None
    from .methods.squeezing import SqueezingMonitor

    monitor = SqueezingMonitor.from_dataset(main_set, tokenizer, n_beliefs=cfg.train.squeezing_beliefs,
                               every=cfg.train.squeezing_every, max_new_tokens=cfg.train.squeezing_max_new_tokens,
                               seed=cfg.train.seed, impl=impl, method=cfg.method.name)
    if "squeezing" in extra:  # resumed: the same beliefs, and the curve so far
        monitor.load_state_dict(extra["squeezing"])
    else:
        with autocast:
            monitor.prepare(head)
    return monitor


def _progress_bar(cfg: RunConfig, total: int, step: int, show: bool):
    """tqdm on a terminal, a plain line every 30 s in a log (``bs_train/console.py``)."""
    if not show:
        return None
    return console.progress(total, f"{cfg.command} {cfg.method.name}", unit="steps", initial=step)


# ---- the run ----------------------------------------------------------------------------------------------------


def _check_vocab(cfg: RunConfig, tokenizer) -> None:
    vocab = len(tokenizer)
    if needs_topk(cfg.method) and cfg.method.bst_topk > vocab:
        raise ValueError(f"method.bst_topk={cfg.method.bst_topk} exceeds the vocabulary of {cfg.model.path} "
                         f"({vocab} tokens)")


def run(cfg: RunConfig, *, resume: bool = True, stop_after: int | None = None, progress: bool = True) -> dict:
    """Fine-tune or unlearn as configured; returns a summary dict (also written to summary.json). One process (rank
    0 of a torchrun job) holds the run folder's lock throughout; a second is refused naming the holder's PID."""
    rank, world, device = setup_distributed(single_group=cfg.train.cpu_offload)
    run_dir = Path(cfg.output_dir)
    check_model_path(cfg.model.path)  # a typo fails here, in a line, before the folder is touched
    if rank != 0:
        return _run(cfg, rank, world, device, run_dir, resume, stop_after, progress)
    with RunLock(run_dir, say=_say):
        return _run(cfg, rank, world, device, run_dir, resume, stop_after, progress)


def _log_metrics(path: Path, cfg: RunConfig, state: MethodState, step: int, epoch: int, sums: torch.Tensor,
                 grad_norm, sched, tokens_per_s: float, elapsed: float, regen_s: float | None,
                 evaluation: tuple[dict, float] | None = None) -> dict:
    """Append one step's line to metrics.jsonl (a host sync: only on logged steps) and return it; ``evaluation``:
    the in-training evaluation of this step (metrics, seconds), under ``eval``. Step 0 logs its evaluation alone."""
    line = {"step": step, "epoch": epoch}
    if step > 0:
        terms = ("loss", *METHODS[cfg.method.name].terms)  # fine-tuning logs train_nll, not "forget"
        line.update({**dict(zip(terms, sums.tolist())), "grad_norm": float(grad_norm),
                     "lr": float(sched.get_last_lr()[0]), "tokens_per_s": tokens_per_s, "elapsed_s": elapsed})
        if regen_s is not None:  # BS-S / AltPO: the belief round and the time spent drawing beliefs
            line.update(belief_round=state.beliefs.round, belief_regen_s=regen_s)
        if state.dual is not None:
            line["dual"] = float(state.dual)
    if evaluation is not None:
        line.update(eval=evaluation[0], eval_s=round(evaluation[1], 4))
    with path.open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    return line


def _run(cfg: RunConfig, rank: int, world: int, device: torch.device, run_dir: Path, resume: bool,
         stop_after: int | None, progress: bool) -> dict:
    ckpt, done = _start_run_dir(cfg, run_dir, resume, rank)
    if done is not None:
        print(f"bs-unlearn: {run_dir} already finished this run ({done['steps']} steps); its summary stands",
              flush=True)
        _drop_checkpoints(cfg, run_dir, rank)  # a kill may have come between the summary and this
        return done
    torch.manual_seed(cfg.train.seed)
    use_cuda = device.type == "cuda"
    compute_dtype, impl, autocast = _precision(cfg, device, world)
    # The cheap checks first (tokenizer, every data row, k <= V), then the model on the CPU, all before anything
    # touches the GPU: a malformed example or a bad path fails in seconds, not after the model has loaded.
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    main_set, retain_set = build_data(cfg, tokenizer, run_dir)
    _check_vocab(cfg, tokenizer)
    selection = InTrainingSelection.build(cfg, tokenizer, run_dir, main_set, retain_set, impl)  # its data read now
    lm, tokenizer = load_model(cfg.model.path, dtype=getattr(torch, cfg.model.dtype), device="cpu",
                               attn_implementation=resolve_attention(cfg.model.attn_implementation, device),
                               trust_remote_code=cfg.model.trust_remote_code, use_liger=False, seed=cfg.train.seed,
                               tokenizer=tokenizer)
    if METHODS[cfg.method.name].beliefs or METHODS[cfg.method.name].sample_alternates:
        check_supported(lm)  # BS-S and AltPO sample with the belief sampler: a family it cannot drive fails now
    if cfg.model.lora_rank:
        apply_lora(lm, cfg.model)
    pad_id, liger = tokenizer.pad_token_id, cfg.model.use_liger and use_cuda
    state = init_method_state(cfg, lm, tokenizer, main_set, device, compute_dtype, impl, liger)
    lm.to(device)
    if liger:
        apply_liger(lm)
    head = parallelize(LossHead(lm), cfg, world, compute_dtype)
    # Before any forward: under FSDP2 a forward without backward leaves the root's parameters unsharded (it is not
    # resharded after forward), and an optimizer built then would hold those transient tensors, not the shards.
    optim = build_optimizer(optimizer_params(head, cfg.train), cfg.train, use_cuda)
    prepare_method_state(state, cfg, head, main_set, pad_id, run_dir, ckpt is not None, autocast, rank, device)

    sampler, total, sched, end = _schedule(cfg, optim, main_set, retain_set, world)
    step, extra = load_checkpoint(ckpt, head, optim, sched, sampler, rank, world) if ckpt is not None else (0, {})
    if "beliefs" in extra:
        state.beliefs = BeliefSet.from_state_dict(extra["beliefs"])
    if "dual" in extra:
        state.dual = torch.tensor(extra["dual"], dtype=torch.float32, device=device)
    row = METHODS[cfg.method.name]
    beliefs, after_step = row.beliefs or row.sample_alternates, row.after_step
    regen_s = float(extra.get("regen_s", 0.0))
    metrics_path = run_dir / "metrics.jsonl"
    last = kept_metrics(metrics_path, step, rank)
    monitor = _squeezing_monitor(cfg, main_set, tokenizer, impl, extra, head, autocast)
    if selection is not None:
        selection.start(sampler.steps_per_epoch, total, extra, step, rank)
        if step == 0:  # the baseline: the model before any step (never a candidate for selection)
            evaluation = selection.evaluate(0, head, lm, rank=rank, world=world, autocast=autocast)
            if rank == 0:
                _log_metrics(metrics_path, cfg, state, 0, 0, None, None, sched, 0.0, 0.0, None, evaluation)
    bar = _progress_bar(cfg, end, step, progress and rank == 0)
    t_start, tokens_seen = time.perf_counter(), 0
    # Set on device by any non-finite loss or gradient norm, read (one host sync) only where the host syncs anyway:
    # logging, checkpoints and the end, all on every rank, so ranks stop together and nothing corrupted is saved.
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    batches_left = iter(sampler)
    while step < end and not (selection is not None and selection.stopped):
        position = sampler.state_dict()  # where the batch about to be drawn sits: (epoch, step in epoch)
        try:
            f_idx, r_idx = next(batches_left)
        except StopIteration:  # the epoch is over; the sampler already points at the next one
            batches_left = iter(sampler)
            continue
        if beliefs and _beliefs_due(cfg, step, position, state.beliefs):
            t0 = time.perf_counter()
            with autocast:
                refresh_beliefs(state, cfg, head, lm, tokenizer, rank, world, device)
            regen_s += time.perf_counter() - t0
        sums, grad_norm, tokens = train_step(head, optim, sched, state, main_set, retain_set, f_idx, r_idx,
                                             pad_id=pad_id, micro=cfg.train.grad_accum, rank=rank, world=world,
                                             device=device, autocast=autocast, max_grad_norm=cfg.train.max_grad_norm,
                                             nonfinite=nonfinite)
        step, tokens_seen = step + 1, tokens_seen + tokens
        if after_step is not None:  # the method's own state after each optimizer step (PDU's dual variable)
            after_step(state, sums[2], position["epoch"])
        checkpoint_due = bool(cfg.train.checkpoint_every) and step % cfg.train.checkpoint_every == 0 and step < end
        evaluate = selection is not None and selection.due(step, end)
        if step % cfg.train.log_every == 0 or step == end or checkpoint_due or evaluate:
            _stop_if_nonfinite(nonfinite, step, sums, grad_norm, run_dir)  # nothing corrupted is evaluated or kept
        if monitor is not None:
            with autocast:
                monitor.maybe_log(step, head)
        evaluation = selection.evaluate(step, head, lm, rank=rank, world=world, autocast=autocast) if evaluate else None
        if rank == 0 and (step % cfg.train.log_every == 0 or step == end or evaluation):
            last = _log_metrics(metrics_path, cfg, state, step, position["epoch"], sums, grad_norm, sched,
                                tokens_seen * world / max(time.perf_counter() - t_start, 1e-9),
                                time.perf_counter() - t_start, regen_s if beliefs else None, evaluation)
        if bar is not None:
            bar.update(1)
            if last:
                bar.set_postfix(loss=f"{last['loss']:.4f}", **(selection.postfix() if selection else {}))
        if checkpoint_due:
            _save(run_dir, step, head, optim, sched, sampler, rank, world, state, regen_s, monitor, selection, cfg)
        if stop_after is not None and step >= stop_after:
            raise StopRun(f"stopped after step {step} as asked")
    if bar is not None:
        bar.close()
    if monitor is not None and rank == 0:
        monitor.finish(run_dir)
    if selection is not None and selection.stopped and rank == 0:
        _say(f"bs-unlearn: stopped at step {step} of {end}: {selection.stopped}")
    if not cfg.train.export or cfg.train.keep_checkpoints:  # asked for (or the run's only output)
        _save(run_dir, step, head, optim, sched, sampler, rank, world, state, regen_s, monitor, selection, cfg)
    return _finish(cfg, head, tokenizer, run_dir, rank, world, step, last, impl, selection)


def _save(run_dir: Path, step: int, head, optim, sched, sampler, rank: int, world: int, state: MethodState,
          regen_s: float, monitor, selection, cfg: RunConfig) -> None:
    """A checkpoint, with the best state it names on disk first (``train.select_by``)."""
    if selection is not None:
        selection.before_checkpoint(head, rank)
    save_checkpoint(run_dir, step, head, optim, sched, sampler, rank, world, _extra(state, regen_s, monitor, selection),
                    cfg.to_dict())
    if selection is not None:
        selection.after_checkpoint(rank)


def _finish(cfg: RunConfig, head, tokenizer, run_dir: Path, rank: int, world: int, step: int, last: dict,
            impl: str, selection=None) -> dict:
    """Export ``final/`` (the selected step's weights under ``train.select_by``), write summary.json, then drop the
    checkpoints nobody asked to keep."""
    if cfg.train.export:
        if selection is not None:  # last/ when asked, then the chosen weights into the model
            selection.before_export(head, tokenizer, rank, step)
        export_hf(head, tokenizer, run_dir / "final", rank, base_path=cfg.model.path)
    if selection is not None and rank == 0:
        selection.write(step=step)  # trajectory.json and .png
    summary = {"steps": step, "final": last, "output_dir": str(run_dir), "world_size": world, "impl": impl}
    if selection is not None:
        summary["selection"] = selection.summary(step)
    if rank == 0:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    _drop_checkpoints(cfg, run_dir, rank)
    return summary


def _drop_checkpoints(cfg: RunConfig, run_dir: Path, rank: int) -> None:
    """Once final/ is exported and the summary written, the checkpoints only cost disk (``train.keep_checkpoints``)."""
    if rank == 0 and cfg.train.export and not cfg.train.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / BEST, ignore_errors=True)  # the selected state, exported as final/
