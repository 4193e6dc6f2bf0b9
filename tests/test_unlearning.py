"""Every public loss of ``bs_kernels.unlearning`` against the same loss written out over full [B, T, V] logits.

The direct versions below are written from each method's definition with materialised logits and plain autograd,
independently of bs_kernels. Each public loss is compared on values and on the gradients w.r.t. hidden and weight, on
a ragged right-padded batch with ignored labels and a row without answer tokens, in both reductions where a loss has
them, in float64 on the torch path (and a float32 Triton-interpreter pass of every token-level loss). Also: a step
split into micro-batches with the step's global counts sums to the loss of the whole step; the peers' findings
(``linear_cross_entropy(shift=k)``, the bf16 dW rounding of a mean) stay fixed; bad arguments are refused by name.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bs_kernels as bk
from bs_kernels import torch_path

B, T, D, V, DT = 4, 9, 16, 131, 24
IGNORE = -100  # written out: the direct versions do not borrow the library's constants


def batch(seed=0, dtype=torch.float64, lengths=(5, 0, 3, 6), prompt=2):
    """hidden [B, T, D], weight [V, D], labels [B, T] (prompt ignored, ragged answers, right padding ignored; row 1
    has no answer token), a teacher head, reference log-probs and a preferred-answer batch (2 per row)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype)
    weight = torch.randn(V, D, generator=g, dtype=dtype) / D**0.5 * 3
    labels = torch.full((B, T), IGNORE)
    for i, n in enumerate(lengths):
        labels[i, prompt:prompt + n] = torch.randint(0, V, (n,), generator=g)
    t_hidden = torch.randn(B, T, DT, generator=g, dtype=dtype)
    t_weight = torch.randn(V, DT, generator=g, dtype=dtype) / DT**0.5 * 3
    win_hidden = torch.randn(2 * B, T - 2, D, generator=g, dtype=dtype)
    win_labels = torch.full((2 * B, T - 2), IGNORE)
    for i in range(2 * B):
        win_labels[i, 1:2 + i % 4] = torch.randint(0, V, (1 + i % 4,), generator=g)
    return dict(hidden=hidden, weight=weight, labels=labels, t_hidden=t_hidden, t_weight=t_weight,
                ref=-torch.rand(B, generator=g, dtype=dtype) * 20, win_hidden=win_hidden, win_labels=win_labels,
                win_ref=-torch.rand(2 * B, generator=g, dtype=dtype) * 10)


# ---- the direct, full-logits versions ---------------------------------------------------------------------------


def shifted(h, w, labels):
    """(logits [B, T-1, V], log-softmax, labels [B, T-1], mask) of the positions that predict a next token."""
    z = (h @ w.T)[:, :-1]
    y = labels[:, 1:]
    return z, torch.log_softmax(z, -1), y, y != IGNORE


def logp_of(logp, y):
    return logp.gather(-1, y.clamp_min(0)[..., None])[..., 0]


def reduce(per_token, mask, reduction):
    m = mask.to(per_token.dtype)
    if reduction == "token":
        return (per_token * m).sum() / m.sum()
    rows = m.sum(-1) > 0
    return ((per_token * m).sum(-1)[rows] / m.sum(-1)[rows]).mean()


