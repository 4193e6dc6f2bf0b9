"""Markdown tables from benchmark result files: what the performance tables of the README and docs/ show, rendered,
not retyped.

    python -m benchmarks.tables losses benchmarks/results/losses_cpu_xeon.json
    python -m benchmarks.tables losses_summary benchmarks/results/losses_cpu_xeon.json    # N >= 4096, ours' ratios
    python -m benchmarks.tables train_step benchmarks/results/train_step_cpu_xeon.json
    python -m benchmarks.tables sampler benchmarks/results/sampler_cpu_xeon.json

Ratios are against the stack a provider replaces: the naive full-logits formula (``torch``) for the loss primitive,
the plain Hugging Face loop for the training step, HF ``generate`` for the sampler. Every ratio is taken within one
file, so within one run of interleaved providers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LOSS_NAMES = {
    "bs_kernels": "ours fused",
    "bs_kernels_recompute": "ours recompute",
    "torch": "naive full logits",
    "torch_compile": "`torch.compile` of naive",
    "torch_lce": "PyTorch chunked `linear_cross_entropy`",
    "liger_flce": "Liger fused linear CE",
    "cce": "Cut Cross-Entropy",
    "gemm3": "three GEMMs (floor)",
}
METHOD_NAMES = {"graddiff": "GradDiff", "npo": "NPO", "bs_t": "BS-T", "bs_s": "BS-S (N = 3 given beliefs)"}


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def losses_table(rows: list[dict]) -> str:
    """One line per measured provider and case: time, × naive, peak memory beyond the gradients, × naive."""
    measured = [r for r in rows if "provider" in r and r.get("ms_median") is not None]
    naive = {(r["dtype"], r["n"], r["lam"]): r for r in measured if r["provider"] == "torch"}
    out = ["| dtype | N | λ | provider | time | × naive | peak beyond grads | × naive |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(measured, key=lambda r: (r["dtype"] != "float32", r["n"], -r["lam"])):
        base = naive.get((r["dtype"], r["n"], r["lam"]))
        t = r["ms_median"] / 1e3
        mem = r.get("peak_bytes_beyond_grads")
        t_ratio = f"{r['ms_median'] / base['ms_median']:.2f}" if base else "–"
        m_ratio = (f"{mem / base['peak_bytes_beyond_grads']:.3f}" if base and mem is not None
                   and base.get("peak_bytes_beyond_grads") else "–")
        out.append(f"| {r['dtype']} | {r['n']} | {r['lam']:g} | {LOSS_NAMES.get(r['provider'], r['provider'])} "
                   f"| {t:.2f} s | {t_ratio} | {'–' if mem is None else _mib(mem)} | {m_ratio} |")
    return "\n".join(out)


def losses_summary_table(rows: list[dict], min_n: int = 4096) -> str:
    """One line per case with N >= ``min_n``: ours fused against naive, ``torch.compile`` of naive and PyTorch's
    chunked CE (plain CE cases), time and memory (the docs' compact form of ``losses_table``)."""
    measured = [r for r in rows if "provider" in r and r.get("ms_median") is not None and r["n"] >= min_n]
    by = {(r["provider"], r["dtype"], r["n"], r["lam"]): r for r in measured}
    out = ["| dtype | N | λ | ours fused | × naive | × `torch.compile` naive | × chunked CE | peak beyond grads: ours "
           "(× naive) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    cases = sorted({k[1:] for k in by if k[0] == "bs_kernels"}, key=lambda c: (c[0] != "float32", c[1], -c[2]))
    for dtype, n, lam in cases:
        ours = by[("bs_kernels", dtype, n, lam)]

        def ratio(provider):
            other = by.get((provider, dtype, n, lam))
            return f"{ours['ms_median'] / other['ms_median']:.2f}" if other else "–"

        naive = by.get(("torch", dtype, n, lam))
        mem = ours.get("peak_bytes_beyond_grads")
        share = (f" ({mem / naive['peak_bytes_beyond_grads']:.3f})"
                 if mem is not None and naive and naive.get("peak_bytes_beyond_grads") else "")
        mem_s = "–" if mem is None else _mib(mem) + share
        out.append(f"| {dtype} | {n} | {lam:g} | {ours['ms_median'] / 1e3:.2f} s | **{ratio('torch')}** "
                   f"| {ratio('torch_compile')} | {ratio('torch_lce')} | {mem_s} |")
    return "\n".join(out)


def train_step_table(rows: list[dict]) -> str:
    """One line per method and dtype: seconds per step both sides, tokens/s ratio, peak RSS delta ratio, losses."""
    ours = [r for r in rows if r.get("provider") == "ours"]
    hf = {(r["method"], r["dtype"]): r for r in rows if r.get("provider") == "hf_loop"}
    out = ["| dtype | method | tokens | ours s/step | HF loop s/step | ours / HF tokens/s | peak RSS delta ours / HF "
           "| first-step loss ours / HF |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(ours, key=lambda r: (r["dtype"] != "float32", list(METHOD_NAMES).index(r["method"])
                                         if r["method"] in METHOD_NAMES else 99)):
        h = hf.get((r["method"], r["dtype"]))
        if h is None:
            continue
        out.append(f"| {r['dtype']} | {METHOD_NAMES.get(r['method'], r['method'])} | {r['tokens']} "
                   f"| {r['s_median']:.2f} | {h['s_median']:.2f} | **{r['tokens_per_s'] / h['tokens_per_s']:.2f}x** "
                   f"| {r['peak_rss_delta_mib']:.0f} / {h['peak_rss_delta_mib']:.0f} MiB "
                   f"({r['peak_rss_delta_mib'] / h['peak_rss_delta_mib']:.2f}x) "
                   f"| {r['first_step_loss']:.5f} / {h['first_step_loss']:.5f} |")
    return "\n".join(out)


def sampler_table(rows: list[dict]) -> str:
    """One line per dtype: both providers' median seconds per round, the time ratio and the per-rep ratios."""
    timed = [r for r in rows if "provider" in r]
    out = ["| weights | round | ours (s, median) | HF `generate` (s, median) | ours / HF time | per-rep ratios |",
           "| --- | --- | --- | --- | --- | --- |"]
    for dtype in dict.fromkeys(r["dtype"] for r in timed):
        by = {r["provider"]: r for r in timed if r["dtype"] == dtype}
        a, b = by.get("bs_sampler"), by.get("hf_generate")
        if a is None or b is None:
            continue
        reps = ", ".join(f"{x / y:.2f}" for x, y in zip(a["s_all"], b["s_all"]))
        out.append(f"| {dtype} | {a['prompts']} × {a['n']} × {a['new_tokens']} | {a['s_median']:.1f} "
                   f"| {b['s_median']:.1f} | **{a['s_median'] / b['s_median']:.2f}x** | {reps} |")
    return "\n".join(out)


TABLES = {"losses": losses_table, "losses_summary": losses_summary_table, "train_step": train_step_table,
          "sampler": sampler_table}


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=sorted(TABLES))
    p.add_argument("files", nargs="+", type=Path, help="result JSON files (lists of rows), concatenated")
    args = p.parse_args(argv)
    rows = []
    for f in args.files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{f}: not a readable results file ({e})") from None
        rows += data if isinstance(data, list) else [data]
    table = TABLES[args.kind](rows)
    print(table)
    return table


if __name__ == "__main__":
    main()
