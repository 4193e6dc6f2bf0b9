"""The size of each difference between the ``exact`` and ``open-unlearning`` evaluation protocols on one model.

    PYTHONPATH=$PWD python -m benchmarks.protocol_diff --data /work/shared/data/tofu --rows 20 \
        --out benchmarks/results/protocol_diff_smollm2_cpu.json

Scores the same model on the first ``--rows`` rows of every TOFU split the suite reads (forget01 and its
_perturbed, holdout01, retain_perturbed, real_authors, world_facts) under both protocols; then the forget-set
statistics that need no generation once more under open-unlearning's inputs with our attention mask
(``open_unlearning_own_mask``), so the template-and-labels part of the change and the pad-token mask part are
measured apart. The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

KEYS = ("forget_Q_A_Prob", "forget_Q_A_PARA_Prob", "forget_truth_ratio", "forget_Q_A_ROUGE", "extraction_strength",
        "exact_memorization", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "privleak",
        "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE",
        "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio", "model_utility")
SPLITS = ("forget01", "forget01_perturbed", "holdout01", "retain_perturbed", "real_authors_perturbed",
          "world_facts_perturbed")


def _relative(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return (b - a) / abs(a)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="TOFU folder of JSON Lines")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=20, help="rows per split")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch

    from bs_train import data as data_mod
    from bs_train.evaluation.tofu import suite as ev
    from bs_train.data import load_split
    from bs_train.model import load_model

    data = {s: load_split(args.data, s)[:args.rows] for s in SPLITS}
    model, tok = load_model(args.model, device="cpu", use_liger=False)
    model.eval()
    runs, t0 = {}, time.perf_counter()
    kw = {"judge": "none", "max_new_tokens": args.max_new_tokens, "batch_size": 8, "impl": "torch",
          "forget_split": "forget01"}
    for protocol in ("exact", "open-unlearning"):
        res = ev.evaluate_loaded(model, tok, data, protocol=protocol, **kw)
        runs[protocol] = {k: res.get(k) for k in KEYS}
        print(f"{protocol}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    own_mask = ev.forget_statistics(model, tok, data, forget_split="forget01", protocol="open-unlearning",
                                    mask_pad_tokens=False, batch_size=8, impl="torch")
    own_mask.update({f"mia_{k}": v for k, v in own_mask.get("mia_auc", {}).items()})
    runs["own_mask"] = {k: own_mask.get(k) for k in KEYS if k in own_mask}
    result = {
        "command": "python -m benchmarks.protocol_diff " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "rows_per_split": args.rows, "max_new_tokens": args.max_new_tokens,
        "splits": list(SPLITS), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": f"cpu ({platform.machine()})",
        "torch": torch.__version__, "chat_family": data_mod.chat_family(tok),
        "pad_is_eos": tok.pad_token_id == tok.eos_token_id, "seconds": round(time.perf_counter() - t0, 1),
        "exact": runs["exact"], "open_unlearning": runs["open-unlearning"],
        "open_unlearning_own_mask": runs["own_mask"],
        "relative_change": {k: _relative(runs["exact"][k], runs["open-unlearning"][k]) for k in KEYS},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
