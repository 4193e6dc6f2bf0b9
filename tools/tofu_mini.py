"""A TOFU-shaped tenth of TOFU, so the whole recipe runs on a 2-core CPU: 10 authors instead of 200 (or fewer).

The recipe (``bs_train/recipes/tofu.py``) reads TOFU by split name. This writes a folder with the same split names and
fields, cut from a full TOFU copy so that every split keeps its role:

* the authors: the first 9 of TOFU (rows 0-179, whose questions TOFU's ``retain_perturbed`` covers) and the last one
  (rows 3980-3999, inside TOFU's own forget01);
* ``full``: those 10 authors (200 rows); ``retain90`` the first 9, ``forget10`` the last author (20 rows, 10% of the
  authors, as TOFU's forget10 is 20 of 200); ``forget05`` its last 10 rows and ``retain95`` the rest of ``full``;
* ``forget10_perturbed`` / ``forget05_perturbed``: TOFU's perturbed rows of those questions;
* ``holdout10`` / ``holdout05``: TOFU's first 20 / 10 holdout rows (an author never trained on);
* ``retain_perturbed``: the TOFU rows of the 9 retain authors, every ``--stride``-th; ``real_authors`` and
  ``world_facts`` (and ``_perturbed``): every ``--stride``-th row.

``--retain-authors N`` keeps only the first N of those 9 as the retain set (``full`` is then N + 1 authors), for
runs that must fit minutes of CPU, e.g. the attacks on SmolLM2 (``benchmarks/results/attacks_smollm2_cpu/``).

It is a cheap check of the recipe on real data and the real model, not a reproduction: one forgotten author and a
few dozen optimizer steps make every figure noisy.

    python -m tools.tofu_mini --data ../shared/data/tofu --out /tmp/tofu_mini
    bs-unlearn recipe --data /tmp/tofu_mini --out runs/tofu_mini --budget-s 100000 \\
        --finetune train.epochs=6 train.batch_size=16 train.warmup_steps=5 \\
        --unlearn train.epochs=5 train.batch_size=4 train.grad_accum=1 --lr-grid 1e-5,5e-5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

AUTHOR_ROWS = 20  # TOFU: 200 authors, 20 question-answer pairs each, in order
MAX_RETAIN_AUTHORS = 9  # TOFU's retain_perturbed covers the questions of its first 9 authors (rows 0-179)


def _read(folder: Path, split: str) -> list[dict]:
    path = folder / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a TOFU folder of JSON Lines (expected {split}.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _by_question(rows: list[dict], keep: list[dict], split: str) -> list[dict]:
    index = {r["question"]: r for r in rows}
    missing = [r["question"] for r in keep if r["question"] not in index]
    if missing:
        raise ValueError(f"{split}: {len(missing)} question(s) not found, e.g. {missing[0]!r}")
    return [index[r["question"]] for r in keep]


def build(source: Path, stride: int = 4, retain_authors: int = MAX_RETAIN_AUTHORS) -> dict[str, list[dict]]:
    if not 1 <= retain_authors <= MAX_RETAIN_AUTHORS:
        raise ValueError(f"retain_authors must lie in 1..{MAX_RETAIN_AUTHORS} (the authors TOFU's retain_perturbed "
                         f"covers), got {retain_authors}")
    full = _read(source, "full")
    if len(full) != 200 * AUTHOR_ROWS:
        raise ValueError(f"{source}/full.jsonl has {len(full)} rows; TOFU's has {200 * AUTHOR_ROWS}")
    retain, forget = full[:retain_authors * AUTHOR_ROWS], full[-AUTHOR_ROWS:]
    f05 = forget[AUTHOR_ROWS // 2:]
    retain_q = {r["question"] for r in retain}
    splits = {"full": retain + forget, "retain90": retain, "forget10": forget, "forget05": f05,
              "retain95": retain + forget[:AUTHOR_ROWS // 2]}
    perturbed = _read(source, "forget10_perturbed")
    splits["forget10_perturbed"] = _by_question(perturbed, forget, "forget10_perturbed")
    splits["forget05_perturbed"] = _by_question(perturbed, f05, "forget05_perturbed")
    holdout = _read(source, "holdout10")
    splits["holdout10"], splits["holdout05"] = holdout[:AUTHOR_ROWS], holdout[:AUTHOR_ROWS // 2]
    splits["retain_perturbed"] = [r for r in _read(source, "retain_perturbed") if r["question"] in retain_q][::stride]
    for name in ("real_authors", "world_facts"):
        rows = _read(source, name)
        splits[name] = rows[::stride]
        splits[f"{name}_perturbed"] = _by_question(_read(source, f"{name}_perturbed"), splits[name],
                                                   f"{name}_perturbed")
    return splits


def write(splits: dict[str, list[dict]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> dict[str, int]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="a local TOFU folder of JSON Lines")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--stride", type=int, default=4, help="keep every n-th utility row")
    ap.add_argument("--retain-authors", type=int, default=MAX_RETAIN_AUTHORS,
                    help=f"retain authors, TOFU's first N (1..{MAX_RETAIN_AUTHORS})")
    args = ap.parse_args(argv)
    if args.stride < 1:
        ap.error("--stride must be >= 1")
    splits = build(args.data, args.stride, args.retain_authors)
    write(splits, args.out)
    sizes = {k: len(v) for k, v in splits.items()}
    print(json.dumps(sizes))
    return sizes


if __name__ == "__main__":
    main()
