"""Full training-step benchmark: our memory plan vs the Hugging Face stack, per method, at Llama-3.1-8B shapes.

Ours: bf16 weights, torchao AdamW with 8-bit states and stochastic rounding (``train.optimizer=adamw8bit``),
activation checkpointing, the fused loss (no logits), NPO reference log-probs precomputed. HF stack: the same model
with gradient checkpointing, full [B, T, V] logits through HF's own loss, torch AdamW on bf16 weights (the baseline
in the project's design brief: 8.2k tokens/s, 59.9 GiB after the optimizer step on an H100). Both see the same
batch: a forget and a retain micro-batch of 16 x 256 tokens (200 answer tokens each); BS-S adds N beliefs of 200
tokens per forget prompt.
The LoRA cases (``lora_*``: ``train.memory_plan=lora24``, rank 16 on every linear layer over frozen bf16 weights, the
24 GB plan) and the offload case (``offload_*``: ``train.memory_plan=offload40``, FSDP2 CPU offload of parameters,
gradients and 8-bit optimizer states in a 1-rank process group, the 40 GB plan) run the trainer's own
``parallelize``; their peak GPU memory is what the computed budgets (``python -m benchmarks.memory_budget``) owe a
measurement of.
BS-S's belief regeneration is timed apart (16 prompts x N x 200 tokens with the sampler) and amortised over its
default schedule (every 2 epochs: each prompt's beliefs are redrawn every 2 passes over it).

Which cases run is chosen from the device's memory at run time (``planned_cases``: each case's computed peak
against ``torch.cuda.get_device_properties``'s total less a reserve): on an H100 80 GB and an H200 alike every case
fits, so their numbers compare; a smaller GPU skips what it cannot hold, with the reason in its row, instead of
running out of memory. ``--list`` prints that choice without a GPU.

Random weights, no download. One JSON object per case; the last line is a JSON list.
``--preset cpu`` is a different benchmark: bs_train's real ``train_step`` against the plain Hugging Face loop at
SmolLM2-135M's architecture and a TOFU batch, GradDiff / NPO / BS-T / BS-S, fp32 and bf16 (``train_step_cpu.py``).

    python -m benchmarks.bench_train_step                     # GPU preset (needs torchao; cases by GPU memory)
    python -m benchmarks.bench_train_step --list --memory-gib 79.6   # which GPU cases an H100 80 GB runs, and why
    python -m benchmarks.bench_train_step --preset cpu --data ../shared/data/tofu   # ours vs the HF loop, CPU
    python -m benchmarks.bench_train_step --preset smoke      # a tiny shape (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks import train_step_cpu
from benchmarks.common import (GPU_MEMORY_RESERVE_GIB, MODEL_PRESETS, device_name, emit, environment, finish,
                               gpu_memory_gib, host_memory_gib, pick_device, random_llama, sync)
from bs_kernels import IGNORE_INDEX
from bs_train import methods
from bs_train.methods.beliefs import BeliefSet, draw_beliefs
from bs_train.config import MethodConfig, load_config
from bs_train.data import collate
from bs_train.model import LossHead
from bs_train.lora import apply_lora
from bs_train.optim import build_optimizer
from bs_train.trainer import parallelize, setup_distributed

# Dense bf16 peak FLOP/s by device name, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
# rows per micro-batch and tokens per row (ours); the cpu preset's batch is TOFU's (train_step_cpu.py)
BATCH = {"gpu": dict(b=16, prompt=56, answer=200), "smoke": dict(b=2, prompt=8, answer=24)}
PRESETS = ("cpu", "gpu", "smoke")
# (case label, method, its settings, whether it trains on sampled beliefs)
CASES = [("ga", "ga", {}, False), ("npo", "npo", {}, False), ("bs_t", "bs_t", {}, False),
         ("bs_s_n3", "bs_s", {"bss_samples": 3}, True), ("bs_s_n8", "bs_s", {"bss_samples": 8}, True)]
# (case label, memory plan, method, its settings, beliefs): the 24 GB and 40 GB plans of docs/guides/gpus.md
PLAN_CASES = [("lora_npo", "lora24", "npo", {}, False), ("lora_bs_t", "lora24", "bs_t", {}, False),
              ("lora_bs_s_n3", "lora24", "bs_s", {"bss_samples": 3}, True),
              ("offload_bs_t", "offload40", "bs_t", {}, False)]


def hf_stack_peak_gib(spec: dict, shape: dict) -> float:
    """The HF stack's computed peak (ours): bf16 weights, gradients and torch AdamW's two bf16 states (8 bytes a
    parameter), checkpointed block boundaries, one recomputed block, and for each of its two forwards the bf16 logits
    and the float32 copy HF's loss keeps for backward. The design brief measured 59.9 GiB after the step on an H100."""
    from bs_train.memory import Shape

    m = Shape.of(spec)
    tokens = shape["b"] * (shape["prompt"] + shape["answer"])
    boundary = m.num_hidden_layers * m.hidden_size * 2 * 2 * tokens
    return (8 * m.params() + boundary + m.block_activation_bytes_per_token() * tokens
            + 2 * tokens * m.vocab_size * (2 + 4)) / 2**30