def direct(name, b, h, w, reduction="token", **kw):
    labels = b["labels"]
    z, logp, y, mask = shifted(h, w, labels)
    lp = logp_of(logp, y)
    rows = mask.any(-1)
    if name == "nll":
        return reduce(-lp, mask, reduction)
    if name == "ga":
        return reduce(lp, mask, reduction)
    if name == "bst":
        lam, k = kw["lam"], kw["topk"]
        top = torch.topk(z.detach(), k, -1)
        q = torch.softmax(top.values, -1)
        s = (1 - lam) * lp + lam * (q * logp.gather(-1, top.indices)).sum(-1)
        return reduce(s, mask, reduction)
    if name == "wga":
        return reduce(torch.exp(kw["beta"] * lp).detach() * lp, mask, reduction)
    if name == "satimp":
        p = lp.exp().detach()
        return reduce(p ** kw["beta1"] * (1 - p) ** kw["beta2"] * lp, mask, reduction)
    seq = (lp * mask).sum(-1)
    if name == "npo":
        beta = kw["beta"]
        return (-(2 / beta) * F.logsigmoid(-beta * (seq - b["ref"])))[rows].mean()
    if name == "simnpo":
        beta, delta = kw["beta"], kw["delta"]
        return (-(2 / beta) * F.logsigmoid(-beta * seq / mask.sum(-1).clamp_min(1) - delta))[rows].mean()
    if name == "dpo":
        beta = kw["beta"]
        _, wlogp, wy, wmask = shifted(b["win_hidden"], w, b["win_labels"])
        win = (logp_of(wlogp, wy) * wmask).sum(-1) - b["win_ref"]
        margin = win.view(B, 2) - (seq - b["ref"])[:, None]
        return (-(2 / beta) * F.logsigmoid(beta * margin)).mean(-1)[rows].mean()
    if name == "undial":
        zt = (b["t_hidden"] @ b["t_weight"].T)[:, :-1]
        if kw.get("positions") == "all":  # open-unlearning: the label as an index, -100 read from the end
            adjust = torch.zeros_like(zt)
            adjust[torch.arange(B)[:, None], torch.arange(T - 1)[None], y] = kw["beta"]
            ce = -(torch.softmax(zt - adjust, -1) * logp).sum(-1)
            return ce.mean()
        zt = zt - kw["beta"] * F.one_hot(y.clamp_min(0), V) * mask[..., None]
        return reduce(-(torch.softmax(zt, -1) * logp).sum(-1), mask, reduction)
    if name == "ceu":
        valid = labels != IGNORE
        kept = labels.masked_fill(valid & (valid.cumsum(-1) <= kw["ignore_first"]), IGNORE)[:, 1:]
        target = z.detach().scatter(-1, kept.clamp_min(0)[..., None], -math.inf)
        return reduce(-(torch.softmax(target, -1) * logp).sum(-1), kept != IGNORE, reduction)
    if name == "kl":
        zt = b["t_hidden"] @ b["t_weight"].T
        if kw.get("positions") == "all":
            lq, lp_t = torch.log_softmax(h @ w.T, -1), torch.log_softmax(zt, -1)
            return (lp_t.exp() * (lp_t - lq)).sum(-1).mean()
        lp_t = torch.log_softmax(zt[:, :-1], -1)
        return reduce((lp_t.exp() * (lp_t - logp)).sum(-1), mask, reduction)
    if name == "pdu":
        zz, mm = ((h @ w.T)[:, :-1], mask) if kw.get("shift", True) else (h @ w.T, labels != IGNORE)
        return reduce((zz.max(-1).values - zz.mean(-1)) ** 2, mm, reduction)
    raise AssertionError(name)


def ours(name, b, h, w, reduction="token", impl="torch", **kw):
    labels = b["labels"]
    common = dict(reduction=reduction, impl=impl)
    if name == "nll":
        return bk.nll_loss(h, w, labels, **common)
    if name == "ga":
        return bk.ga_loss(h, w, labels, **common)
    if name == "bst":
        return bk.bst_loss(h, w, labels, **common, **kw)
    if name == "wga":
        return bk.wga_loss(h, w, labels, **common, **kw)
    if name == "satimp":
        return bk.satimp_loss(h, w, labels, **common, **kw)
    if name == "npo":
        return bk.npo_loss(h, w, labels, b["ref"], impl=impl, **kw)
    if name == "simnpo":
        return bk.simnpo_loss(h, w, labels, impl=impl, **kw)
    if name == "dpo":
        return bk.dpo_loss(h, w, labels, b["ref"], b["win_hidden"], b["win_labels"], b["win_ref"], impl=impl, **kw)
    if name == "undial":
        return bk.undial_loss(h, w, labels, b["t_hidden"], b["t_weight"], **common, **kw)
    if name == "ceu":
        return bk.ceu_loss(h, w, labels, **common, **kw)
    if name == "kl":
        return bk.kl_loss(h, w, labels, b["t_hidden"], b["t_weight"], **common, **kw)
    if name == "pdu":
        return bk.pdu_loss(h, w, labels, reduction=reduction, **kw)
    raise AssertionError(name)


