"""Benchmark the belief sampler against Hugging Face ``generate`` on the same model and prompts.

BS-S draws N responses per forget prompt over and over during training. The reference point (the project's design
brief, H100): HF ``generate`` on an 8B model, 32 prompts x 3 samples x 200 new tokens, 7.4 s (2.6k tokens/s), while
reading the weights once per decode step bounds it near 1 s. Both providers here sample at temperature 1 with EOS
disabled, so every row decodes exactly ``--new`` tokens. One JSON object per provider on stdout; the last line is a
JSON list.

    python -m benchmarks.bench_sampler                    # GPU: Llama-3.1-8B shapes, random bf16 weights
    python -m benchmarks.bench_sampler --preset cpu       # a small random Llama on the CPU
    python -m benchmarks.bench_sampler --out benchmarks/results/sampler_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import MODEL_PRESETS, device_name, emit, environment, finish, pick_device, random_llama, sync
from bs_train.sampler import SamplingConfig, bandwidth_floor_s, sample


def make_prompts(n_prompts: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(40, 81, (n_prompts,), generator=g).tolist()
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]


def run_ours(model, prompts, n, new, device):
    gen = torch.Generator(device=device).manual_seed(0)
    cfg = SamplingConfig(n=n, max_new_tokens=new, temperature=1.0)
    out = sample(model, prompts, cfg, eos_id=-1, pad_id=0, generator=gen)
    return int(out.lengths.sum())


def run_hf(model, prompts, n, new, device):
    length = max(map(len, prompts))
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p)
        mask[i, length - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=0, eos_token_id=None)
    return int((out.shape[1] - length) * out.shape[0])


def measure(name, fn, model, prompts, spec, device, reps):
    sync(device)
    fn(model, prompts, spec["n"], min(spec["new"], 8), device)  # warm-up (and compile, for ours on CUDA)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times, tokens = [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        tokens = fn(model, prompts, spec["n"], spec["new"], device)
        sync(device)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    row = {"provider": name, "prompts": len(prompts), "n": spec["n"], "new_tokens": spec["new"],
           "tokens": tokens, "s_median": t, "s_min": min(times), "tokens_per_s": tokens / t, "reps": reps}
    floor = bandwidth_floor_s(model, spec["new"])
    if floor is not None:
        row.update(floor_s=floor, fraction_of_floor=floor / t)
    if device == "cuda":
        row["peak_gib_beyond_weights"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--providers", default="bs_sampler,hf_generate")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = pick_device()
    spec = MODEL_PRESETS[args.preset or ("gpu" if device == "cuda" else "cpu")]
    model = random_llama(spec, device)
    prompts = make_prompts(spec["prompts"], spec["vocab_size"])
    env = {**environment("benchmarks.bench_sampler", argv), "device": device_name(device),
           "shape": {k: spec[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size", "dtype")}}
    fns = {"bs_sampler": run_ours, "hf_generate": run_hf}
    rows = []
    for name in args.providers.split(","):
        emit({**measure(name, fns[name], model, prompts, spec, device, args.reps), **env}, rows, device)
    if len(rows) == 2:
        speedup = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
        print(json.dumps({"speedup_vs_hf_generate": speedup}), flush=True)
    return finish(rows, args.out)


if __name__ == "__main__":
    main()