def planned_cases(spec: dict, shape: dict, memory_gib: float | None, host_gib: float) -> list[dict]:
    """The GPU cases in run order, each with its computed peak (``bs_train.memory.budget`` for ours, at this batch)
    and whether it fits ``memory_gib`` less ``GPU_MEMORY_RESERVE_GIB`` (and, for the offload plan, the host's memory):
    what one job runs on an H100 or an H200 is chosen here, from the device's memory, never by an out-of-memory."""
    from bs_train.memory import Shape, Workload, budget

    m = Shape.of(spec)
    usable = None if memory_gib is None else memory_gib - GPU_MEMORY_RESERVE_GIB

    def work(method, overrides):
        return Workload(method=method, batch=shape["b"], seq=shape["prompt"] + shape["answer"],
                        beliefs=overrides.get("bss_samples", 3), prompts_per_round=shape["b"],
                        prompt_len=shape["prompt"], new_tokens=shape["answer"])

    rows = [{"case": "hf_stack_graddiff", "need_gib": round(hf_stack_peak_gib(spec, shape), 1)}]
    for label, method, overrides, _ in CASES:
        rows.append({"case": f"ours_{label}", "need_gib": budget(m, "full80", work(method, overrides))["peak_gib"]})
    for label, plan, method, overrides, _ in PLAN_CASES:
        b = budget(m, plan, work(method, overrides))
        rows.append({"case": f"ours_{label}", "need_gib": b["peak_gib"], "host_need_gib": b.get("host_gib")})
    for r in rows:
        short = []
        if usable is not None and r["need_gib"] > usable:
            short.append(f"needs ~{r['need_gib']:.0f} GiB (computed), the GPU has {memory_gib:.0f} GiB less "
                         f"{GPU_MEMORY_RESERVE_GIB:.0f} GiB of reserve")
        if r.get("host_need_gib") and r["host_need_gib"] > 0.9 * host_gib:
            short.append(f"needs ~{r['host_need_gib']:.0f} GiB of host memory (computed), the host has "
                         f"{host_gib:.0f} GiB")
        r.update(memory_gib=None if memory_gib is None else round(memory_gib, 1), fits=not short,
                 reason="; ".join(short) or None)
    return rows


