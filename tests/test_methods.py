"""Every entry of the method table equals the same loss computed directly from full logits: values and gradients.

The test walks ``methods.METHODS``: every forget loss, every retain term a row takes (each of ``method.retain`` for
rows that take the configured one, RMU's own), and BS-S with every base. The direct versions below are written from
the methods' definitions with materialised [B, T, V] logits (or a forward hook on the steered layer, for RMU) and
plain autograd, independently of bs_kernels, on a tiny random Llama. A row whose forget loss or retain term has no
direct version here fails, so a new method arrives with its check.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bs_train import methods
from bs_train.methods.beliefs import BeliefSet
from bs_train.config import BSS_BASES, MethodConfig
from bs_train.model import LossHead
from bs_train.tiny import tiny_llama

VOCAB, B, T, LAYERS, PROMPT = 61, 3, 10, 3, 4
DUAL = 0.8  # PDU's dual variable in the table walk
IGNORE = -100  # written out: the direct versions do not borrow the library's constants


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 7:] = 0  # right padding
    labels = ids.clone()
    labels[:, :PROMPT] = IGNORE  # prompt
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.tensor([2, 0, 1])}


def belief_set(forget) -> BeliefSet:
    """Two beliefs of different lengths for each forget prompt, ordered by example index."""
    g = torch.Generator().manual_seed(5)
    order = forget["index"].argsort()
    prompts = [forget["input_ids"][i, :PROMPT].tolist() for i in order]
    answers = [[torch.randint(1, VOCAB, (3 + j,), generator=g).tolist() for j in range(2)] for _ in prompts]
    return BeliefSet(prompts, answers, [[-5.0, -7.0], [-6.0, -4.0], [-9.0, -3.0]], round=1)


def alternate_set(forget) -> BeliefSet:
    """One alternate answer per forget prompt (IdkDPO's refusals stand-in), with its reference log-prob."""
    g = torch.Generator().manual_seed(6)
    order = forget["index"].argsort()
    prompts = [forget["input_ids"][i, :PROMPT].tolist() for i in order]
    answers = [[torch.randint(1, VOCAB, (2 + i,), generator=g).tolist()] for i in range(len(prompts))]
    return BeliefSet(prompts, answers, [[-6.0], [-9.0], [-4.0]], round=0)


def shifted_logp(model, b):
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()[:, :-1]
    y = b["labels"][:, 1:]
    mask = y != IGNORE
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1) * mask
    return logp_all, logp, mask, y


def seq_mean(x, mask):
    return (x * mask).sum(-1) / mask.sum(-1)


def layer_output(model, b, layer):
    seen = []
    hook = model.get_decoder().layers[layer].register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    hook.remove()
    return seen[0]


def answer_mse(act, target, labels):
    """RMU as open-unlearning computes it on TOFU: squared error averaged over the hidden dimension, then over each
    sequence's answer tokens (unshifted), then over sequences."""
    mask = (labels != IGNORE).float()
    return ((((act - target) ** 2).mean(-1) * mask).sum(-1) / mask.sum(-1)).mean()


def soft_target_ce(student_logits, target_logits, keep):
    """-<softmax(target), log softmax(student)> averaged over the kept positions."""
    ce = -(torch.softmax(target_logits, -1) * torch.log_softmax(student_logits, -1)).sum(-1)
    return (ce * keep).sum() / keep.sum()


def logits_of(model, b):
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()[:, :-1]


