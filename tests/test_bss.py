"""BS-S: beliefs belong to the prompt they were drawn for, the loss is (1 - lam_S) L(D_u) + lam_S L(D^_u), the
regeneration schedule holds, and a resumed run keeps its beliefs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from bs_train import methods
from bs_train.methods.beliefs import BeliefSet, draw_beliefs
from bs_train.config import MethodConfig, load_config
from bs_train.data import collate
from bs_train.model import LossHead, load_model
from bs_train.sampler import SamplingConfig, sample
from bs_train.tiny import tiny_llama
from bs_train.trainer import StopRun, run

VOCAB = 61


def test_belief_batch_holds_the_beliefs_of_exactly_those_prompts():
    prompts = [[1, 2], [3, 4, 5], [6]]
    answers = [[[10 + i, 20 + j] for j in range(2)] for i in range(3)]
    beliefs = BeliefSet(prompts, answers, [[0.0, 0.0]] * 3, round=1)
    b = beliefs.batch([2, 0], pad_id=0)
    assert b["owner"].tolist() == [2, 2, 0, 0]
    assert b["index"].tolist() == [4, 5, 0, 1]  # flat id i * N + j
    for row, (i, j) in enumerate([(2, 0), (2, 1), (0, 0), (0, 1)]):
        n = len(prompts[i]) + 2
        assert b["input_ids"][row, :n].tolist() == prompts[i] + answers[i][j]
        assert b["labels"][row, :n].tolist() == [-100] * len(prompts[i]) + answers[i][j]


def test_drawn_beliefs_belong_to_their_prompt():
    """Greedy beliefs drawn in shared rounds equal each prompt sampled on its own: no row is mixed up."""
    model = tiny_llama(VOCAB, seed=5)
    prompts = [[3, 4, 5, 6], [7], [8, 9], [10, 11, 12, 13, 14, 15], [16, 17]]
    cfg = MethodConfig(name="bs_s", bss_samples=2, bss_temperature=0.0, bss_max_new_tokens=6, bss_prompts_per_round=2)
    beliefs = draw_beliefs(model, model, prompts, cfg, eos_id=VOCAB, pad_id=0, seed=0, round_=1)
    for i, p in enumerate(prompts):
        alone = sample(model, [p], SamplingConfig(n=1, max_new_tokens=6, temperature=0), eos_id=VOCAB, pad_id=0)
        assert beliefs.prompts[i] == p
        assert beliefs.answers[i] == [alone.sequences()[0][0]] * 2
        seq = torch.tensor([p + beliefs.answers[i][0]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=seq).logits[0], -1)[len(p) - 1:-1]
        want = logp.gather(-1, torch.tensor(beliefs.answers[i][0])[:, None]).sum()
        assert abs(beliefs.logp[i][0] - float(want)) < 1e-3


@pytest.mark.parametrize("base", ["ga", "bs_t", "npo", "wga"])
def test_bss_loss_mixes_target_and_belief_losses(base):
    model = LossHead(tiny_llama(VOCAB, seed=1))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, VOCAB, (4,), generator=g).tolist() for _ in range(3)]
    answers = [[torch.randint(1, VOCAB, (3 + j,), generator=g).tolist() for j in range(2)] for _ in range(3)]
    beliefs = BeliefSet(prompts, answers, [[-5.0, -7.0]] * 3, round=1)
    forget = collate([{"input_ids": p + [7, 8, 9], "labels": [-100] * 4 + [7, 8, 9], "index": i}
                      for i, p in enumerate(prompts)], pad_id=0)
    bel = beliefs.batch([0, 1, 2], pad_id=0)
    norms = methods.Norms(*methods.local_counts(forget, None, bel).float().clamp_min(1).unbind())
    cfg = MethodConfig(name="bs_s", bss_base=base, bss_lam=0.3, retain="none", bst_topk=5)
    st = methods.MethodState(cfg, "torch", ref_logp=torch.tensor([-9.0, -8.0, -7.0]), beliefs=beliefs)
    loss, _ = methods.method_loss(model, forget, None, st, norms, beliefs=bel)
    base_fn = methods.METHODS[base].forget
    on_targets = base_fn(model, forget, st, norms)
    st_b = methods.MethodState(cfg, "torch", ref_logp=beliefs.ref_logp, beliefs=beliefs)
    on_beliefs = base_fn(model, bel, st_b, norms.for_beliefs())
    torch.testing.assert_close(loss, 0.7 * on_targets + 0.3 * on_beliefs)


def _bss_run(tmp_path: Path, original: Path, name: str, extra: list[str]) -> list[dict]:
    cfg = load_config(None, [
        f"output_dir={tmp_path / name}", f"model.path={original / 'final'}", f"data.source={original / 'data'}",
        "data.synthetic_authors=4", "data.synthetic_qa_per_author=5", "method.name=bs_s",
        "method.bss_max_new_tokens=8", "train.batch_size=2", "train.grad_accum=1", "train.lr=5e-4",
        "train.export=false", *extra], command="unlearn")
    run(cfg, progress=False)
    return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]



@pytest.mark.parametrize("regen, every, want_rounds", [
    ("never", 1, [1] * 7),  # off-policy: drawn once before training
    ("steps", 2, [1, 1, 2, 2, 3, 3, 4]),
    ("epochs", 1, [1, 1, 1, 2, 2, 2, 3]),  # forget10 has 5 examples: 3 steps of 2 per epoch
])
def test_regeneration_schedule(tmp_path, original, regen, every, want_rounds):
    rows = _bss_run(tmp_path, original, regen, [f"method.bss_regen={regen}", f"method.bss_regen_every={every}",
                                                "train.max_steps=7"])
    assert [r["belief_round"] for r in rows] == want_rounds
    assert all(r["belief_regen_s"] > 0 for r in rows)


def test_resume_keeps_beliefs(tmp_path, original):
    common = ["method.bss_regen=steps", "method.bss_regen_every=3", "train.max_steps=5",
              "train.checkpoint_every=2", "method.bss_temperature=1.0"]
    full = _bss_run(tmp_path, original, "full", common)
    cfg_args = [f"output_dir={tmp_path / 'cut'}", f"model.path={original / 'final'}",
                f"data.source={original / 'data'}", "data.synthetic_authors=4", "data.synthetic_qa_per_author=5",
                "method.name=bs_s", "method.bss_max_new_tokens=8", "train.batch_size=2", "train.grad_accum=1",
                "train.lr=5e-4", "train.export=false", *common]
    with pytest.raises(StopRun):
        run(load_config(None, cfg_args, command="unlearn"), progress=False, stop_after=3)
    run(load_config(None, cfg_args, command="unlearn"), progress=False)
    cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["belief_round"] for r in cut] == [r["belief_round"] for r in full]
    for a, b in zip(full, cut):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)


@pytest.mark.parametrize("override, match", [
    ("method.bss_samples=0", "bss_samples"), ("method.bss_lam=1.2", "bss_lam"),
    ("method.bss_max_new_tokens=0", "bss_max_new_tokens"), ("method.bss_regen=sometimes", "bss_regen"),
])
def test_bad_bss_config(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, ["method.name=bs_s", override], command="unlearn")


def test_npo_base_scores_later_belief_rounds_with_the_initial_model(tmp_path, original):
    """NPO's reference is the initial model for beliefs as for targets: after a regeneration, the stored belief
    log-probs are the initial model's, not those of the (already unlearned) model that drew them."""
    _bss_run(tmp_path, original, "npo", ["method.bss_base=npo", "method.bss_regen=steps", "method.bss_regen_every=2",
                                         "train.max_steps=3", "train.lr=5e-3"])
    ckpt = tmp_path / "npo" / "checkpoints"
    beliefs = BeliefSet.from_state_dict(
        torch.load(ckpt / (ckpt / "latest").read_text() / "trainer_state.pt", weights_only=True)["extra"]["beliefs"])
    assert beliefs.round == 2
    initial = LossHead(load_model(str(original / "final"))[0])
    want = methods.belief_ref_logp(initial, beliefs, "torch", pad_id=0, device="cpu")
    flat = lambda rows: torch.tensor([v for row in rows for v in row])  # noqa: E731
    torch.testing.assert_close(flat(beliefs.logp), flat(want), rtol=1e-4, atol=1e-3)
    # ... while the trained model had moved: its own log-probs of the same beliefs differ
    final = LossHead(load_model(str(original / "final"))[0])
    state = {"model": get_model_state_dict(final)}
    dcp.load(state, checkpoint_id=str(ckpt / (ckpt / "latest").read_text()))
    set_model_state_dict(final, state["model"])
    moved = methods.belief_ref_logp(final, beliefs, "torch", pad_id=0, device="cpu")
    assert (flat(moved) - flat(want)).abs().max() > 1e-2