def qa_batch(b, prompt, answer, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(b):
        ids = torch.randint(10, vocab, (prompt + answer,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "index": i})
    return collate(items, pad_id=0)


def fake_beliefs(forget, n, answer, vocab, seed) -> BeliefSet:
    g = torch.Generator().manual_seed(seed)
    prompts = [row[row_l == IGNORE_INDEX].tolist() for row, row_l in zip(forget["input_ids"], forget["labels"])]
    answers = [[torch.randint(10, vocab, (answer,), generator=g).tolist() for _ in range(n)] for _ in prompts]
    return BeliefSet(prompts, answers, [[-300.0] * n for _ in prompts], round=1)


def train_flops(model, tokens: int, seq: int) -> float:
    """6 N per token for the matmuls plus the attention scores (12 L T d per token), forward and backward."""
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    return tokens * (6 * n_params + 12 * cfg.num_hidden_layers * seq * cfg.hidden_size)


def bench_case(name, step_fn, model, tokens, seq, device, reps, extra=None):
    step_fn()  # warm-up; also allocates the optimizer states
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    row = {"case": name, "tokens": tokens, "s_median": t, "tokens_per_s": tokens / t, "reps": reps, **(extra or {})}
    if device == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None)
        if peak:
            row["mfu"] = train_flops(model, tokens, seq) / t / peak
    return row


def ours(spec, shape, device, label, method, overrides, with_beliefs, reps, plan="full80"):
    cfg = load_config(None, [f"train.memory_plan={plan}", "train.lr=1e-5"], command="unlearn")
    model = random_llama({**spec, "dtype": "bfloat16"}, device).train()
    if cfg.model.lora_rank:
        apply_lora(model, cfg.model)
    if cfg.train.cpu_offload:
        setup_distributed(single_group=True)  # fully_shard needs a (1-rank) process group
    head = parallelize(LossHead(model), cfg, 1, torch.bfloat16 if cfg.train.cpu_offload else None)
    optim = build_optimizer([p for p in head.parameters() if p.requires_grad], cfg.train, use_cuda=device == "cuda")
    mcfg = MethodConfig(name=method, **overrides)
    impl = "triton" if device == "cuda" else "torch"
    vocab = spec["vocab_size"]
    forget = {k: v.to(device) for k, v in qa_batch(shape["b"], shape["prompt"], shape["answer"], vocab, 0).items()}
    retain = {k: v.to(device) for k, v in qa_batch(shape["b"], shape["prompt"], shape["answer"], vocab, 1).items()}
    st = methods.MethodState(mcfg, impl, ref_logp=torch.full((shape["b"],), -400.0))
    beliefs, extra = None, {}
    if with_beliefs:
        st.beliefs = fake_beliefs(forget, mcfg.bss_samples, shape["answer"], vocab, 2)
        beliefs = {k: v.to(device) for k, v in st.beliefs.batch(list(range(shape["b"])), 0).items()}
        prompts = st.beliefs.prompts
        regen_cfg = MethodConfig(name="bs_s", bss_samples=mcfg.bss_samples, bss_max_new_tokens=shape["answer"],
                                 bss_prompts_per_round=shape["b"])
        sync(device)
        t0 = time.perf_counter()
        draw_beliefs(head, model, prompts, regen_cfg, eos_id=-1, pad_id=0, seed=0, round_=1)
        sync(device)
        regen = time.perf_counter() - t0
        extra = {"regen_s_per_batch": regen, "regen_s_per_step_amortised": regen / 2}
    counts = methods.local_counts({k: v.cpu() for k, v in forget.items()}, {k: v.cpu() for k, v in retain.items()},
                                  {k: v.cpu() for k, v in beliefs.items()} if beliefs else None)
    norms = methods.Norms(*counts.float().clamp_min(1).to(device).unbind())
    use_retain = methods.needs_retain(mcfg)

    def step():
        loss, _ = methods.method_loss(head, forget, retain if use_retain else None, st, norms, beliefs=beliefs)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    tokens = int(forget["attention_mask"].sum() + (retain["attention_mask"].sum() if use_retain else 0)
                 + (beliefs["attention_mask"].sum() if beliefs else 0))
    row = bench_case(f"ours_{label}", step, model, tokens, shape["prompt"] + shape["answer"], device, reps, extra)
    row["memory_plan"] = plan
    return row


