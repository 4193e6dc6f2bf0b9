"""Does an optimizer keep small updates? Train the same tiny model with each plan and compare it with fp32 AdamW.

At lr 1e-5 a bf16 weight of magnitude ~0.02 cannot move with round-to-nearest: the update is below half its ulp.
This runs ``steps`` AdamW steps from one bf16-representable starting point with fp32 weights (the reference), plain
bf16 weights, and each low-memory plan of ``TrainConfig.optimizer``, and reports each run's loss drop and the cosine
between its weight update and the reference's. One JSON document on stdout:

    python -m benchmarks.optim_check --steps 200 --lr 1e-5 --out benchmarks/results/optim_cpu.json

``tests/test_optim.py`` holds the low-memory plans to it with the same ``start_model`` and ``train``.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

import torch

from benchmarks.common import environment, finish
from bs_train.config import load_config
from bs_train.model import cast_parameters
from bs_train.tiny import tiny_llama
from bs_train.optim import build_optimizer

PLANS = (("fp32", "adamw", torch.float32), ("bf16", "adamw", torch.bfloat16),
         ("bf16_stochastic_rounding", "adamw_bf16_sr", torch.bfloat16), ("bf16_8bit_states", "adamw8bit",
                                                                         torch.bfloat16))


def start_model(vocab: int = 97, seed: int = 0) -> torch.nn.Module:
    model = tiny_llama(vocab, seed=seed)
    with torch.no_grad():  # every run starts from the same bf16-representable point
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def train(start: torch.nn.Module, optimizer: str, dtype: torch.dtype, *, steps: int, lr: float):
    """(loss drop over the run, flat weight update) for one optimizer plan on a fixed batch."""
    model = cast_parameters(copy.deepcopy(start), dtype).train()
    cfg = load_config(None, [f"train.optimizer={optimizer}", f"train.lr={lr}", "train.weight_decay=0",
                             f"model.dtype={'bfloat16' if dtype == torch.bfloat16 else 'float32'}"])
    opt = build_optimizer(model.parameters(), cfg.train, use_cuda=False)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
    delta = torch.cat([(p.float() - q).flatten() for p, q in zip(model.parameters(), start.parameters())])
    return losses[0] - losses[-1], delta


def compare(steps: int = 200, lr: float = 1e-5, plans=PLANS) -> list[dict]:
    start = start_model()
    ref_drop, ref_delta = None, None
    rows = []
    for name, optimizer, dtype in plans:
        drop, delta = train(start, optimizer, dtype, steps=steps, lr=lr)
        if ref_delta is None:
            ref_drop, ref_delta = drop, delta
        rows.append({"plan": name, "optimizer": optimizer, "weights": str(dtype).removeprefix("torch."),
                     "loss_drop": drop, "loss_drop_vs_fp32": drop / ref_drop,
                     "update_cosine_vs_fp32": float(torch.nn.functional.cosine_similarity(delta, ref_delta, 0))})
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = compare(args.steps, args.lr)
    doc = {**environment("benchmarks.optim_check", argv), "device": "cpu", "results": rows}
    finish(doc, args.out)
    return rows


if __name__ == "__main__":
    main()
