"""``bs-unlearn``: command-line entry point (fine-tune and unlearn; evaluation and sampling come later).

    bs-unlearn finetune --config configs/finetune_tofu_smollm2.yaml output_dir=runs/original
    bs-unlearn unlearn  --config configs/unlearn_tofu_smollm2.yaml model.path=runs/original/final method.name=npo
    torchrun --nproc-per-node 2 -m bs_train.cli unlearn --config ...          # FSDP2 on 2 ranks

Overrides are ``section.key=value`` (YAML scalars). The resolved config is saved as ``<output_dir>/config.yaml``;
a run whose folder already holds a checkpoint of the same config resumes from it (``--no-resume`` starts over).
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bs-unlearn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["finetune", "unlearn"])
    p.add_argument("--config", help="YAML config file (optional; defaults are the paper's)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 method.name=npo")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the flags
    try:
        cfg = load_config(args.config, args.overrides, command=args.command)
    except (ValueError, OSError) as e:
        print(f"bs-unlearn: config error: {e}", file=sys.stderr)
        return 2
    from .trainer import run  # heavy imports only once the config is known to be valid

    summary = run(cfg, resume=not args.no_resume, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
