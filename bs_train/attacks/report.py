"""The attacks' markdown table and relearning plot, and the columns other tables take from ``attacks.json``.

Table: one row per model (original, retain, then the models attacked), raw numbers first (forget answer probability
without attack, after the last relearning step and after int4 quantization; the worst paraphrase probe; greedy and
any-of-N sampling rates), then the recovery per attack and the worst case (0 = like the retain model, 1 = like the
original; see ``measure.recovery``). Plot: forget answer probability, ROUGE-L and ES on the held-out rows against
relearning steps, the model in focus beside the retain model and the original.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..outputs import read_json, save_figure

# (summary key, column title) that `bs-unlearn compare` and the recipe's table show from a run's attacks.json.
ATTACK_COLUMNS = [("attack_worst", "Attack rec. (worst)"), ("attack_worst_attack", "Worst attack")]


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _row(res: dict[str, Any], cfg) -> dict[str, Any]:
    s, row = res.get("summary", {}), {"model": res["name"], "F. Prob": res["none"]["forget_Q_A_Prob"],
                                       "Greedy rate": res["none"].get("recovered")}
    if "relearn" in res:
        row[f"Relearn F. Prob @{res['relearn']['steps'][-1]}"] = res["relearn"]["forget_Q_A_Prob"][-1]
    for bits in getattr(cfg, "bits", ()):
        q = res.get("quantize", {}).get(f"int{bits}")
        if q is not None:
            row[f"Int{bits} F. Prob"] = q["forget_Q_A_Prob"]
    if "paraphrase" in res:
        from .probes import probe_value

        gen = {k: probe_value(v) for k, v in res["paraphrase"].items() if k != "multiple_choice"}
        if gen:
            row["Para. rate (max)"] = max(gen.values())
        if "multiple_choice" in res["paraphrase"]:
            row["MC truth prob"] = res["paraphrase"]["multiple_choice"]["truth_prob"]
    if "sample" in res:
        row[f"Any of {res['sample']['samples']} rate"] = res["sample"]["any_rate"]
    row["Rec. none"] = s.get("none")
    for attack in ("relearn", "quantize", "paraphrase", "sample"):
        if attack in res:
            row[f"Rec. {attack}"] = s.get(attack)
    row["Rec. worst"] = s.get("worst")
    return row


def markdown(results: list[dict[str, Any]], cfg) -> str:
    """The table of the module docstring."""
    rows = [_row(r, cfg) for r in results]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


PANELS = (("forget_Q_A_Prob", "forget answer probability"), ("forget_Q_A_ROUGE", "ROUGE-L recall (greedy)"),
          ("extraction_strength", "extraction strength"))


def plot_relearn(results: list[dict[str, Any]], path: str | Path, *, focus: str | None = None) -> Path:
    """Three panels (probability, ROUGE-L, ES vs relearning step), one line per model with a relearning curve."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    curves = [r for r in results if "relearn" in r]
    if not curves:
        raise ValueError("plot_relearn: no result has a relearning curve")
    styles = {"original": ("tab:red", "--"), "retain": ("tab:green", "--")}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (key, title) in zip(axes, PANELS):
        for r in curves:
            c = r["relearn"]
            color, ls = styles.get(r.get("role"), ("tab:blue", "-"))
            ys = [float("nan") if v is None else v for v in c[key]]
            ax.plot(c["steps"], ys, ls, marker="o", color=color, label=r["name"],
                    linewidth=2.2 if r["name"] == focus else 1.4)
        ax.set_title(title)
        ax.set_xlabel("relearning step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    lr, n = curves[0]["relearn"]["lr"], curves[0]["relearn"]["rows"]
    fig.suptitle(f"relearning on {n} forget row(s) at lr {lr:g}; held-out forget rows scored", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def attack_summary(run_dir: str | Path) -> dict[str, Any]:
    """The ``ATTACK_COLUMNS`` values of a run folder's attacks.json; empty when it has none."""
    doc = read_json(Path(run_dir) / "attacks.json")  # a damaged one is said and left out
    if doc is None:
        return {}
    s = doc.get("summary") or {}
    return {"attack_worst": s.get("worst"), "attack_worst_attack": s.get("worst_attack")}