def forget_direct(fn, model, b, cfg, ref_logp, u, ref_model=None, alt=None, alt_set=None):
    """The forget loss ``fn`` (a ``forget_*`` of the table) from its definition."""
    name = fn.__name__
    if name == "forget_rmu":
        return answer_mse(layer_output(model, b, cfg.rmu_layer), cfg.rmu_coeff * u, b["labels"])
    if name == "forget_undial":  # open-unlearning's compute_undial_loss, on answer tokens
        y = b["labels"][:, 1:]
        with torch.no_grad():
            teacher = logits_of(ref_model, b)
        teacher = teacher - cfg.undial_beta * F.one_hot(y.clamp_min(0), teacher.shape[-1]) * (y != IGNORE)[..., None]
        return soft_target_ce(logits_of(model, b), teacher, y != IGNORE)
    if name == "forget_ceu":  # open-unlearning's compute_batch_ceu: first n answer labels dropped, then shifted
        labels = b["labels"]
        valid = labels != IGNORE
        labels = labels.masked_fill(valid & (valid.cumsum(-1) <= cfg.ceu_ignore_first), IGNORE)
        y = labels[:, 1:]
        logits = logits_of(model, b)
        target = logits.detach().scatter(-1, y.clamp_min(0)[..., None], float("-inf"))
        return soft_target_ce(logits, target, y != IGNORE)
    if name == "forget_dpo":  # open-unlearning's compute_dpo_loss: the alternate wins, the forget answer loses
        lose = shifted_logp(model, b)[1].sum(-1) - ref_logp[b["index"]]
        win = shifted_logp(model, alt)[1].sum(-1) - alt_set.ref_logp[alt["index"]]
        win = win.view(len(lose), -1)  # AltPO: every alternate of an example against its forget answer
        return (-(2 / cfg.dpo_beta) * F.logsigmoid(cfg.dpo_beta * (win - lose[:, None]))).mean()
    logp_all, logp, mask, y = shifted_logp(model, b)
    if name == "forget_nll":
        return -logp.sum() / mask.sum()
    if name == "forget_ga":
        return seq_mean(logp, mask).mean()
    if name == "forget_bst":
        top_v, top_i = torch.topk(logp_all.detach(), cfg.bst_topk, -1)
        t = torch.zeros_like(logp_all).scatter(-1, y.clamp_min(0)[..., None], 1 - cfg.bst_lam)
        t = t.scatter_add(-1, top_i, cfg.bst_lam * torch.softmax(top_v, -1))
        return seq_mean((t * logp_all).sum(-1) * mask, mask).mean()
    if name == "forget_npo":
        seq = logp.sum(-1)
        return (-(2 / cfg.npo_beta) * F.logsigmoid(-cfg.npo_beta * (seq - ref_logp[b["index"]]))).mean()
    if name == "forget_simnpo":
        return (-(2 / cfg.simnpo_beta) * F.logsigmoid(-cfg.simnpo_beta * seq_mean(logp, mask)
                                                       - cfg.simnpo_delta)).mean()
    if name == "forget_pdu":  # logit-margin flattening, at the positions that predict answer tokens
        logits = logits_of(model, b)
        return (((logits.max(-1).values - logits.mean(-1)) ** 2) * mask).sum() / mask.sum()
    if name == "forget_satimp":  # open-unlearning's compute_satimp_loss
        p = logp.exp().detach()
        w = p ** cfg.satimp_beta1 * (1 - p) ** cfg.satimp_beta2
        return (w * logp).sum() / mask.sum()
    if name == "forget_wga":
        return seq_mean(torch.exp(cfg.wga_beta * logp).detach() * logp, mask).mean()
    raise AssertionError(f"no direct version of {name}")


def retain_direct(fn, model, ref_model, r, cfg):
    name = fn.__name__
    if name == "retain_nll":
        _, rlogp, rmask, _ = shifted_logp(model, r)
        return -rlogp.sum() / rmask.sum()
    if name == "retain_kl":  # KL(p_init || p_theta) on retain answer tokens
        q_all, _, rmask, _ = shifted_logp(model, r)
        with torch.no_grad():
            p_all, _, _, _ = shifted_logp(ref_model, r)
        return ((p_all.exp() * (p_all - q_all)).sum(-1) * rmask).sum() / rmask.sum()
    if name == "retain_rmu":
        with torch.no_grad():
            ref_act = layer_output(ref_model, r, cfg.rmu_layer)
        return answer_mse(layer_output(model, r, cfg.rmu_layer), ref_act, r["labels"])
    raise AssertionError(f"no direct version of {name}")


def direct(cfg, model, ref_model, f, r, bel, beliefs, ref_logp, u):
    row = methods.METHODS[cfg.name]
    if row.beliefs:  # BS-S: (1 - lam_S) L(targets) + lam_S L(beliefs), the beliefs' reference their own log-probs
        base = methods.METHODS[cfg.bss_base].forget
        forget = ((1 - cfg.bss_lam) * forget_direct(base, model, f, cfg, ref_logp, u)
                  + cfg.bss_lam * forget_direct(base, model, bel, cfg, beliefs.ref_logp, u))
    else:
        forget = forget_direct(row.forget, model, f, cfg, ref_logp, u, ref_model, bel, beliefs)
    loss = (cfg.gamma if row.scaled else 1.0) * forget
    term = methods.retain_term(cfg)
    if term is None:
        return loss
    if row.dual:  # PDU: lambda (retain - eps)
        return loss + DUAL * (retain_direct(term, model, ref_model, r, cfg) - cfg.pdu_retain_eps)
    return loss + cfg.alpha * retain_direct(term, model, ref_model, r, cfg)


