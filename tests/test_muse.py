"""MUSE's evaluation (``bs_train/evaluation/muse``): the probes' encodings, every metric against a hand count, and
the suite under ``--protocol open-unlearning`` against open-unlearning's formulas written out independently here on
the same generations and a full-logits forward pass (as ``test_protocol.py`` does for TOFU)."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

from bs_train import cli
from bs_train.data.synthetic import make_muse, write_folder
from bs_train.evaluation import metrics
from bs_train.evaluation.muse import evaluate_loaded, load_muse
from bs_train.evaluation.muse.data import (KNOWMEM_STOP, QA_TAGS, cut_answer, knowmem_prompt, knowmem_reference,
                                           mia_item, verbmem_item)
from bs_train.model import load_model
from bs_train.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def muse(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("muse") / "MUSE-Synthetic", make_muse(seed=2))


def test_rouge_l_f1_is_the_lcs_f_measure_by_hand():
    # "the cat sat on the mat" vs "the cat lay on a mat": LCS = the cat on mat (4); P = 4/6, R = 4/6 -> F1 = 2/3
    assert metrics.rouge_l_f1(["the cat lay on a mat"], ["the cat sat on the mat"])[0] == pytest.approx(2 / 3)
    # 2 generated words, both in order in a 4-word reference: P = 1, R = 1/2 -> F1 = 2/3; recall alone says 1/2
    assert metrics.rouge_l_f1(["red fox"], ["the red quick fox"])[0] == pytest.approx(2 / 3)
    assert metrics.rouge_l_recall(["red fox"], ["the red quick fox"])[0] == pytest.approx(1 / 2)


def test_knowmem_answers_are_cut_at_the_first_stop_string():
    assert cut_answer(" 1948.\n\nQuestion: next?") == "1948."
    assert cut_answer("Brno\nQuestion: more") == "Brno"
    assert cut_answer("  Brno, Czechia  ") == "Brno, Czechia"
    assert KNOWMEM_STOP == ("\n\n", "\nQuestion", "Question:")


def test_probe_encodings_follow_the_reference_layout():
    tok = byte_tokenizer()
    icl = [{"question": "Q1?", "answer": "A1."}]
    chat = tok.decode(knowmem_prompt(tok, icl, "Q2?"))  # a chat model: the examples as turns of its template
    assert chat == ("<|im_start|>user\nQ1?<|im_end|>\n<|im_start|>assistant\nA1.<|im_end|>\n"
                    "<|im_start|>user\nQ2?<|im_end|>\n<|im_start|>assistant\n")
    ou = tok.decode(knowmem_prompt(tok, icl, "Q2?", "open-unlearning"))  # + its system prompt
    assert ou.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n") and ou.endswith(chat)
    tok.chat_template = None  # a base model: open-unlearning's base-model tags
    ids = knowmem_prompt(tok, icl, "Q2?")
    assert tok.decode(ids) == "Question: Q1?\nAnswer: A1.\n\nQuestion: Q2?\nAnswer: "
    assert QA_TAGS == ("Question: ", "\n", "Answer: ", "\n\n")
    assert knowmem_reference(tok, icl, {"question": "Q2?", "answer": " A2. "}) == "A2."
    assert knowmem_reference(tok, icl, {"question": "Q2?", "answer": "A2."}, "open-unlearning") == "A2."
    item = verbmem_item(tok, {"prompt": "Once upon", "gt": "a time."})
    assert tok.decode(item["prompt"]) == "Once upon" and tok.decode(item["input_ids"]) == "Once upon a time."
    assert [t for t in item["labels"] if t != -100] == item["input_ids"][len(item["prompt"]):] and item["gt"] == "a time."
    mia = mia_item(tok, "x" * 3000)
    assert len(mia["input_ids"]) == 2048 and mia["labels"][0] == -100 and mia["labels"][1:] == mia["input_ids"][1:]


# ---- open-unlearning's MUSE formulas, written out here from its code (src/evals/metrics/*.py) -------------------


def _ou_token_stats(model, item):
    """tokenwise_vocab_logprobs + tokenwise_logprobs of open-unlearning: full logits, labelled positions but the last."""
    ids = torch.tensor([item["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1]
    labels = torch.tensor(item["labels"])
    idx = (labels != -100).nonzero().squeeze(1)[:-1]  # "-1 to ignore eos prediction"
    rows = logp[idx - 1]
    target = rows.gather(1, labels[idx][:, None]).squeeze(1)
    return rows, target, labels[idx]


def _ou_es(preds, labels):
    for k in range(len(labels)):
        if torch.equal(preds[k:], labels[k:]):
            break
    return 1 - k / len(labels)


def _ou_min_k(target, k=0.4):
    lp = target.numpy()
    num = max(1, int(len(lp) * k))
    return -np.mean(np.sort(lp)[:num])


def _ou_min_k_pp(rows, target, k=0.4):
    mu = (rows.exp() * rows).sum(-1)
    sigma = ((rows.exp() * rows.square()).sum(-1) - mu.square()).clamp(min=1e-6)
    scores = ((target - mu) / sigma.sqrt()).numpy()
    num = max(1, int(len(scores) * k))
    return -np.mean(sorted(scores)[:num])


def _ou_avg_loss(model, item):
    ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


def _auc(forget, holdout):
    """roc_auc_score with forget = 0, holdout = 1, by pairs (ties count half)."""
    f, h = np.asarray(forget)[:, None], np.asarray(holdout)[None, :]
    return float(((h > f) + 0.5 * (h == f)).mean())


def test_the_suite_equals_open_unlearnings_formulas_on_the_same_model(muse, original):
    """A model trained on the generated authors, evaluated on MUSE-layout data built from them: every number of the
    suite under open-unlearning's protocol against that code's formulas on a full-logits forward pass."""
    model, tok = load_model(str(original / "final"))
    model.eval()
    data = load_muse(muse, max_rows=4)
    res = evaluate_loaded(model, tok, data, protocol="open-unlearning", batch_size=3)
    per = res["per_example"]
    # VerbMem: ROUGE-L F1 of the suite's own generations against the decoded ground truths
    items = [verbmem_item(tok, r, "open-unlearning") for r in data.verbmem]
    assert res["forget_verbmem_ROUGE"] == pytest.approx(np.mean(metrics.rouge_l_f1(
        per["verbmem_generations"], [it["gt"] for it in items])))
    es, em = [], []
    for it in items:
        rows, _, labels = _ou_token_stats(model, it)
        preds = rows.argmax(-1)
        es.append(_ou_es(preds, labels))
        em.append(float((preds == labels).float().mean()))
    assert res["extraction_strength"] == pytest.approx(np.mean(es), abs=1e-6)
    assert res["exact_memorization"] == pytest.approx(np.mean(em), abs=1e-6)
    # the MIA attacks and PrivLeak against AUC 0.5
    scores = {}
    for part, texts in (("forget", data.privleak_forget), ("holdout", data.privleak_holdout)):
        s = {"loss": [], "zlib": [], "min_k": [], "min_k_plus_plus": []}
        for text in texts:
            it = mia_item(tok, text)
            rows, target, _ = _ou_token_stats(model, it)
            loss = _ou_avg_loss(model, it)
            label_text = tok.decode([t for t in it["labels"] if t != -100], skip_special_tokens=True)
            s["loss"].append(loss)
            s["zlib"].append(loss / len(zlib.compress(label_text.encode("utf-8"))))
            s["min_k"].append(_ou_min_k(target))
            s["min_k_plus_plus"].append(_ou_min_k_pp(rows, target))
        scores[part] = s
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        assert res[f"mia_{attack}"] == pytest.approx(_auc(scores["forget"][attack], scores["holdout"][attack]))
    ou_privleak = ((1 - res["mia_min_k"]) - (1 - 0.5)) / ((1 - 0.5) + 1e-10) * 100
    assert res["privleak"] == pytest.approx(ou_privleak)
    # KnowMem: the suite's answers are the greedy decode cut at the stop strings, scored against the references
    for split, rows, icl in (("forget", data.knowmem_forget, data.knowmem_forget_icl),
                             ("retain", data.knowmem_retain, data.knowmem_retain_icl)):
        refs = [knowmem_reference(tok, icl, r, "open-unlearning") for r in rows]
        assert res[f"{split}_knowmem_ROUGE"] == pytest.approx(np.mean(metrics.rouge_l_f1(
            per[f"knowmem_{split}_answers"], refs)))


def test_the_command_line_evaluates_muse_and_compare_shows_it(muse, original, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for f in (original / "final").iterdir():
        (run / "final" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "r.json"
    argv = ["eval", str(run), "--benchmark", "muse", "--data", str(muse), "--max-rows", "2", "--out", str(out),
            "--no-progress"]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "VerbMem F" in table and "PrivLeak" in table
    saved = json.loads((run / "eval_muse.json").read_text())
    assert saved["benchmark"] == "muse" and len(saved["per_example"]["verbmem_generations"]) == 2
    assert cli.main(["compare", str(run), "--benchmark", "muse"]) == 0
    assert "VerbMem F" in capsys.readouterr().out
    assert cli.main(["eval", str(run), "--benchmark", "muse", "--out", str(tmp_path / "x.json"), "--overwrite"]) == 2
    assert "needs --data" in capsys.readouterr().err
