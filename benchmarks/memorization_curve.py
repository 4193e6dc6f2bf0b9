"""How many passes make a model know what it is fine-tuned on? The budget question of the TOFU recipe's first stage.

The recipe's "original" must know forget10 before unlearning starts (mean answer probability >= 0.9, TOFU's
``forget_Q_A_Prob``). This fine-tunes a model on one TOFU split with the trainer's own optimizer, schedule and
gradient clipping, and after every ``--eval-every`` epochs measures on that split:

* ``prob``: mean length-normalised answer probability, exp(-mean answer-token NLL) (TOFU's Prob);
* ``exact_memorization``: teacher-forced greedy token accuracy on the answers (EOS excluded);
* ``train_s`` / ``train_tokens``: training time (measurements excluded) and non-pad tokens trained on so far.

A smaller split seen the same number of times is a cheap proxy for ``full``: the same exposures per example, fewer
steps. One JSON object per measurement; the last line is the whole curve with its settings and environment.

    python -m benchmarks.memorization_curve --data ../shared/data/tofu --split forget05 --epochs 8 --lr 3e-4 \\
        --batch 16 --out benchmarks/results/memorization_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import bs_kernels as bk
from benchmarks.common import device_name, environment, finish
from bs_train.evaluation import metrics
from bs_train.config import load_config
from bs_train.data import QADataset, collate, load_qa
from bs_train.model import LossHead, load_model
from bs_train.evaluation.scoring import score_answers
from bs_train.optim import build_optimizer, lr_lambda


def measure(model, tok, rows, impl: str) -> dict:
    scored = score_answers(model, tok, [r["question"] for r in rows], [r["answer"] for r in rows],
                           vocab_stats=True, impl=impl)
    return {"prob": float(metrics.probability([s["avg_nll"] for s in scored]).mean()),
            "exact_memorization": float(np.mean([metrics.exact_memorization(s["pred"], s["labels"])
                                                 for s in scored]))}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="TOFU: a local folder of JSON Lines or the Hub id")
    ap.add_argument("--split", default="forget05")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"])
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (on CUDA it is always on)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    cfg = load_config(None, [f"train.lr={args.lr}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch}",
                             f"train.warmup_steps={args.warmup}", f"train.schedule={args.schedule}",
                             f"train.seed={args.seed}"], command="finetune")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impl = "triton" if device.type == "cuda" else "torch"
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, device=device)
    rows = load_qa(args.data, args.split)
    ds = QADataset(rows, tok, max_length=cfg.model.max_length, name=args.split)
    head = LossHead(model)
    optim = build_optimizer(head.parameters(), cfg.train, device.type == "cuda")
    per_epoch = math.ceil(len(ds) / args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg.train, per_epoch * args.epochs))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 or device.type == "cuda"
                else nullcontext())
    g = torch.Generator().manual_seed(args.seed)

    curve, train_s, tokens = [], 0.0, 0

    def record(epoch: int) -> None:
        with autocast:
            row = {"epoch": epoch, "step": epoch * per_epoch, **measure(model, tok, rows, impl),
                   "train_s": round(train_s, 1), "train_tokens": tokens}
        print(json.dumps(row), flush=True)
        curve.append(row)

    record(0)
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(ds), generator=g).tolist()
        t0 = time.perf_counter()
        for b0 in range(0, len(ds), args.batch):
            batch = collate([ds[i] for i in order[b0:b0 + args.batch]], tok.pad_token_id)
            ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            tokens += int(mask.sum())
            with autocast:
                loss = head(ids, mask, lambda h, lm, _: bk.linear_cross_entropy(
                    h, lm.weight, labels, shift=True, impl=impl, **lm.options()))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.train.max_grad_norm or float("inf"))
            optim.step()
            optim.zero_grad(set_to_none=True)
            sched.step()
        train_s += time.perf_counter() - t0
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            record(epoch)

    doc = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "examples": len(ds), "steps_per_epoch": per_epoch,
           "device": device_name(device.type), **environment("benchmarks.memorization_curve", argv),
           "curve": curve}
    finish(doc, args.out)
    return curve


if __name__ == "__main__":
    main()
