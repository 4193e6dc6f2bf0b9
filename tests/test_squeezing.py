"""The squeezing monitor on a tiny model: beliefs drawn and bucketed before unlearning, log-probs logged while a few
gradient-ascent steps run, and a JSON plus a non-blank probability-dynamics plot written at the end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bs_kernels as bk
from bs_kernels.hf import hidden_states_and_head
from bs_train.data import QADataset, collate
from bs_train.model import LossHead, load_model
from bs_train.methods.squeezing import SqueezingMonitor, bucket_indices
from bs_train.data.synthetic import make_splits


def test_bucket_indices_split_20_60_20():
    scores = [float(s) for s in range(10)]  # 9 is the most likely
    b = bucket_indices(scores)
    assert b["high"] == [9, 8] and b["low"] == [1, 0] and sorted(b["mid"]) == list(range(2, 8))
    assert bucket_indices([1.0]) == {"high": [0], "mid": [], "low": []}
    assert bucket_indices([1.0, 2.0]) == {"high": [1], "mid": [], "low": [0]}


def test_monitor_logs_ga_steps_and_writes_a_plot(tmp_path):
    model, tok = load_model("tiny")  # train mode, as the trainer hands it over
    rows = make_splits(n_authors=4, qa_per_author=2)["forget10"]
    mon = SqueezingMonitor.from_examples(rows, tok, n_beliefs=4, every=2, max_new_tokens=16, seed=3)
    rng_state = torch.get_rng_state()
    mon.prepare(LossHead(model))  # a wrapper holding the HF model as .lm is accepted
    assert torch.equal(rng_state, torch.get_rng_state()) and model.training
    sizes = {k: len(v) for k, v in mon.buckets.items()}
    n = len(mon.beliefs)
    assert 2 <= n <= len(rows) * 4 and sum(sizes.values()) == n
    assert sizes["high"] == sizes["low"] == max(1, round(0.2 * n))
    answers = {r["answer"] for r in rows}
    assert all(b["text"] not in answers for b in mon.beliefs)
    assert len({(b["example"], b["text"]) for b in mon.beliefs}) == n  # no duplicates
    high = min(mon.beliefs[i]["initial_logp"] for i in mon.buckets["high"])
    assert all(mon.beliefs[i]["initial_logp"] <= high for i in mon.buckets["mid"] + mon.buckets["low"])

    batch = collate([QADataset(rows, tok, max_length=256, name="forget")[i] for i in range(len(rows))],
                    tok.pad_token_id)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    logged = []
    for step in range(1, 5):
        hidden, head = hidden_states_and_head(model, batch["input_ids"], batch["attention_mask"])
        loss = bk.ga_loss(hidden, head.weight, batch["labels"], impl="torch")  # minimising log-likelihood = GA
        opt.zero_grad()
        loss.backward()
        opt.step()
        entry = mon.maybe_log(step, model)
        assert (entry is None) == (step % 2 != 0)
        logged += [entry] if entry else []
        assert model.training
    history = mon.history
    assert [h["step"] for h in history] == [0, 2, 4]
    assert history[-1]["target"] < history[0]["target"] - 0.5  # GA pushed the targets down
    assert all(h[k] is None or h[k] < 0 for h in history for k in ("target", "high", "mid", "low"))

    json_path, png_path = mon.finish(tmp_path / "out")
    doc = json.loads(json_path.read_text())
    assert doc["history"] == history and len(doc["beliefs"]) == n
    assert {b["bucket"] for b in doc["beliefs"]} <= {"high", "mid", "low"}
    import matplotlib.image

    img = matplotlib.image.imread(str(png_path))
    assert img.shape[0] == 400 and img.shape[1] == 1000  # 10 x 4 inches at 100 dpi
    rgb = img[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 10  # lines, text and axes, not a blank canvas
    assert (rgb < 0.5).any() and (rgb > 0.9).any()


def test_monitor_refuses_bad_use(tmp_path):
    _, tok = load_model("tiny")
    with pytest.raises(ValueError, match="empty"):
        SqueezingMonitor.from_examples([], tok)
    with pytest.raises(ValueError, match="every"):
        SqueezingMonitor.from_examples([{"question": "q", "answer": "a"}], tok, every=0)
    mon = SqueezingMonitor.from_examples([{"question": "q", "answer": "a"}], tok)
    with pytest.raises(ValueError, match="before prepare"):
        mon.maybe_log(0, None)
    with pytest.raises(ValueError, match="before prepare"):
        mon.finish(tmp_path)
    with pytest.raises(ValueError, match="before prepare"):
        mon.state_dict()
    other = SqueezingMonitor.from_examples([{"question": "q", "answer": "a"}], tok, n_beliefs=3)
    with pytest.raises(ValueError, match="saved monitor had settings"):
        other.load_state_dict({"settings": {"n_beliefs": 5}, "beliefs": [], "buckets": {}, "history": []})


def test_plot_names_the_method_in_its_title(tmp_path):
    """Plots of several runs side by side say which method each is: the title strip above the panels carries the
    method's name (drawn only when one is given)."""
    import matplotlib.image

    from bs_train.methods.squeezing import plot_history

    history = [{"step": s, "target": -1.0 - s, "high": -2.0 + 0.1 * s, "mid": -3.0, "low": None} for s in range(3)]
    bare = matplotlib.image.imread(str(plot_history(history, tmp_path / "bare.png")))[..., :3]
    named = matplotlib.image.imread(str(plot_history(history, tmp_path / "named.png", method="bs_t")))[..., :3]
    strip = slice(0, 12)  # the top eighth of an inch, above both panels' own titles (they start lower)
    assert (bare[strip] > 0.9).all()  # nothing there without a method
    assert (named[strip] < 0.5).any()  # text there with one