def hf_stack(spec, shape, device, reps):
    model = random_llama({**spec, "dtype": "bfloat16"}, device).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda" or None)
    vocab = spec["vocab_size"]
    forget = {k: v.to(device) for k, v in qa_batch(shape["b"], shape["prompt"], shape["answer"], vocab, 0).items()}
    retain = {k: v.to(device) for k, v in qa_batch(shape["b"], shape["prompt"], shape["answer"], vocab, 1).items()}

    def step():  # GradDiff with full logits: -NLL(forget) + NLL(retain)
        f = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"], labels=forget["labels"])
        r = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"], labels=retain["labels"])
        (-f.loss + r.loss).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    tokens = int(forget["attention_mask"].sum() + retain["attention_mask"].sum())
    row = bench_case("hf_stack_graddiff", step, model, tokens, shape["prompt"] + shape["answer"], device, reps)
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path)
    p.add_argument("--list", action="store_true", help="print the GPU cases with their computed memory and whether "
                   "each fits this device (or --memory-gib), and exit: no GPU needed")
    p.add_argument("--memory-gib", type=float, help="the GPU memory to choose cases for (default: the device's)")
    cpu = p.add_argument_group("--preset cpu (ours vs the HF loop)")
    cpu.add_argument("--data", type=Path, help="TOFU folder (forget10, retain90, forget10_perturbed .jsonl); "
                     "without it, random ids of the same token lengths")
    cpu.add_argument("--methods", nargs="*", default=list(train_step_cpu.METHOD_NAMES),
                     choices=train_step_cpu.METHOD_NAMES)
    cpu.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    cpu.add_argument("--warmup", type=int, default=1)
    cpu.add_argument("--threads", type=int, default=1, help="torch threads of each measuring process")
    cpu.add_argument("--tiny", action="store_true", help="a 2-layer model and short rows (the script's test)")
    cpu.add_argument("--in-process", action="store_true", help="measure here, not in a fresh process per method")
    args = p.parse_args(argv)
    device = pick_device()
    preset = args.preset or ("gpu" if device == "cuda" or args.list else "cpu")
    if args.list or preset != "cpu":
        spec, shape = MODEL_PRESETS["gpu" if args.list else preset], BATCH["gpu" if args.list else preset]
        memory = args.memory_gib if args.memory_gib is not None else gpu_memory_gib()
        plan = planned_cases(spec, shape, memory, host_memory_gib())
        if args.list:
            return finish(plan, args.out)
    if preset == "cpu":
        env = {**environment("benchmarks.bench_train_step", argv), "device": "cpu"}
        rows = train_step_cpu.run(data=args.data, methods_=args.methods, dtypes=args.dtypes, warmup=args.warmup,
                                  reps=args.reps, threads=args.threads, tiny=args.tiny, env=env,
                                  emit=lambda row: emit(row, [], "cpu"), in_process=args.in_process)
        return finish(rows, args.out)
    env = {**environment("benchmarks.bench_train_step", argv), "device": device_name(device), "gpu_memory_gib": memory,
           "shape": {k: spec[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}, "batch": shape}
    rows = []
    runs = [lambda: hf_stack(spec, shape, device, args.reps)]
    runs += [lambda c=c: ours(spec, shape, device, *c, args.reps) for c in CASES]
    runs += [lambda c=c: ours(spec, shape, device, c[0], *c[2:], args.reps, plan=c[1]) for c in PLAN_CASES]
    for fn, need in zip(runs, plan, strict=True):
        if not need["fits"]:
            emit({"case": need["case"], "skipped": need["reason"], "need_gib": need["need_gib"], **env}, rows, device)
            continue
        try:
            row = fn()
        except torch.OutOfMemoryError as e:
            row = {"case": need["case"], "skipped": f"out of memory: {str(e)[:200]}"}
        emit({**row, "need_gib": need["need_gib"], **env}, rows, device)
    if torch.distributed.is_initialized():  # the offload case's 1-rank group
        torch.distributed.destroy_process_group()
    return finish(rows, args.out)


if __name__ == "__main__":
    main()
