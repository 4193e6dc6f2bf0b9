"""Each drop-in of ``bs_kernels.open_unlearning`` against the reference formula written out here from open-unlearning's
code (src/trainer/utils.py, src/trainer/unlearn/{ceu,pdu,rmu}.py) and the authors' fork's (kemoulee/open-unlearning
dev, src/trainer/unlearn/{bst,bss}.py), over full [B, T, V] logits of a tiny random Llama: the loss and every
parameter gradient, float32, on ragged right-padded batches where pad == eos (the collator's mask ``input_ids !=
pad``), a row without answer tokens included wherever the reference's formula is defined there. Then the fixed modes
(``reference_exact=False``) against our own definitions, and the drop-in section of ``docs/guides/fused-losses.md`` run
as written.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import bs_kernels as bk
from bs_kernels import open_unlearning as ou
from bs_train.tiny import tiny_llama
from tools.doc_blocks import example

VOCAB, EOS, IGNORE = 131, 1, -100  # V >= 100: the reference UNDIAL reads a -100 label as the id V - 100


def qa_batch(answer_lengths, prompt=3, seed=0):
    """Right-padded rows: prompt, answer (0 = no answer tokens), EOS, EOS padding; mask ``input_ids != EOS``."""
    g = torch.Generator().manual_seed(seed)
    width = prompt + max(answer_lengths) + 2
    ids = torch.full((len(answer_lengths), width), EOS)
    labels = torch.full_like(ids, IGNORE)
    for i, n in enumerate(answer_lengths):
        ids[i, :prompt + n] = torch.randint(2, VOCAB, (prompt + n,), generator=g)
        if n:
            labels[i, prompt:prompt + n + 1] = ids[i, prompt:prompt + n + 1]
    return {"input_ids": ids, "attention_mask": (ids != EOS).long(), "labels": labels,
            "index": torch.arange(len(answer_lengths))}


def logits(model, b):
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


# ---- the references, written out ------------------------------------------------------------------------------


def ref_batch_nll(model, b):
    z, y = logits(model, b)[..., :-1, :], b["labels"][..., 1:]
    return F.cross_entropy(z.transpose(-1, -2), y, ignore_index=IGNORE, reduction="none").sum(-1)


def ref_kl(model, target, b):
    with torch.no_grad():
        ref = F.log_softmax(logits(target, b), -1).view(-1, VOCAB)
    cur = F.log_softmax(logits(model, b), -1).view(-1, VOCAB)
    return F.kl_div(cur, ref, reduction="batchmean", log_target=True)


def ref_dpo(model, ref_model, win, lose, beta):
    def ratio(b):
        if b is None:
            return 0.0
        with torch.no_grad():
            ref = ref_batch_nll(ref_model, b)
        return -(ref_batch_nll(model, b) - ref)
    return -2 / beta * F.logsigmoid(beta * (ratio(win) - ratio(lose))).mean()


def ref_undial(model, ref_model, b, beta):
    y = b["labels"][..., 1:]
    z = logits(model, b)[..., :-1, :]
    with torch.no_grad():
        zt = logits(ref_model, b)[..., :-1, :]
    mask = torch.zeros_like(zt)
    mask[torch.arange(z.shape[0]).view(-1, 1, 1), torch.arange(z.shape[1]).view(1, -1, 1), y.unsqueeze(-1)] = 1.0
    soft = F.softmax(zt - mask * beta, -1)
    return F.cross_entropy(z.reshape(-1, VOCAB), soft.reshape(-1, VOCAB), reduction="none").mean()


def _token_ce(model, b):
    z, y = logits(model, b)[..., :-1, :], b["labels"][..., 1:]
    return F.cross_entropy(z.reshape(-1, VOCAB), y.reshape(-1), ignore_index=IGNORE, reduction="none"), y.reshape(-1)


def ref_wga(model, b, beta):
    ce, y = _token_ce(model, b)
    return -((-ce).exp().detach() ** beta * ce)[y != IGNORE].mean()


def ref_satimp(model, b, beta1, beta2):
    ce, y = _token_ce(model, b)
    p = (-ce).exp().detach()
    return -((p**beta1 * (1 - p) ** beta2) * ce)[y != IGNORE].mean()


def ref_ceu(model, b, n):
    labels = b["labels"]
    valid = labels != IGNORE
    labels = labels.masked_fill((valid.cumsum(-1) <= n) & valid, IGNORE)[..., 1:]
    z = logits(model, b)[..., :-1, :]
    keep = labels != IGNORE
    vz, vy = z[keep], labels[keep]
    target = vz.detach().clone().scatter_(-1, vy.unsqueeze(-1), float("-inf"))
    return F.cross_entropy(vz, F.softmax(target, -1))


def ref_bst(model, b, lam, k):
    z = logits(model, b)[..., :-1, :]
    y = b["labels"][..., 1:]
    top = torch.topk(z, k, -1)
    belief = F.softmax(torch.full_like(z, float("-inf")).scatter_(-1, top.indices, top.values), -1).detach()
    onehot = F.one_hot(y.clamp(0, VOCAB - 1), VOCAB).float()
    onehot[y == IGNORE] = 0
    per_token = -((lam * belief + (1 - lam) * onehot) * F.log_softmax(z, -1)).sum(-1)
    m = y != IGNORE
    return -((per_token * m).sum(-1) / m.sum(-1)).mean()


def hf_loss(model, b):
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss


def ref_bss(model, f, aug, lam):
    return (1 - lam) * -hf_loss(model, f) + lam * -hf_loss(model, aug)


def ref_pdu(model, b):
    z = logits(model, b).reshape(-1, VOCAB)
    mask = (b["labels"] != IGNORE).reshape(-1)
    return (((z.max(-1)[0] - z.mean(-1)) ** 2) * mask).sum() / mask.sum()


# ---- the comparison -----------------------------------------------------------------------------------------------

F_ANY, F_FULL, WIN = [5, 0, 2, 3], [5, 2, 3, 1], [2, 4, 1, 3]  # with / without a row that has no answer tokens
CASES = {
    "batch_nll": (lambda m, r, f, w: ou.compute_batch_nll(m, f)[0].sum(), lambda m, r, f, w: ref_batch_nll(m, f).sum(),
                  F_ANY),
    "mean_nll": (lambda m, r, f, w: ou.compute_mean_nll(m, f)[0], lambda m, r, f, w: hf_loss(m, f), F_ANY),
    "kl": (lambda m, r, f, w: ou.compute_kl_divergence(m, r, f)[0], lambda m, r, f, w: ref_kl(m, r, f), F_ANY),
    "npo": (lambda m, r, f, w: ou.compute_dpo_loss(m, r, None, f, beta=0.1)[0],
            lambda m, r, f, w: ref_dpo(m, r, None, f, 0.1), F_ANY),
    "dpo": (lambda m, r, f, w: ou.compute_dpo_loss(m, r, w, f, beta=0.5)[0],
            lambda m, r, f, w: ref_dpo(m, r, w, f, 0.5), F_ANY),
    "win_only": (lambda m, r, f, w: ou.compute_dpo_loss(m, r, w, None, beta=0.5)[0],
                 lambda m, r, f, w: ref_dpo(m, r, w, None, 0.5), F_ANY),
    "undial": (lambda m, r, f, w: ou.compute_undial_loss(m, r, f, 10.0)[0],
               lambda m, r, f, w: ref_undial(m, r, f, 10.0), F_ANY),
    "wga": (lambda m, r, f, w: ou.compute_wga_loss(m, f, 0.7)[0], lambda m, r, f, w: ref_wga(m, f, 0.7), F_ANY),
    "satimp": (lambda m, r, f, w: ou.compute_satimp_loss(m, f, 5.0, 1.0)[0],
               lambda m, r, f, w: ref_satimp(m, f, 5.0, 1.0), F_ANY),
    "ceu": (lambda m, r, f, w: ou.compute_batch_ceu(m, f, 1)[0], lambda m, r, f, w: ref_ceu(m, f, 1), F_ANY),
    "bst": (lambda m, r, f, w: ou.compute_bst_loss(m, f, 0.2, 20)[0], lambda m, r, f, w: ref_bst(m, f, 0.2, 20),
            F_FULL),
    "bss": (lambda m, r, f, w: ou.compute_bss_loss(m, f, w, 0.5)[0], lambda m, r, f, w: ref_bss(m, f, w, 0.5), F_ANY),
    "pdu": (lambda m, r, f, w: ou.compute_pdu_forget_loss(m, f)[0], lambda m, r, f, w: ref_pdu(m, f), F_ANY),
}


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_drop_in_equals_the_reference_formula(case):
    ours_fn, ref_fn, lengths = CASES[case]
    model = tiny_llama(VOCAB, num_layers=2, seed=1)
    ref_model = tiny_llama(VOCAB, num_layers=2, seed=2).eval()
    f, w = qa_batch(lengths, seed=0), qa_batch(WIN, seed=1)
    mine = copy.deepcopy(model)
    ours = ours_fn(mine, ref_model, f, w)
    ours.backward()
    want = ref_fn(model, ref_model, f, w)
    want.backward()
    torch.testing.assert_close(ours, want, rtol=2e-6, atol=2e-6 * abs(float(want.detach())) + 1e-7)
    got, expected = grads(mine), grads(model)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_reference_defects_and_their_fixes():
    """UNDIAL over answer tokens and without the -100 read as an id; BS-T leaving out a row without answer tokens
    (the fork's loss is NaN there); RMU's per-sequence mean where the reference broadcasts [B] / [B, 1]."""
    model = tiny_llama(VOCAB, num_layers=2, seed=1)
    ref_model = tiny_llama(VOCAB, num_layers=2, seed=2).eval()
    f = qa_batch(F_ANY)
    h, wt = bk.hf.hidden_states_and_head(model, f["input_ids"], f["attention_mask"])
    with torch.no_grad():
        th, tw = bk.hf.hidden_states_and_head(ref_model, f["input_ids"], f["attention_mask"])
    fixed = ou.compute_undial_loss(model, ref_model, f, 10.0, reference_exact=False)[0]
    torch.testing.assert_close(fixed, bk.undial_loss(h, wt, f["labels"], th, tw, beta=10.0, impl="torch"))
    assert not torch.isclose(fixed, ou.compute_undial_loss(model, ref_model, f, 10.0)[0])

    assert torch.isnan(ou.compute_bst_loss(model, f)[0])  # the fork's 0 / 0
    assert torch.isnan(ref_bst(model, f, 0.2, 20))
    kept = [0, 2, 3]
    sub = {k: v[kept] for k, v in f.items()}
    torch.testing.assert_close(ou.compute_bst_loss(model, f, reference_exact=False)[0],
                               ou.compute_bst_loss(model, sub)[0])

    g = torch.Generator().manual_seed(0)
    act, target = torch.randn(3, 6, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0]]).bool()
    sq = ((act - target) ** 2 * mask[..., None]).mean(2).sum(1)
    torch.testing.assert_close(ou.compute_activation_loss(act, target, mask),
                               (sq / mask.sum(-1, keepdim=True)).mean())  # the reference's broadcast
    torch.testing.assert_close(ou.compute_activation_loss(act, target, mask, reference_exact=False),
                               (sq / mask.sum(-1)).mean())  # per sequence


def test_outputs_hold_no_logits_and_bad_calls_are_refused():
    model = tiny_llama(VOCAB, num_layers=2, seed=1)
    f = qa_batch(F_ANY)
    loss, out = ou.compute_wga_loss(model, f, 1.0)
    assert out.logits is None and out.last_hidden_state.shape == (*f["input_ids"].shape, 64)
    with pytest.raises(ValueError, match="both are None"):
        ou.compute_dpo_loss(model, model, None, None)


# ---- the drop-in section of the docs (docs/guides/fused-losses.md), as written ----------------------------------


def docs_block(name: str) -> str:
    return example(name)  # the block named example:<name>; its copies, if any, identical


def test_docs_drop_in_section_runs_as_written():
    """The import lines the docs tell an open-unlearning user to change name helpers that exist with the
    reference's signature, and its example computes the reference trainer's NPO loss from the fused helpers."""
    import inspect

    diff = docs_block("drop-in-diff")
    new = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+")]
    old = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-")]
    assert new and all(ln.startswith("from bs_kernels.open_unlearning import") for ln in new)
    assert all(ln.startswith("from trainer.utils import") for ln in old)
    names = {n.strip() for ln in new for n in ln.split("import", 1)[1].split(",")}
    reference_params = {  # open-unlearning src/trainer/utils.py, as written there
        "compute_kl_divergence": ["model", "target_model", "inputs"],
        "compute_batch_nll": ["model", "inputs"],
        "compute_dpo_loss": ["model", "ref_model", "win_inputs", "lose_inputs", "beta"],
        "compute_undial_loss": ["model", "ref_model", "inputs", "beta"],
        "compute_wga_loss": ["model", "inputs", "beta"],
        "compute_satimp_loss": ["model", "inputs", "beta1", "beta2"],
    }
    assert names == set(reference_params)
    for name, params in reference_params.items():
        sig = inspect.signature(getattr(ou, name))
        positional = [p.name for p in sig.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional == params, name

    namespace: dict = {}
    exec(docs_block("drop-in"), namespace)
    model = tiny_llama(VOCAB, num_layers=2, seed=1)
    ref_model = tiny_llama(VOCAB, num_layers=2, seed=2).eval()
    forget, retain = qa_batch(F_ANY, seed=0), qa_batch(WIN, seed=1)
    loss = namespace["npo_loss"](model, ref_model, {"forget": forget, "retain": retain}, beta=0.1)
    want = ref_dpo(model, ref_model, None, forget, 0.1) + hf_loss(model, retain)
    torch.testing.assert_close(loss, want, rtol=2e-6, atol=1e-6)
