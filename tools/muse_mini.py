"""A MUSE-shaped slice of MUSE-Books (or -News), small enough that the whole MUSE recipe runs on a 2-core CPU.

MUSE's target models (Llama-2-7B fine-tuned on a whole corpus) are not at hand offline, and SmolLM2-135M has not read
these books: the recipe fine-tunes its own target first (``bs_train/recipes/muse.py``). For that to fit a CPU, this
writes a folder of MUSE's layout whose forget text *is* what the probes test, cut from a full local copy:

* ``verbmem/forget``: the first ``--rows`` VerbMem rows, each prompt shortened to its last ``--prompt-words`` words
  (MUSE's prompts are ~650 words; the continuation to reproduce, ``gt``, is kept whole);
* ``privleak/forget`` / ``holdout`` / ``retain``: the first ``--rows`` passages of each, cut at ``--text-words``
  words (members, non-members, retain);
* ``raw/forget``: exactly the forget passages the probes read: every shortened VerbMem prompt with its ground truth,
  and every PrivLeak forget passage; ``raw/retain1``: the PrivLeak retain passages and the start of MUSE's own
  ``raw/retain1``, as many words as the forget text has;
* ``knowmem/*``: the first ``--rows`` questions of each QA split and all in-context examples, as they are. Their
  answers come from the whole corpus, mostly from passages outside the slice: KnowMem on it measures how little a
  135M model knows of the books beyond the slice, not what it memorised (say so when reporting it).

    python -m tools.muse_mini --data ../shared/data/muse/MUSE-Books --out /tmp/muse_books_mini
    bs-unlearn recipe --benchmark muse --data /tmp/muse_books_mini --out runs/muse_mini --budget-s 100000 ...

A check of the pipeline on real text and the real model, not a reproduction: a few thousand tokens of forget text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _read(folder: Path, split: str) -> list[dict]:
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a MUSE folder of JSON Lines (expected {split}.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _words(text: str, n: int, tail: bool = False) -> str:
    words = text.split()
    return " ".join(words[-n:] if tail else words[:n])


def build(source: Path, rows: int = 12, prompt_words: int = 64, text_words: int = 150) -> dict[str, list[dict]]:
    if min(rows, prompt_words, text_words) < 1:
        raise ValueError("rows, prompt_words and text_words must be >= 1")
    verbmem = [{"prompt": _words(r["prompt"], prompt_words, tail=True), "gt": r["gt"]}
               for r in _read(source, "verbmem/forget")[:rows]]
    priv = {part: [{"text": _words(r["text"], text_words)} for r in _read(source, f"privleak/{part}")[:rows]]
            for part in ("forget", "holdout", "retain")}
    forget = [{"text": f"{r['prompt']} {r['gt']}"} for r in verbmem] + priv["forget"]
    budget = sum(len(r["text"].split()) for r in forget)
    retain_words = " ".join(r["text"] for r in _read(source, "raw/retain1")).split()
    retain = priv["retain"] + [{"text": " ".join(retain_words[i:i + text_words])}
                               for i in range(0, max(0, budget - sum(len(r["text"].split()) for r in priv["retain"])),
                                              text_words)]
    splits = {"raw/forget": forget, "raw/retain1": retain, "verbmem/forget": verbmem,
              **{f"privleak/{k}": v for k, v in priv.items()}}
    for name in ("forget_qa", "retain_qa"):
        splits[f"knowmem/{name}"] = _read(source, f"knowmem/{name}")[:rows]
        splits[f"knowmem/{name}_icl"] = _read(source, f"knowmem/{name}_icl")
    return splits


def write(splits: dict[str, list[dict]], out: Path) -> None:
    for name, split_rows in splits.items():
        path = out / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows))


def main(argv: list[str] | None = None) -> dict[str, int]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="a local MUSE-Books or MUSE-News folder")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rows", type=int, default=12, help="rows of each probe split")
    ap.add_argument("--prompt-words", type=int, default=64, help="VerbMem prompts shortened to their last N words")
    ap.add_argument("--text-words", type=int, default=150, help="PrivLeak passages cut at N words")
    args = ap.parse_args(argv)
    splits = build(args.data, args.rows, args.prompt_words, args.text_words)
    write(splits, args.out)
    sizes = {k: len(v) for k, v in splits.items()}
    sizes["raw/forget words"] = sum(len(r["text"].split()) for r in splits["raw/forget"])
    sizes["raw/retain1 words"] = sum(len(r["text"].split()) for r in splits["raw/retain1"])
    print(json.dumps(sizes))
    return sizes


if __name__ == "__main__":
    main()
