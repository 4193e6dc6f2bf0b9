"""Benchmark the belief sampler against Hugging Face ``generate`` on the same model and prompts.

BS-S draws N responses per forget prompt over and over during training. The reference point (the project's design
brief, H100): HF ``generate`` on an 8B model, 32 prompts x 3 samples x 200 new tokens, 7.4 s (2.6k tokens/s), while
reading the weights once per decode step bounds it near 1 s. Both providers here sample at temperature 1 with EOS
disabled, so every row decodes exactly ``--new`` tokens. One JSON object per provider and dtype on stdout, a ratio
row per dtype; the last line is a JSON list of them all. Providers are interleaved rep by rep, the warm-up
excluded, the median reported.

    python -m benchmarks.bench_sampler                    # GPU: Llama-3.1-8B shapes, random bf16 weights
    python -m benchmarks.bench_sampler --preset cpu       # SmolLM2-135M shapes on the CPU, fp32 and bf16
    python -m benchmarks.bench_sampler --preset smoke     # a tiny random Llama (seconds)
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


def measure(fns: dict, model, prompts, spec, device, reps) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per round for each provider, the providers interleaved rep by rep (on a shared machine a load change
    then hits both alike); one short warm-up round each first, excluded (and compile, for ours on CUDA)."""
    for fn in fns.values():
        fn(model, prompts, spec["n"], min(spec["new"], 8), device)
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    tokens = {}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            tokens[name] = fn(model, prompts, spec["n"], spec["new"], device)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times, tokens


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--providers", default="bs_sampler,hf_generate")
    p.add_argument("--dtypes", default=None, help="comma-separated weight dtypes; default: the preset's, and on the "
                                                 "CPU float32,bfloat16")
    p.add_argument("--prompts", type=int, default=None, help="default: the preset's")
    p.add_argument("--new", type=int, default=None, help="new tokens per sample; default: the preset's")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device()
    spec = dict(MODEL_PRESETS[args.preset or ("gpu" if device == "cuda" else "cpu")])
    spec.update({k: v for k, v in (("prompts", args.prompts), ("new", args.new)) if v})
    dtypes = args.dtypes.split(",") if args.dtypes else \
        ([spec["dtype"]] if device == "cuda" else ["float32", "bfloat16"])
    fns = {name: {"bs_sampler": run_ours, "hf_generate": run_hf}[name] for name in args.providers.split(",")}
    rows = []
    for dtype in dtypes:
        spec["dtype"] = dtype
        model = random_llama(spec, device)
        prompts = make_prompts(spec["prompts"], spec["vocab_size"])
        env = {**environment("benchmarks.bench_sampler", argv), "device": device_name(device),
               "shape": {k: spec[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size", "dtype")}}
        times, tokens = measure(fns, model, prompts, spec, device, args.reps)
        for name, ts in times.items():
            t = statistics.median(ts)
            row = {"provider": name, "dtype": dtype, "prompts": len(prompts), "n": spec["n"],
                   "new_tokens": spec["new"], "tokens": tokens[name], "s_median": t, "s_all": ts,
                   "tokens_per_s": tokens[name] / t, "reps": args.reps}
            floor = bandwidth_floor_s(model, spec["new"])
            if floor is not None:
                row.update(floor_s=floor, fraction_of_floor=floor / t)
            emit({**row, **env}, rows, device)
        if len(times) == 2:
            (a, ta), (b, tb) = times.items()
            ratio = {"dtype": dtype, f"time_{a}_over_{b}": statistics.median(ta) / statistics.median(tb),
                     "per_rep_ratios": [x / y for x, y in zip(ta, tb)]}
            print(json.dumps(ratio), flush=True)
            rows.append(ratio)
        del model
    return finish(rows, args.out)


if __name__ == "__main__":
    main()