TOKEN_LEVEL = [("nll", {}), ("ga", {}), ("bst", dict(lam=0.3, topk=7)), ("wga", dict(beta=0.7)),
               ("satimp", dict(beta1=2.0, beta2=0.5)), ("undial", dict(beta=3.0)), ("ceu", dict(ignore_first=1)),
               ("kl", {}), ("pdu", {}), ("pdu", dict(shift=False))]
SEQUENCE_LEVEL = [("npo", dict(beta=0.5)), ("simnpo", dict(beta=2.0, delta=0.3)), ("dpo", dict(beta=0.5))]
REFERENCE_POSITIONS = [("undial", dict(beta=3.0, positions="all")), ("kl", dict(positions="all"))]


def check(name, b, kw, reduction="token", impl="torch", rtol=1e-9, atol=1e-11):
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone().requires_grad_()
    got = ours(name, b, h, w, reduction, impl, **kw)
    dh, dw = torch.autograd.grad(got, (h, w))
    h2 = b["hidden"].clone().requires_grad_()
    w2 = b["weight"].clone().requires_grad_()
    want = direct(name, b, h2, w2, reduction, **kw)
    dh2, dw2 = torch.autograd.grad(want, (h2, w2))
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(dh, dh2, rtol=rtol * 10, atol=atol * 10)
    torch.testing.assert_close(dw, dw2, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("name, kw", TOKEN_LEVEL, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x)))
def test_token_level_loss_matches_full_logits(name, kw, reduction):
    check(name, batch(), kw, reduction)


@pytest.mark.parametrize("name, kw", SEQUENCE_LEVEL + REFERENCE_POSITIONS, ids=lambda x: x if isinstance(x, str)
                         else "-".join(map(str, x.values())))
def test_sequence_level_and_reference_position_losses_match_full_logits(name, kw):
    check(name, batch(), kw)


