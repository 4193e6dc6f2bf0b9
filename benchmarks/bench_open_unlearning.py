"""open-unlearning's loss helpers against their fused drop-ins (``bs_kernels.open_unlearning``): peak memory and time.

What it shows: an open-unlearning user who changes one import keeps the numbers and drops the [B, T, V] logits from
every loss. Both providers run the same model on the same batch, forward + backward of one helper:

  reference   the helper as open-unlearning writes it (src/trainer/utils.py, ceu.py; the fork's bst.py), over the
              model's full logits (``benchmarks/ou_reference.py``, transcribed formula by formula)
  fused       the drop-in of the same name (``bs_kernels.open_unlearning``): decoder, then the fused lm_head losses

The model is a causal LM cut down to its head: the hidden states are a frozen random embedding of the ids times a
trained per-channel scale (a decoder of no cost, so the lm_head is what is measured), then the untied lm_head
[V, D], which trains. ``--preset cpu`` is SmolLM2-135M's head (D 576, V 49152) at a TOFU micro-batch (8 x 128
tokens), float32; ``gpu`` is Llama-3.1-8B's (D 4096, V 128256) at 8 x 512, bfloat16; ``smoke`` a tiny shape for the
tests. Providers interleaved case by case and rep by rep, warm-up excluded, medians; one JSON object per case.

Peak memory. CPU: the live-tensor peak during forward + backward beyond what existed before (``LiveBytes``: every
storage from the op that creates it until it is freed; allocator caches and BLAS scratch not included), and the same
without the parameters' gradients ("beyond grads"). CUDA: ``torch.cuda.max_memory_allocated`` above the memory
allocated before the call.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_open_unlearning --preset cpu --threads 1 \\
        --out benchmarks/results/open_unlearning_cpu.json        # on a quiet machine: load average < 0.5
    python -m benchmarks.bench_open_unlearning --preset cpu --threads 1 --reps 0 \\
        --out benchmarks/results/open_unlearning_cpu_memory.json  # peak memory only: valid on a busy machine too
    python -m benchmarks.bench_open_unlearning --preset gpu --out benchmarks/results/open_unlearning_gpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks import ou_reference as ref
from benchmarks.common import LiveBytes, device_name, emit, environment, finish, pick_device, sync
from bs_kernels import open_unlearning as ou

PRESETS = {
    "cpu": dict(d=576, v=49152, batch=8, seq=128, dtype="float32"),  # SmolLM2-135M's head, a TOFU micro-batch
    "gpu": dict(d=4096, v=128256, batch=8, seq=512, dtype="bfloat16"),  # Llama-3.1-8B's head
    "smoke": dict(d=32, v=512, batch=2, seq=16, dtype="float32"),
}
PROVIDERS = ("reference", "fused")


class _Decoder(torch.nn.Module):
    def __init__(self, v: int, d: int):
        super().__init__()
        self.embed = torch.nn.Embedding(v, d).requires_grad_(False)
        self.scale = torch.nn.Parameter(torch.ones(d))

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids) * self.scale)


class HeadOnlyLM(torch.nn.Module):
    """A causal LM cut down to its head, with the Hugging Face interface both providers use: ``forward`` (logits and
    the mean-NLL ``loss``), ``get_decoder`` and ``get_output_embeddings``."""

    def __init__(self, v: int, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.decoder = _Decoder(v, d)
        self.lm_head = torch.nn.Linear(d, v, bias=False)
        with torch.no_grad():
            self.decoder.embed.weight.copy_(torch.randn(v, d, generator=g))
            self.lm_head.weight.copy_(torch.randn(v, d, generator=g) / d**0.5)

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        logits = self.lm_head(self.decoder(input_ids).last_hidden_state)
        loss = None
        if labels is not None:  # Hugging Face's causal-LM loss: shifted, float32, mean over labelled tokens
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return SimpleNamespace(logits=logits, loss=loss)


def make_batch(v: int, batch: int, seq: int, device: str, seed: int = 0) -> dict:
    """A TOFU-like batch: a prompt of a quarter of the width, answers of ragged length, right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, v, (batch, seq), generator=g)
    labels = ids.clone()
    prompt = seq // 4
    labels[:, :prompt] = -100
    for i in range(batch):
        end = seq - (i * seq // (2 * batch))
        labels[i, end:] = -100
        ids[i, end:] = 1
    mask = (labels != -100) | (torch.arange(seq) < prompt)
    return {k: t.to(device) for k, t in {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}.items()}


def cases(f, w):
    """helper name -> (reference call, fused call), each ``(model, ref_model) -> loss``."""
    return {
        "compute_batch_nll": (lambda m, r: ref.compute_batch_nll(m, f)[0].sum(),
                              lambda m, r: ou.compute_batch_nll(m, f)[0].sum()),
        "compute_dpo_loss (NPO)": (lambda m, r: ref.compute_dpo_loss(m, r, None, f, 0.1)[0],
                                   lambda m, r: ou.compute_dpo_loss(m, r, None, f, 0.1)[0]),
        "compute_kl_divergence": (lambda m, r: ref.compute_kl_divergence(m, r, w)[0],
                                  lambda m, r: ou.compute_kl_divergence(m, r, w)[0]),
        "compute_undial_loss": (lambda m, r: ref.compute_undial_loss(m, r, f, 10.0)[0],
                                lambda m, r: ou.compute_undial_loss(m, r, f, 10.0)[0]),
        "compute_wga_loss": (lambda m, r: ref.compute_wga_loss(m, f, 1.0)[0],
                             lambda m, r: ou.compute_wga_loss(m, f, 1.0)[0]),
        "compute_satimp_loss": (lambda m, r: ref.compute_satimp_loss(m, f, 5.0, 1.0)[0],
                                lambda m, r: ou.compute_satimp_loss(m, f, 5.0, 1.0)[0]),
        "compute_batch_ceu": (lambda m, r: ref.compute_batch_ceu(m, f, 1)[0],
                              lambda m, r: ou.compute_batch_ceu(m, f, 1)[0]),
        "compute_bst_loss (fork)": (lambda m, r: ref.compute_bst_loss(m, f, 0.2, 20)[0],
                                    lambda m, r: ou.compute_bst_loss(m, f, 0.2, 20)[0]),
    }


def _step(fn, model, ref_model) -> float:
    model.zero_grad(set_to_none=True)
    loss = fn(model, ref_model)
    loss.backward()
    return float(loss.detach())


def _peak(fn, model, ref_model, device: str) -> tuple[int, int]:
    """(peak bytes beyond what existed before the call, the same without the parameters' gradients)."""
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(model, ref_model).backward()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - before
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        return peak, peak - grads
    mode = LiveBytes()
    with mode:
        fn(model, ref_model).backward()
    grads = tuple(p.grad for p in model.parameters() if p.grad is not None)
    return mode.peak(), mode.peak(exclude=grads)


def measure(name: str, fns, model, ref_model, device: str, warmup: int, reps: int) -> list[dict]:
    """Both providers of one helper, interleaved rep by rep (``reps=0``: memory only, no timing)."""
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    losses = {p: _step(fn, model, ref_model) for p, fn in zip(PROVIDERS, fns)}
    for _ in range(warmup if reps else 0):
        for fn in fns:
            _step(fn, model, ref_model)
    for _ in range(reps):
        for p, fn in zip(PROVIDERS, fns):
            sync(device)
            t0 = time.perf_counter()
            _step(fn, model, ref_model)
            sync(device)
            times[p].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for p, fn in zip(PROVIDERS, fns):
        peak, beyond = _peak(fn, model, ref_model, device)
        ms = round(statistics.median(times[p]), 2) if times[p] else None
        rows.append({"helper": name, "provider": p, "loss": losses[p], "ms_median": ms,
                     "ms_all": [round(t, 2) for t in times[p]], "reps": reps, "peak_bytes": peak,
                     "peak_bytes_beyond_grads": beyond})
    ref_ms, fused_ms = (r["ms_median"] for r in rows)
    ref_peak, fused_peak = (r["peak_bytes"] for r in rows)
    rows[1].update(time_vs_reference=round(fused_ms / ref_ms, 3) if reps else None,
                   peak_vs_reference=round(fused_peak / ref_peak, 4),
                   loss_rel_diff=abs(losses["fused"] - losses["reference"]) / max(abs(losses["reference"]), 1e-30))
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu with CUDA, else cpu")
    p.add_argument("--helpers", help="comma-separated helper names (default: all)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per provider; 0: memory only (the peak is "
                   "the same on a busy machine, the time is not)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (the CPU: pass 1 or 2 on a quiet machine)")
    p.add_argument("--out", type=Path, help="also write all cases (with the environment) to this JSON file")
    args = p.parse_args(argv)
    device = pick_device()
    spec = PRESETS[args.preset or ("gpu" if device == "cuda" else "cpu")]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, spec["dtype"])
    model = HeadOnlyLM(spec["v"], spec["d"], seed=0).to(device=device, dtype=dtype)
    ref_model = HeadOnlyLM(spec["v"], spec["d"], seed=1).to(device=device, dtype=dtype).eval()
    f = make_batch(spec["v"], spec["batch"], spec["seq"], device, seed=0)
    w = make_batch(spec["v"], spec["batch"], spec["seq"], device, seed=1)
    all_cases = cases(f, w)
    chosen = args.helpers.split(",") if args.helpers else list(all_cases)
    unknown = sorted(set(chosen) - set(all_cases))
    if unknown:
        raise SystemExit(f"unknown helper(s) {unknown}; choose from {list(all_cases)}")
    env = {**environment("benchmarks.bench_open_unlearning", argv), "device": device_name(device),
           "preset": args.preset or ("gpu" if device == "cuda" else "cpu"), **spec,
           "tokens": spec["batch"] * spec["seq"]}
    rows: list[dict] = []
    for name in chosen:
        load = round(os.getloadavg()[0], 2)  # the machine may be shared: say how busy it was at each case
        for row in measure(name, all_cases[name], model, ref_model, device, args.warmup, args.reps):
            emit({**row, **env, "load_avg_1m": load}, rows, device)
    return finish(rows, args.out)


if __name__ == "__main__":
    main()
