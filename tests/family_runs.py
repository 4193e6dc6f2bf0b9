"""The family matrix's training runs (tests/test_families.py): one BS-S unlearning run per model family.

``run_args(family, out, grad_accum)`` is the run both sides of the comparison make: BS-S on the BS-T base with a KL
retain term (the frozen reference sharded too) on 2 generated authors of 2 questions each, greedy beliefs drawn by
the belief sampler before each of the 2 steps (the second round by the updated model), then the Hugging Face export.
Launched as a script under torchrun (``python -m torch.distributed.run --nproc-per-node 2 tests/family_runs.py OUT
FAMILY...``) it makes every family's 2-rank FSDP2 run in one launch, so the matrix pays for one process start, not
one per family; the test makes the 1-process runs itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

STEPS = 2


def run_args(family: str, out: Path, grad_accum: int) -> list[str]:
    """Config overrides of one family's run into ``out`` (2 examples per step: 1 per rank x 2 ranks, or 1 x 2
    micro-batches in one process)."""
    return [f"output_dir={out}", f"model.path=tiny:{family}", "data.source=synthetic", "data.synthetic_authors=2",
            "data.synthetic_qa_per_author=2", "train.batch_size=2", f"train.grad_accum={grad_accum}",
            f"train.max_steps={STEPS}", "train.lr=1e-3", "train.warmup_steps=0", "train.log_every=1",
            "method.name=bs_s", "method.bss_base=bs_t", "method.retain=kl", "method.bst_topk=5",
            "method.bss_samples=2", "method.bss_max_new_tokens=8", "method.bss_temperature=0",
            "method.bss_regen=steps", "method.bss_regen_every=1"]


def main(out: Path, families: list[str]) -> None:
    import torch.distributed as dist

    from bs_train.config import load_config
    from bs_train.trainer import run

    for family in families:
        run(load_config(None, run_args(family, out / family / "fsdp", grad_accum=1), command="unlearn"),
            progress=False)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