def table_cases():
    """(method, retain, bss_base) for every row: each configured retain term, and for rows on beliefs every base
    (the retain terms cycled over the bases, so each appears)."""
    cases = []
    for name, row in methods.METHODS.items():
        retains = list(methods.RETAIN_TERMS) if row.retain == methods.CONFIGURED else ["nll"]
        if row.dual:  # a constrained retain term cannot be none
            retains.remove("none")
        if row.beliefs:
            cases += [(name, retains[i % len(retains)], base) for i, base in enumerate(BSS_BASES)]
        else:
            cases += [(name, retain, "bs_t") for retain in retains]
    return cases


CASES = table_cases()


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, retain, base", CASES)
def test_table_entry_matches_full_logits(name, retain, base):
    model = tiny_llama(VOCAB, num_layers=LAYERS, seed=1)
    ref_model = tiny_llama(VOCAB, num_layers=LAYERS, seed=2).eval()  # another "initial model": KL and RMU not 0
    check_table_entry(model, copy.deepcopy(model), ref_model, name, retain, base, rmu_layer=1)


def check_table_entry(model, ours_model, ref_model, name, retain, base, rmu_layer):
    """The table entry (``name``, ``retain``, ``base``) on ``ours_model`` against its direct version from the own
    logits of ``model`` (the same weights, no gradients yet): loss and every parameter's gradient. Also the family
    matrix's check (tests/test_families.py), on every family's tiny model."""
    cfg = MethodConfig(name=name, retain=retain, bss_base=base, bss_lam=0.3, bst_topk=5, gamma=0.7, alpha=1.3,
                       simnpo_delta=0.5, wga_beta=0.5, rmu_layer=rmu_layer, rmu_coeff=5.0, dpo_beta=0.5,
                       undial_beta=3.0, satimp_beta1=2.0, satimp_beta2=0.5, pdu_retain_eps=0.5)
    f, r = batch(0), batch(1)
    ref_logp = torch.tensor([-30.0, -25.0, -41.0])
    u = F.normalize(torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(3)), dim=0)
    row = methods.METHODS[name]
    beliefs = belief_set(f) if row.beliefs or row.sample_alternates else alternate_set(f) if row.alternates else None
    bel = beliefs.batch(f["index"].tolist(), pad_id=0) if beliefs is not None else None
    st = methods.MethodState(cfg, "torch", ref_logp=ref_logp, reference=LossHead(ref_model), rmu_direction=u,
                             beliefs=beliefs, dual=torch.tensor(DUAL))
    retain_batch = r if methods.needs_retain(cfg) else None

    norms = methods.Norms(*methods.local_counts(f, retain_batch, bel).float().clamp_min(1).unbind())
    loss, parts = methods.method_loss(LossHead(ours_model), f, retain_batch, st, norms, beliefs=bel)
    loss.backward()
    want = direct(cfg, model, ref_model, f, r, bel, beliefs, ref_logp, u)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert (float(parts["retain"]) != 0.0) == (retain_batch is not None)
    ours, theirs = grads_of(ours_model), grads_of(model)
    assert ours.keys() == theirs.keys()
    for key in ours:  # float32 rounding at the gradient's own scale (the families' larger weights give larger ones)
        scale = max(1.0, float(theirs[key].abs().max()))
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6 * scale, msg=key)
    return loss


def test_walk_covers_the_whole_table():
    """Every row, forget loss, retain term and BS-S base is among the cases above."""
    covered = {name for name, _, _ in CASES}
    assert covered == set(methods.METHODS)
    retains = {methods.retain_term(MethodConfig(name=n, retain=r, pdu_retain_eps=1.0)) for n, r, _ in CASES} - {None}
    assert retains == {f for f in methods.RETAIN_TERMS.values() if f is not None} | \
        {row.retain for row in methods.METHODS.values() if callable(row.retain)}
    assert {b for n, _, b in CASES if methods.METHODS[n].beliefs} == set(BSS_BASES)


def test_ga_and_graddiff_differ_only_by_the_retain_term():
    ga, graddiff = methods.METHODS["ga"], methods.METHODS["graddiff"]
    assert ga.forget is graddiff.forget
    assert ga.retain is None and graddiff.retain == methods.CONFIGURED
    assert not methods.needs_retain(MethodConfig(name="ga", retain="nll"))
    assert methods.needs_retain(MethodConfig(name="graddiff", retain="nll"))


def test_no_method_name_compared_outside_the_table():
    """Outside the method table no source compares anything with a method name (``cfg.command`` may be compared
    with the command ``finetune``): what differs between methods is read from their rows."""
    names = set(methods.METHODS)
    table = Path(methods.registry.__file__)
    root = table.parent.parent  # bs_train, every subpackage included
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == table:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "command" for s in sides):
                continue
            for side in sides:
                consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, f"method names compared outside the table at {found}"


