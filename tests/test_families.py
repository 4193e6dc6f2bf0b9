"""The family matrix: every model family the field unlearns, end to end on its tiny random model (``bs_train.tiny``).

Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2, Gemma-3 (text), Phi (TOFU's Phi-1.5), Phi-3, OLMo-2, GPT-NeoX
(Pythia) and Qwen3-MoE, each built offline from transformers' own config class with its distinguishing features
switched on (sliding windows that bind, Gemma-2's soft-capped attention and final logits, Phi's lm_head bias,
per-head q/k norms, partial rotary, a mixture of experts).
For every family:

* head: the (hidden states, ``LMHead``) the loss root hands to the losses give the model's own logits; Gemma-2's is
  soft-capped and Phi's biased, both scored fused, not refused;
* methods: every row of the method table, on the fused path, equals the same loss from the model's own logits, value
  and every parameter's gradient (``test_methods.check_table_entry``; one case per row, the retain terms cycled);
* LoRA: a step trains the adapters only;
* sampler: greedy belief sampling equals HF ``generate`` token for token (left padding, windows binding), and the
  returned log-probs are the model's own;
* training: BS-S (BS-T base, KL retain, beliefs redrawn) on 2 gloo ranks under FSDP2 gives the 1-process loss
  curve, every family's 2-rank run in one torchrun launch; both Hugging Face exports reload and agree;
* evaluation: the exported model's fused scores equal its own logits, and the evaluation suite runs on it.

The family table of ``docs/reference/families.md`` is held to ``FAMILIES`` by ``test_docs_table_lists_every_family``.
Time: about 2 minutes on 2 free cores (``docs/reference/families.md``).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bs_train import methods
from bs_train.config import MethodConfig, ModelConfig, load_config
from bs_train.data import encode_qa, load_qa
from bs_train.evaluation.tofu import evaluate_loaded
from bs_train.lora import apply_lora
from bs_train.model import LossHead, load_model
from bs_train.sampler import SamplingConfig, sample
from bs_train.evaluation.scoring import score_answers
from bs_train.tiny import FAMILIES, byte_tokenizer, tiny_model
from bs_train.trainer import run
from family_runs import STEPS, run_args
from test_methods import batch, check_table_entry

REPO = Path(__file__).resolve().parents[1]
VOCAB = len(byte_tokenizer())
EOS, PAD = 258, 256
PROMPTS = [list(range(40, 70)), list(range(100, 112)), list(range(5, 23)), [200]]  # 30 tokens: windows of 16 bind


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds waits (on a loaded 2-core machine, spinning OpenMP workers
    made this module ~20x slower in wall time). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _model(family: str, seed: int):
    return tiny_model(family, VOCAB, seed=seed)


def model_of(family: str, seed: int = 1):
    """A fresh copy of ``family``'s tiny model (built once per session)."""
    return copy.deepcopy(_model(family, seed))


@functools.cache
def _pair(family: str):
    return model_of(family), model_of(family), [p.detach().clone() for p in _model(family, 1).parameters()]


def fresh_pair(family: str):
    """Two instances of ``family``'s tiny model (seed 1) reset to its initial weights, without gradients: copying the
    weights back is much cheaper than a deepcopy per case."""
    a, b, init = _pair(family)
    with torch.no_grad():
        for m in (a, b):
            for p, w in zip(m.parameters(), init):
                p.copy_(w)
                p.grad = None
    return a, b


def family_cases():
    """One case per method-table row, retain terms cycled so each appears for every family; BS-S on BS-T."""
    cases = []
    for i, (name, row) in enumerate(methods.METHODS.items()):
        retains = list(methods.RETAIN_TERMS) if row.retain == methods.CONFIGURED else ["nll"]
        if row.dual:
            retains.remove("none")
        cases.append((name, retains[i % len(retains)], "bs_t"))
    return cases


# ---- the head and the losses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_head_gives_the_models_own_logits(family):
    model = model_of(family)
    b = batch(0)
    with torch.no_grad():
        want = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = LossHead(model)(b["input_ids"], b["attention_mask"], lambda h, head, _: head.logits(h))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    head = LossHead(model)(b["input_ids"], b["attention_mask"], lambda h, head, _: head)
    assert head.is_plain == (family not in ("gemma2", "phi"))
    if family == "gemma2":  # scored fused with its cap, where it used to be refused
        assert head.softcap == model.config.final_logit_softcapping == 3.0
        assert float(want.abs().max()) > 2.0  # the cap bites on these logits: a wrong transform would show
    if family == "phi":  # TOFU's Phi-1.5 head has a bias, scored fused too
        assert head.bias is model.lm_head.bias and float(head.bias.abs().max()) > 0


