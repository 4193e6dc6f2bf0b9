"""The computed memory budget of every memory plan (``train.memory_plan``) for a model, as JSON.

Not a measurement: ``bs_train.memory.budget`` adds up, per component, what one GPU holds at the peak of a training
step and of a BS-S sampling round, from the model's shapes and each plan's own batch settings (``memory.PLANS``);
for the offload plan also the host memory and the tokens/s the PCIe copies allow under the stated bandwidth
assumptions. Every row says ``"computed": true``; ``python -m benchmarks.bench_train_step`` measures on a GPU.

    python -m benchmarks.memory_budget                                  # Llama-3.1-8B shapes
    python -m benchmarks.memory_budget --config path/to/config.json     # any Llama-family HF config
    python -m benchmarks.memory_budget --out benchmarks/results/memory_budget_8b_computed.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import MODEL_PRESETS, environment, finish
from bs_train.memory import PLANS, PCIE_GBPS, Shape, Workload, budget


def plan_workload(plan: str, method: str) -> Workload:
    """The step a plan runs: its micro-batch and BS-S prompts per sampling call (its settings, else the defaults)."""
    s = PLANS[plan]["settings"]
    return Workload(method=method, batch=s["train"].get("batch_size", 8),
                    prompts_per_round=s.get("method", {}).get("bss_prompts_per_round", 32))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="a Hugging Face config.json (default: Llama-3.1-8B's shapes)")
    p.add_argument("--pcie-gbps", type=float, default=PCIE_GBPS, help="effective PCIe GB/s each way (offload plan)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    shape = Shape.of(json.loads(args.config.read_text()) if args.config else MODEL_PRESETS["gpu"])
    env = environment("benchmarks.memory_budget", argv)
    rows = []
    for plan in PLANS:
        for method in ("graddiff", "bs_s"):
            row = {"case": f"{plan}_{method}", **budget(shape, plan, plan_workload(plan, method),
                                                        pcie_gbps=args.pcie_gbps), **env}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return finish(rows, args.out)


if __name__ == "__main__":
    main()