def test_rmu_trains_down_proj_of_three_layers():
    model = tiny_llama(VOCAB, num_layers=4)
    keep = methods.rmu_trainable(model, MethodConfig(name="rmu", rmu_layer=2, rmu_params="down_proj"))
    assert keep == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == keep
    early = tiny_llama(VOCAB, num_layers=4)
    assert methods.rmu_trainable(early, MethodConfig(name="rmu", rmu_layer=0, rmu_params="down_proj")) == \
        ["model.layers.0.mlp.down_proj.weight"]
    everything = tiny_llama(VOCAB, num_layers=4)
    assert len(methods.rmu_trainable(everything, MethodConfig(name="rmu", rmu_layer=2, rmu_params="all"))) == \
        len(list(everything.parameters()))
    assert all(p.requires_grad for p in everything.parameters())
    with pytest.raises(ValueError, match="rmu_layer=3 but the model has 4 decoder layers"):
        methods.rmu_trainable(tiny_llama(VOCAB, num_layers=4), MethodConfig(name="rmu", rmu_layer=3))
    with pytest.raises(ValueError, match="rmu_params must be one of"):
        MethodConfig(name="rmu", rmu_params="mlp")


def test_counts_are_global_denominators():
    """Two micro-batches with summed counts give the loss of one batch holding both (gradient accumulation)."""
    cfg = MethodConfig(name="bs_t", bst_topk=5)
    model = LossHead(tiny_llama(VOCAB, seed=1))
    st = methods.MethodState(cfg, "torch")
    f1, f2, r1, r2 = batch(0), batch(3), batch(1), batch(4)
    norms = methods.Norms(*(methods.local_counts(f1, r1) + methods.local_counts(f2, r2)).float().clamp_min(1).unbind())
    split = methods.method_loss(model, f1, r1, st, norms)[0] + methods.method_loss(model, f2, r2, st, norms)[0]
    both_f = {k: torch.cat([f1[k], f2[k]]) for k in f1}
    both_r = {k: torch.cat([r1[k], r2[k]]) for k in r1}
    whole_norms = methods.Norms(*methods.local_counts(both_f, both_r).float().clamp_min(1).unbind())
    whole = methods.method_loss(model, both_f, both_r, st, whole_norms)[0]
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_pdu_dual_ascends_on_the_constraint_after_warm_up():
    """lambda <- max(0, lambda + eta (retain - eps)) after each step, frozen during the warm-up epochs."""
    cfg = MethodConfig(name="pdu", alpha=2.0, pdu_retain_eps=1.0, pdu_dual_step=0.5, pdu_dual_warmup_epochs=1)
    st = methods.MethodState(cfg, "torch")
    methods.setup_pdu(st, None, device="cpu")
    assert float(st.dual) == 2.0
    methods.step_pdu(st, torch.tensor(3.0), epoch=0)  # warm-up: no move
    assert float(st.dual) == 2.0
    methods.step_pdu(st, torch.tensor(3.0), epoch=1)  # violated by 2: up by eta * 2
    assert float(st.dual) == 3.0
    methods.step_pdu(st, torch.tensor(-9.0), epoch=1)  # satisfied by far: down, but never below 0
    assert float(st.dual) == 0.0
    with pytest.raises(ValueError, match="needs method.pdu_retain_eps"):
        MethodConfig(name="pdu")
    with pytest.raises(ValueError, match="constrains its retain term"):
        MethodConfig(name="pdu", pdu_retain_eps=1.0, retain="none")


def test_dpo_alternates_are_refusals_fixed_by_seed_and_index():
    """IdkDPO's preferred answer of each forget example: one of our refusals plus EOS, after the same prompt as the
    forget example, the same for the same (seed, index) and not all alike."""
    from bs_train.data import encode_prompt
    from bs_train.methods.refusals import REFUSALS, refusal_for
    from bs_train.tiny import byte_tokenizer

    tok = byte_tokenizer()
    examples = [{"question": f"Who wrote book {i}?", "answer": "Someone."} for i in range(12)]
    st = methods.MethodState(MethodConfig(name="dpo"), "torch")
    from types import SimpleNamespace

    methods.setup_dpo(st, None, tokenizer=tok, dataset=SimpleNamespace(examples=examples), seed=3)
    alt = st.beliefs
    assert alt.n == 1 and alt.prompts == [encode_prompt(tok, ex["question"]) for ex in examples]
    texts = [tok.decode(a[0][:-1]) for a in alt.answers]
    assert all(a[0][-1] == tok.eos_token_id for a in alt.answers)
    assert texts == [refusal_for(3, i) for i in range(12)] and set(texts) <= set(REFUSALS) and len(set(texts)) > 1
    assert len(set(REFUSALS)) == 20
