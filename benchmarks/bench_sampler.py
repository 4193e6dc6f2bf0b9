"""Benchmark the belief sampler against Hugging Face ``generate`` on the same model and prompts.

BS-S draws N responses per forget prompt over and over during training. The reference point (DESIGN.md, H100):
HF ``generate`` on an 8B model, 32 prompts x 3 samples x 200 new tokens, 7.4 s (2.6k tokens/s), while reading the
weights once per decode step bounds it near 1 s. Both providers here sample at temperature 1 with EOS disabled, so
every row decodes exactly ``--new`` tokens. One JSON object per provider on stdout; the last line is a JSON list.

    python benchmarks/bench_sampler.py                    # GPU: Llama-3.1-8B shapes, random bf16 weights
    python benchmarks/bench_sampler.py --preset cpu       # a small random Llama on the CPU
    python benchmarks/bench_sampler.py --out benchmarks/results/sampler_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_losses import emit, environment, finish  # noqa: E402

from bs_train.model import cast_parameters  # noqa: E402
from bs_train.sampler import SamplingConfig, bandwidth_floor_s, sample  # noqa: E402

PRESETS = {
    # Llama-3.1-8B
    "gpu": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, dtype="bfloat16", prompts=32, n=3, new=200),
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=4096, dtype="float32", prompts=4, n=3, new=32),
}


def random_llama(spec: dict, device: str):
    """A Llama with random weights, built on the meta device and materialised directly on ``device``."""
    import transformers

    cfg = transformers.LlamaConfig(**{k: spec[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                            "num_attention_heads", "num_key_value_heads",
                                                            "vocab_size")},
                                   max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
        for m in model.modules():
            if "RMSNorm" in type(m).__name__:
                m.weight.fill_(1.0)
    with torch.device(device):  # to_empty left the rotary buffers uninitialised: rebuild them
        model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    return cast_parameters(model, getattr(torch, spec["dtype"])).eval()


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
    if device == "cuda":
        torch.cuda.synchronize()
    fn(model, prompts, spec["n"], min(spec["new"], 8), device)  # warm-up (and compile, for ours on CUDA)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times, tokens = [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        tokens = fn(model, prompts, spec["n"], spec["new"], device)
        if device == "cuda":
            torch.cuda.synchronize()
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
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--providers", default="bs_sampler,hf_generate")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = PRESETS[args.preset or ("gpu" if device == "cuda" else "cpu")]
    model = random_llama(spec, device)
    prompts = make_prompts(spec["prompts"], spec["vocab_size"])
    env = {**environment(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
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