@pytest.mark.parametrize("name, retain, base", family_cases())
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_matches_the_models_own_logits(family, name, retain, base):
    check_table_entry(*fresh_pair(family), _model(family, 2), name, retain, base, rmu_layer=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_the_adapters_only(family):
    model = model_of(family)
    apply_lora(model, ModelConfig(lora_rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    st = methods.MethodState(MethodConfig(name="bs_t", bst_topk=5), "torch")
    f = batch(0)
    norms = methods.Norms(*methods.local_counts(f, None).float().clamp_min(1).unbind())
    for _ in range(2):  # B starts at 0: the second step moves A too
        loss, _ = methods.method_loss(LossHead(model), f, None, st, norms)
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, sorted(changed ^ trainable)[:5]


# ---- the sampler ---------------------------------------------------------------------------------------------------


def hf_greedy(model, prompts, max_new):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                         eos_token_id=EOS, pad_token_id=PAD)
    return out[:, width:]


@pytest.mark.parametrize("family", FAMILIES)
def test_sampler_greedy_equals_generate_and_logprobs_are_the_models_own(family):
    model = model_of(family)
    ours = sample(model, PROMPTS, SamplingConfig(n=2, max_new_tokens=12, temperature=0), eos_id=EOS, pad_id=PAD)
    want = hf_greedy(model, PROMPTS, 12)
    for i in range(len(PROMPTS)):
        for j in range(2):
            n = int(ours.lengths[i, j])
            assert ours.tokens[i, j, :n].tolist() == want[i, :n].tolist(), (i, j)
    drawn = sample(model, PROMPTS[:2], SamplingConfig(n=1, max_new_tokens=6, temperature=1.0), eos_id=EOS,
                   pad_id=PAD, generator=torch.Generator().manual_seed(0))
    for i, prompt in enumerate(PROMPTS[:2]):
        seq = torch.tensor([prompt + drawn.tokens[i, 0].tolist()])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
        own = logp[len(prompt) - 1:-1].gather(-1, drawn.tokens[i, 0][:, None]).squeeze(-1)
        n = int(drawn.lengths[i, 0])
        torch.testing.assert_close(drawn.logprobs[i, 0, :n], own[:n], rtol=1e-4, atol=1e-4)


# ---- training under FSDP2, the export, evaluation ------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every family's 2-rank FSDP2 run (one torchrun launch, in the background) and its 1-process run (here)."""
    out = tmp_path_factory.mktemp("families")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # one thread per rank, as here
    env.pop("TRITON_INTERPRET", None)
    # --standalone: a free rendezvous port, so a torchrun of another job on the same machine cannot collide with it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "family_runs.py"), str(out), *FAMILIES]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as two:
        try:
            for family in FAMILIES:
                run(load_config(None, run_args(family, out / family / "single", grad_accum=2), command="unlearn"),
                    progress=False)
            log, _ = two.communicate(timeout=600)
        except BaseException:
            two.kill()
            raise
    assert two.returncode == 0, log[-4000:]
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp2_two_ranks_match_one_process_and_the_exports_reload(runs, family):
    fsdp, single = metrics(runs / family / "fsdp"), metrics(runs / family / "single")
    assert [m["step"] for m in fsdp] == [m["step"] for m in single] == list(range(1, STEPS + 1))
    for a, b in zip(fsdp, single):
        for key in ("loss", "forget", "retain", "grad_norm"):
            assert math.isfinite(b[key]) and abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(b[key])), (key, a, b)
        assert a["belief_round"] == b["belief_round"]
    assert single[-1]["belief_round"] == 2  # beliefs were redrawn by the trained model
    assert abs(single[0]["retain"]) < 1e-6 < single[-1]["retain"]  # KL to the initial model: 0, then it grows
    ids = torch.tensor([PROMPTS[0]])
    logits = []
    for side in ("single", "fsdp"):
        model, _ = load_model(str(runs / family / side / "final"))  # the export reloads in plain transformers
        assert type(model).__name__ == type(_model(family, 1)).__name__
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_scores_the_models_own_logits(runs, family):
    model, tok = load_model(str(runs / family / "single" / "final"))
    data = runs / family / "single" / "data"
    rows = load_qa(data, "forget10")[:2]
    got = score_answers(model, tok, [r["question"] for r in rows], [r["answer"] for r in rows], vocab_stats=True)
    model.eval()
    for r, s in zip(rows, got):
        enc = encode_qa(tok, r["question"], r["answer"], max_length=512)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([enc["input_ids"]])).logits[0, :-1].double(), -1)
        labels = torch.tensor(enc["labels"][1:])
        pos = (labels != -100).nonzero()[:, 0]
        assert s["avg_nll"] == pytest.approx(float(-logp[pos, labels[pos]].mean()), rel=1e-4)
        p = logp[pos[:-1]].exp()
        assert s["mu"].tolist() == pytest.approx((p * logp[pos[:-1]]).sum(-1).tolist(), abs=1e-4)
    res = evaluate_loaded(model, tok, str(data), judge="none", max_new_tokens=4, batch_size=16,
                          utility_splits=("retain_perturbed",))
    for key in ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "model_utility"):
        assert res[key] is not None and 0.0 <= res[key] <= 1.0, (key, res[key])


def test_docs_table_lists_every_family():
    """The family table of the docs (``docs/reference/families.md``) has one row per family of the matrix, and no
    other."""
    section = (REPO / "docs" / "reference" / "families.md").read_text()
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(FAMILIES)