@pytest.mark.parametrize("name, kw", TOKEN_LEVEL[1:7] + SEQUENCE_LEVEL[:1],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_triton_kernels_give_the_same_losses(name, kw, triton_device):
    """The same losses with impl="triton" (the CPU interpreter here) in float32, against the full-logits versions."""
    b = {k: v.float().to(triton_device) if v.is_floating_point() else v.to(triton_device)
         for k, v in batch(dtype=torch.float32).items()}
    check(name, b, kw, "sequence", impl="triton", rtol=1e-5, atol=1e-6)


def test_global_counts_make_micro_batches_sum_to_the_whole_step():
    """A step split in two micro-batches, each divided by the step's counts (0-d tensors), is the whole batch's loss;
    the default denominators are each batch's own."""
    b = batch()
    h, w, y = b["hidden"], b["weight"], b["labels"]
    shifted_y = bk.shift_labels(y)
    tokens = (shifted_y != IGNORE).sum()
    seqs = (shifted_y != IGNORE).any(-1).sum()
    for fn, kw in ((bk.bst_loss, {}), (bk.wga_loss, {}), (bk.nll_loss, {}), (bk.ceu_loss, {})):
        for reduction in ("token", "sequence"):
            whole = fn(h, w, y, reduction=reduction, impl="torch", **kw)
            if fn is bk.ceu_loss:  # its count is of the kept tokens
                n = (bk.shift_labels(bk.unlearning.drop_first_answer_tokens(y, 1)) != IGNORE).sum()
            else:
                n = tokens
            parts = sum(fn(h[s], w, y[s], reduction=reduction, num_tokens=n, num_sequences=seqs, impl="torch", **kw)
                        for s in (slice(0, 1), slice(1, 4)))
            torch.testing.assert_close(parts, whole, rtol=1e-10, atol=1e-12)
    whole = bk.npo_loss(h, w, y, b["ref"], impl="torch")
    parts = sum(bk.npo_loss(h[s], w, y[s], b["ref"][s], num_sequences=seqs, impl="torch")
                for s in (slice(0, 2), slice(2, 4)))
    torch.testing.assert_close(parts, whole, rtol=1e-10, atol=1e-12)


def test_sequence_log_probs_and_per_sequence_values():
    b = batch()
    h, w, y = b["hidden"], b["weight"], b["labels"]
    _, logp, ys, mask = shifted(h, w, y)
    want = (logp_of(logp, ys) * mask).sum(-1)
    torch.testing.assert_close(bk.sequence_logprob(h, w, y, impl="torch"), want)
    per = bk.npo_loss(h, w, y, b["ref"], beta=0.5, reduction="none", impl="torch")
    assert per.shape == (B,) and per[1] == 0  # the row without answer tokens
    torch.testing.assert_close(per[mask.any(-1)].mean(), bk.npo_loss(h, w, y, b["ref"], beta=0.5, impl="torch"))


def test_bss_mixes_any_base_on_targets_and_beliefs():
    b, bel = batch(0), batch(1)
    targets = dict(hidden=b["hidden"], weight=b["weight"], labels=b["labels"])
    beliefs = dict(hidden=bel["hidden"], weight=b["weight"], labels=bel["labels"])
    got = bk.bss_loss(bk.bst_loss, targets, beliefs, lam=0.3, topk=5, impl="torch")
    want = 0.7 * bk.bst_loss(**targets, topk=5, impl="torch") + 0.3 * bk.bst_loss(**beliefs, topk=5, impl="torch")
    torch.testing.assert_close(got, want)
    npo = bk.bss_loss(bk.npo_loss, {**targets, "ref_logprob": b["ref"]}, {**beliefs, "ref_logprob": bel["ref"]},
                      impl="torch")
    torch.testing.assert_close(npo, 0.5 * bk.npo_loss(**targets, ref_logprob=b["ref"], impl="torch")
                               + 0.5 * bk.npo_loss(**beliefs, ref_logprob=bel["ref"], impl="torch"))


def test_activation_mse_is_rmus_per_sequence_mean():
    g = torch.Generator().manual_seed(0)
    act, target = torch.randn(3, 5, 8, generator=g), torch.randn(8, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]]).bool()
    per = [((act[i][mask[i]] - target) ** 2).mean() for i in (0, 2)]
    torch.testing.assert_close(bk.activation_mse(act, target, mask), torch.stack(per).mean())


def test_bad_arguments_are_refused_by_name():
    b = batch()
    h, w, y = b["hidden"], b["weight"], b["labels"]
    with pytest.raises(ValueError, match="reduction must be one of"):
        bk.ga_loss(h, w, y, reduction="mean", impl="torch")
    with pytest.raises(ValueError, match="reduction must be one of"):
        bk.npo_loss(h, w, y, b["ref"], reduction="token", impl="torch")
    with pytest.raises(ValueError, match=r"ref_logprob must be a tensor of shape \(4,\)"):
        bk.npo_loss(h, w, y, b["ref"][:3], impl="torch")
    with pytest.raises(ValueError, match="not a multiple of the 4 forget rows"):
        bk.dpo_loss(h, w, y, b["ref"], b["win_hidden"][:3], b["win_labels"][:3], b["win_ref"][:3], impl="torch")
    with pytest.raises(ValueError, match="positions must be one of"):
        bk.undial_loss(h, w, y, b["t_hidden"], b["t_weight"], positions="prompt", impl="torch")
    with pytest.raises(ValueError, match="teacher_hidden must have the leading dims"):
        bk.kl_loss(h, w, y, b["t_hidden"][:2], b["t_weight"], impl="torch")
    with pytest.raises(ValueError, match="impl must be"):
        bk.ga_loss(h, w, y, impl="cuda")
    with pytest.raises(ValueError, match="shift must be a bool or an int"):
        bk.ga_loss(h, w, y, shift=1.5, impl="torch")
    with pytest.raises(ValueError, match="lam must lie in"):
        bk.bss_loss(bk.ga_loss, {}, {}, lam=2.0)


# ---- what the peers' test suites found --------------------------------------------------------------------------


def test_shift_k_predicts_k_tokens_ahead_and_non_int_shifts_are_refused():
    """Cut Cross-Entropy's ``shift=k``: position t scores labels[t + k]; shift=2 was read as 1 (any truthy value)."""
    b = batch()
    h, w, y = b["hidden"], b["weight"], b["labels"]
    for k in (0, 1, 2, 3):
        got = bk.linear_cross_entropy(h, w, y, shift=k, impl="torch")
        z, yk = (h @ w.T)[:, :T - k], y[:, k:]
        torch.testing.assert_close(got, F.cross_entropy(z.reshape(-1, V), yk.reshape(-1), ignore_index=IGNORE))
    assert torch.equal(bk.linear_cross_entropy(h, w, y, shift=True, impl="torch"),
                       bk.linear_cross_entropy(h, w, y, shift=1, impl="torch"))
    for bad in (2.0, -1, "1", None):
        with pytest.raises(ValueError, match="shift must be a bool or an int >= 0"):
            bk.linear_cross_entropy(h, w, y, shift=bad, impl="torch")


def test_bf16_mean_is_not_rounded_into_the_dw_operand(monkeypatch):
    """With bf16 GEMMs on the torch path (as on CUDA and AMX CPUs), reduction="mean" must not fold -1/n into the bf16
    hidden operand of the dW GEMM: that rounds every element once more, and where dW's sums cancel (one-hot
    softmax at logits of magnitude 1e4, near-equal hidden rows) single entries came out 3.9% off at this shape where
    PyTorch's own bf16 is 0.53% off. The chunk is now scaled in float32 and rounded once, as PyTorch's own backward
    rounds its dL/dz: ours must stay within 1.25x PyTorch's own bf16 error of the float64 truth."""
    monkeypatch.setattr(torch_path, "gemm_dtype", lambda dtype, device: dtype)
    g = torch.Generator().manual_seed(0)
    n, k, r = 300, 8, 16
    a = torch.randint(0, k, (n,), generator=g)
    h = torch.cat([F.one_hot(a, k).float(), 1.0 + 0.01 * torch.randn(n, r, generator=g)], 1)
    w = torch.zeros(64, k + r)
    w[:k, :k] = 1e4 * torch.eye(k)  # logits 0 or 1e4, exact in bf16: the softmax is one-hot in every dtype
    h, w = h.bfloat16(), w.bfloat16()
    y = torch.randint(0, k, (n,), generator=g)
    y[::9] = IGNORE

    def dw(fn, h, w):
        w = w.clone().requires_grad_()
        fn(h, w).backward()
        return w.grad.double()

    truth = dw(lambda h, w: F.cross_entropy(h @ w.T, y), h.double(), w.double())
    torch_bf16 = dw(lambda h, w: F.cross_entropy(h @ w.T, y), h, w)
    got = dw(lambda h, w: bk.linear_cross_entropy(h, w, y, impl="torch", chunk_size=512), h, w)
    big = truth.abs() > 1e-3 * truth.abs().max()

    def max_rel(x):
        return float(((x - truth).abs()[big] / truth.abs()[big]).max())

    assert max_rel(got) <= 1.25 * max_rel(torch_bf16), (max_rel(got), max_rel(torch_bf16))
