"""Unlearning methods, each a call of its loss in ``bs_kernels.unlearning`` (the one implementation, the one another
codebase imports), and the method table.

Each method maps (model, forget batch, retain batch) to a loss that is *minimised*. Every loss here is a sum over
the micro-batch divided by a global count for the whole optimizer step (all micro-batches, all ranks: ``Norms``),
so gradient accumulation and FSDP2 (with its own gradient division switched off) give the gradient of one batch.

    finetune  NLL of the answers (mean over tokens).
    ga        gradient ascent: mean over sequences of the mean answer log-likelihood (``method.reduction=sequence``),
              or one mean over the step's answer tokens (``token``: open-unlearning's ``-model(**forget).loss``).
    graddiff  ga + alpha * retain term.
    npo       -(2/beta) log sigmoid(-beta (log pi(y|x) - log pi_ref(y|x))), log pi summed over answer tokens;
              reference log-probs precomputed once (``precompute_ref_logp``) so no second model is held.
    simnpo    -(2/beta) log sigmoid(-(beta/|y|) log pi(y|x) - delta): length-normalised, no reference.
    wga       ga with each token weighted by the detached p(y_i)^beta (``method.reduction`` as for ga).
    bs_t      the BS-T forget loss: soft target (1 - lam) e_y + lam sg[q] over the model's top-k beliefs.
    bs_s      BS-S: (1 - lam_S) L(D_u) + lam_S L(D^_u), with L in {ga, npo, wga, bs_t} and D^_u the model's own
              sampled responses to each forget prompt (``beliefs.py``). With the NPO base, the beliefs' reference
              log-probs are the initial model's, as for the targets: round 1 is drawn by the initial model itself
              (its sampler log-probs serve), later rounds are scored by the frozen reference (``belief_ref_logp``).
    dpo       IdkDPO: -(2/beta) log sigmoid(beta ((log pi(w|x) - log pi_ref(w|x)) - (log pi(y|x) - log pi_ref(y|x)))),
              w an "I don't know" answer (``refusals.py``) preferred over the forget answer y; both reference
              log-probs precomputed once (open-unlearning's DPO trainer on its idk data; Rafailov et al. 2023).
    undial    UNDIAL: soft-target CE to the initial model's distribution with the label's logit lowered by beta,
              mean over answer tokens (Dong et al. 2024), on the fused teacher KL: no logits held.
    ceu       CE-U: soft-target CE to the model's own detached distribution with the label's logit removed, mean
              over answer tokens but each answer's first n (Yang et al. 2025, arXiv:2503.01224).
    satimp    SatImp: mean over answer tokens of w_i log p(y_i), w_i = sg[p^beta1 (1 - p)^beta2] (Yang et al. 2025,
              arXiv:2505.11953).
    pdu       PDU: logit-margin flattening (max_v z_v - mean_v z_v)^2, mean over answer tokens, with the retain term a
              constraint retain <= eps: weighted by a dual variable lambda >= 0 stepped after every optimizer step
              (``after_step``: lambda <- max(0, lambda + eta (retain - eps))) (Entesari et al. 2025,
              arXiv:2506.05314; open-unlearning's ``pdu.py``). The max is taken over a chunked no-grad pass and
              differentiated through its argmax row, the mean through the mean of the lm_head rows: no logits held.
    altpo     AltPO: the dpo loss averaged over N alternates per forget prompt drawn once by the initial model with
              the belief sampler (Mekala et al. 2024, arXiv:2409.13474; open-unlearning's community AltPO runs the
              DPO trainer on such alternates; theirs are prompted for a different answer, ours are plain samples).
    rmu       push the output activations of decoder layer l on the forget answers to c * u (u a fixed random
              unit vector) and keep them equal to the initial model's on the retain answers (answer-token mask,
              mean over each sequence's answer tokens, then over sequences), training every parameter by default
              (open-unlearning's configs/trainer/RMU.yaml: ``trainable_params_regex: .*``) or, with
              ``rmu_params=down_proj``, mlp.down_proj of layers l-2..l (WMDP's choice, RMU.py's class default).
Retain terms (``method.retain``): ``nll`` on retain answers (mean over tokens), or ``kl``: KL(p_init || p_theta)
on retain answer tokens (``method.kl_positions=answer``) or on every one of the B x T positions, prompt and padding
included (``all``: open-unlearning's ``compute_kl_divergence``, ``kl_div(..., reduction="batchmean")`` over the
flattened logits), on ``bs_kernels.linear_weighted_teacher_kl_sum`` so neither model's logits are all held.

Each option is a change of the token weights over the same fused scores: ``reduction=token`` divides every answer
token's score by the step's answer-token count instead of its sequence's count times the sequence count, and
``kl_positions=all`` sets the KL weight of every position to 1 / (the step's B x T positions). The reference divides
by its micro-batch's counts and averages micro-batches; ours divides by the whole step's (``Norms``), the same number
when an optimizer step is one micro-batch.

``PRESETS`` holds the config overrides of each preset (``open-unlearning``: the reference's run, every method's loss
that of the reference trainers, open-unlearning ``src/trainer/unlearn/*.py`` and, for BS-T / BS-S, the authors' fork
kemoulee/open-unlearning branch dev, and the training arguments of its TOFU experiment); the per-method part is the
row's ``open_unlearning`` field.

``METHODS`` at the end is the method table: every method is declared there once, as one ``Method`` row naming its
forget loss (``forget_*``), its retain term (none, the configured ``retain_*`` or its own), and what it needs: NPO
reference log-probs, a frozen reference model, beliefs or fixed alternate answers, a dual variable with its
after-step hook, a setup hook, and whether the recipe and the demo run it.
``method_loss``, the ``needs_*`` predicates, config validation, the recipe, the demo and the trainer all read it,
so adding a method is one function, one row and its config fields. This module imports nothing of the config, so
the config can import the table.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

import bs_kernels as bk

from .beliefs import BeliefSet
from ..data import encode_prompt, encode_qa
from ..lora import has_adapters, rmu_adapters
from .base import (MethodState, Norms, answer_rows, local_counts, on_head,  # noqa: F401
                          sequence_logprob)
from ..model import LossHead
from .refusals import refusal_for

# ---- forget losses: forget_<method>(model, forget batch, state, norms) -----------------------------------------
# Each is one of bs_kernels.unlearning's pure functions on the model's hidden states and head, with the step's global
# counts as its denominators (one implementation: the one another codebase imports).


def forget_nll(model, batch, st, n: Norms):
    return on_head(model, batch, lambda h, w, _: bk.nll_loss(h, w, batch["labels"], num_tokens=n.forget_tokens,
                                                             impl=st.impl))


def _counts(n: Norms) -> dict:
    return {"num_tokens": n.forget_tokens, "num_sequences": n.forget_seqs}


def forget_ga(model, batch, st, n: Norms):
    return on_head(model, batch, lambda h, w, _: bk.ga_loss(h, w, batch["labels"], reduction=st.cfg.reduction,
                                                            impl=st.impl, **_counts(n)))


def forget_bst(model, batch, st, n: Norms):
    return on_head(model, batch, lambda h, w, _: bk.bst_loss(h, w, batch["labels"], lam=st.cfg.bst_lam,
                                                             topk=st.cfg.bst_topk, reduction=st.cfg.reduction,
                                                             impl=st.impl, **_counts(n)))


def forget_npo(model, batch, st, n: Norms):
    def fn(h, w, _):
        ref = st.ref_logp.to(device=h.device)[batch["index"]]
        return bk.npo_loss(h, w, batch["labels"], ref, beta=st.cfg.npo_beta, num_sequences=n.forget_seqs,
                           impl=st.impl)

    return on_head(model, batch, fn)


def forget_simnpo(model, batch, st, n: Norms):
    return on_head(model, batch, lambda h, w, _: bk.simnpo_loss(h, w, batch["labels"], beta=st.cfg.simnpo_beta,
                                                                delta=st.cfg.simnpo_delta,
                                                                num_sequences=n.forget_seqs, impl=st.impl))


def forget_wga(model, batch, st, n: Norms):
    return on_head(model, batch, lambda h, w, _: bk.wga_loss(h, w, batch["labels"], beta=st.cfg.wga_beta,
                                                             reduction=st.cfg.reduction, impl=st.impl, **_counts(n)))


def forget_satimp(model, batch, st, n: Norms):
    return on_head(model, batch, lambda h, w, _: bk.satimp_loss(h, w, batch["labels"], beta1=st.cfg.satimp_beta1,
                                                                beta2=st.cfg.satimp_beta2,
                                                                num_tokens=n.forget_tokens, impl=st.impl))


def forget_dpo(model, batch, st, n: Norms, alternates: dict | None = None):
    """DPO with the forget answer rejected and each of the example's alternate answers preferred (IdkDPO: one
    refusal; AltPO: N sampled answers, the loss averaged over them). ``alternates`` holds the same number of
    alternates for every row of ``batch``, grouped by row in the same order (``BeliefSet.batch``). Two model calls
    (the answers differ in length), combined by ``bs_kernels.preference_loss``."""
    if alternates is None:
        raise ValueError(f"method {st.cfg.name} needs the alternate-answer batch of its forget batch")
    lose = sequence_logprob(model, batch, st.impl)
    win = sequence_logprob(model, alternates, st.impl)
    lose_ratio = lose - st.ref_logp.to(lose.device)[batch["index"]]
    win_ratio = win - st.beliefs.ref_logp.to(win.device)[alternates["index"]]
    return bk.preference_loss(lose_ratio, win_ratio.view(lose.shape[0], -1), beta=st.cfg.dpo_beta,
                              keep=answer_rows(batch), num_sequences=n.forget_seqs)


def _reference_head(st: MethodState, batch: dict):
    """The frozen initial model's (hidden states, lm_head: an LMHead) on ``batch``, no grad."""
    with torch.no_grad():
        return st.reference(batch["input_ids"], batch["attention_mask"], lambda h, head, _: (h, head))


def forget_undial(model, batch, st, n: Norms):
    h_ref, w_ref = _reference_head(st, batch)
    every = st.cfg.undial_positions == "all"
    return on_head(model, batch, lambda h, w, _: bk.undial_loss(
        h, w, batch["labels"], h_ref, w_ref, beta=st.cfg.undial_beta, positions=st.cfg.undial_positions,
        num_tokens=n.forget_positions if every else n.forget_tokens, impl=st.impl))


def forget_ceu(model, batch, st, n: Norms):
    """CE-U over the kept tokens. Their global count is forget_tokens - k * forget_seqs, exact because every answer
    has at least k tokens (``ceu_ignore_first`` <= 2 and every answer is one token or more plus EOS)."""
    k = st.cfg.ceu_ignore_first
    kept = (n.forget_tokens - k * n.forget_seqs).clamp_min(1)
    return on_head(model, batch, lambda h, w, _: bk.ceu_loss(h, w, batch["labels"], ignore_first=k, num_tokens=kept,
                                                             impl=st.impl))


def forget_pdu(model, batch, st, n: Norms):
    """PDU's logit-margin flattening at the positions that predict answer tokens (``pdu_positions=predicting``) or at
    the answer tokens' own (``answer``: open-unlearning's pdu.py); the same count of answer tokens either way, since
    every label sits after a prompt."""
    shift = st.cfg.pdu_positions == "predicting"
    return on_head(model, batch, lambda h, w, _: bk.pdu_loss(h, w, batch["labels"], num_tokens=n.forget_tokens,
                                                             shift=shift))


def forget_rmu(model, batch, st, n: Norms):
    """RMU: the steered layer's output on the forget answers pushed to c u (``bs_kernels.activation_mse``)."""
    target = (st.cfg.rmu_coeff * st.rmu_direction).float()
    return on_head(model, batch, lambda _h, _w, act: bk.activation_mse(
        act, target.to(act.device), batch["labels"] != bk.IGNORE_INDEX, num_sequences=n.forget_seqs),
        layer=st.cfg.rmu_layer)


def forget_bss(model, batch, st, n: Norms, beliefs: dict | None = None):
    """BS-S: (1 - lam_S) L(targets) + lam_S L(beliefs of the same prompts) (``bs_kernels.bss_loss``), L the forget
    loss of the configured base (a table row with ``bss_base=True``). ``beliefs`` holds the beliefs of exactly the
    prompts in ``batch``."""
    if beliefs is None:
        raise ValueError(f"method {st.cfg.name} needs the belief batch of its forget batch")
    base = METHODS[st.cfg.bss_base].forget
    return bk.bss_loss(lambda **kw: base(model, **kw), dict(batch=batch, st=st, n=n),
                       dict(batch=beliefs, st=replace(st, ref_logp=st.beliefs.ref_logp), n=n.for_beliefs()),
                       lam=st.cfg.bss_lam)


# ---- retain terms: retain_<term>(model, retain batch, state, norms) --------------------------------------------


def retain_nll(model, batch, st, n: Norms):
    return on_head(model, batch, lambda h, w, _: bk.nll_loss(h, w, batch["labels"], num_tokens=n.retain_tokens,
                                                             impl=st.impl))


def retain_kl(model, batch, st, n: Norms):
    """KL(p_init || p_theta) over the retain answer tokens or every position (``kl_positions``), divided by the step's
    count of them (``bs_kernels.kl_loss``; teacher: the frozen reference's hidden states and lm_head)."""
    h_ref, w_ref = _reference_head(st, batch)
    every = st.cfg.kl_positions == "all"
    return on_head(model, batch, lambda h, w, _: bk.kl_loss(
        h, w, batch["labels"], h_ref, w_ref, positions=st.cfg.kl_positions,
        num_tokens=n.retain_positions if every else n.retain_tokens, impl=st.impl))


def retain_rmu(model, batch, st, n: Norms):
    layer = st.cfg.rmu_layer
    with torch.no_grad():
        ref_act = st.reference(batch["input_ids"], batch["attention_mask"], lambda h, w, a: a, layer=layer)
    return on_head(model, batch, lambda _h, _w, act: bk.activation_mse(
        act, ref_act.float(), batch["labels"] != bk.IGNORE_INDEX, num_sequences=n.retain_seqs), layer=layer)


RETAIN_TERMS: dict[str, Callable | None] = {"nll": retain_nll, "kl": retain_kl, "none": None}
"""The choices of ``method.retain`` for methods whose row takes the configured retain term."""

# ---- setup hooks: setup_<method>(state, lm, *, tokenizer, dataset, seed, device), run before the model moves ----


def rmu_trainable(lm: torch.nn.Module, method) -> list[str]:
    """Check ``method.rmu_layer`` against the model and, with ``rmu_params="down_proj"``, freeze every parameter but
    ``mlp.down_proj.weight`` of decoder layers l-2..l (WMDP's choice and open-unlearning RMU.py's class default; its
    TOFU config RMU.yaml trains all). With LoRA, the same choice over adapters: those of ``mlp.down_proj`` in
    layers l-2..l, or every adapter (``all``). Returns the names of the parameters left trainable."""
    n_layers, layer = lm.config.num_hidden_layers, method.rmu_layer
    # The last layer's output is only seen through the final norm (Hugging Face's hidden_states[-1] is normed).
    if layer > n_layers - 2:
        raise ValueError(f"method.rmu_layer={layer} but the model has {n_layers} decoder layers: steer one of "
                         f"0..{n_layers - 2}")
    layers = list(range(max(0, layer - 2), layer + 1))
    if has_adapters(lm):
        return rmu_adapters(lm, None if method.rmu_params == "all" else layers)
    if method.rmu_params == "all":
        return [name for name, _ in lm.named_parameters()]
    pattern = re.compile(rf"(.*\.)?layers\.({'|'.join(str(i) for i in range(max(0, layer - 2), layer + 1))})"
                         rf"\.mlp\.down_proj\.weight")
    keep = [name for name, _ in lm.named_parameters() if pattern.fullmatch(name)]
    if not keep:
        raise ValueError(f"method.rmu_params=down_proj: no parameter of this model matches {pattern.pattern!r}; "
                         "use method.rmu_params=all")
    for name, p in lm.named_parameters():
        p.requires_grad_(name in keep)
    return keep


def setup_rmu(st: MethodState, lm: torch.nn.Module, *, seed: int, device, **_) -> None:
    """RMU: the trainable parameters (``rmu_trainable``) and the fixed random unit direction u, drawn from ``seed``."""
    rmu_trainable(lm, st.cfg)
    u = torch.rand(lm.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    st.rmu_direction = (u / u.norm()).to(device)


def setup_dpo(st: MethodState, lm: torch.nn.Module, *, tokenizer, dataset, seed: int, **_) -> None:
    """IdkDPO: one refusal per forget example (``refusals.refusal_for``) as its preferred answer, held as a one-answer
    ``BeliefSet``; the initial model's log-probs of them are filled in before training (the trainer's
    ``prepare_method_state``)."""
    prompts, answers = [], []
    for i, ex in enumerate(dataset.examples):
        prompt = encode_prompt(tokenizer, ex["question"])
        enc = encode_qa(tokenizer, ex["question"], refusal_for(seed, i), max_length=len(prompt) + 1024)
        prompts.append(prompt)
        answers.append([enc["input_ids"][len(prompt):]])
    st.beliefs = BeliefSet(prompts, answers, [[0.0] for _ in prompts], round=0)


def setup_pdu(st: MethodState, lm: torch.nn.Module, *, device, **_) -> None:
    """PDU: the dual variable starts at ``method.alpha`` (open-unlearning's PDU: the retain preference)."""
    st.dual = torch.tensor(float(st.cfg.alpha), dtype=torch.float32, device=device)


def step_pdu(st: MethodState, retain: torch.Tensor, epoch: int) -> None:
    """After an optimizer step with global retain loss ``retain`` (0-d): lambda <- max(0, lambda + eta (retain -
    eps)), once ``pdu_dual_warmup_epochs`` epochs are over. On the device: no host sync."""
    if epoch >= st.cfg.pdu_dual_warmup_epochs:
        st.dual = (st.dual + st.cfg.pdu_dual_step * (retain.to(st.dual) - st.cfg.pdu_retain_eps)).clamp_min(0.0)


def setup_bss(st: MethodState, lm: torch.nn.Module, *, dataset, **_) -> None:
    """BS-S: every forget prompt, encoded once (a question's chat prompt, or a text window's first
    ``method.bss_prefix_tokens`` tokens: the dataset's ``prompts``); the beliefs are drawn for these
    (``beliefs.draw_beliefs``)."""
    st.prompts = dataset.prompts()


# ---- the method table ------------------------------------------------------------------------------------------

CONFIGURED = "configured"
"""``Method.retain`` value: the retain term named by ``method.retain`` (``RETAIN_TERMS``)."""


@dataclass(frozen=True)
class Method:
    """One row of the method table: what a method computes and what it needs."""

    forget: Callable
    """Forget loss ``forget_*(model, batch, state, norms)``, minimised."""
    retain: Callable | str | None = CONFIGURED
    """Retain term: ``CONFIGURED`` (``method.retain``: nll, kl or none), None (takes none), or its own ``retain_*``."""
    ref_logp: bool = False
    """Needs log pi_ref(y|x) of every forget example, precomputed once from the initial model."""
    reference: bool = False
    """Needs the frozen initial model in memory (beyond what its retain term and BS-S base need)."""
    beliefs: bool = False
    """Trains on the model's own sampled beliefs of every forget prompt (BS-S): the forget loss takes their batch."""
    alternates: bool = False
    """The forget loss takes alternate answers of every forget example (held in ``state.beliefs``): built by the
    setup hook, their initial-model log-probs computed once before training (IdkDPO), or sampled (below)."""
    sample_alternates: bool = False
    """The alternates are N answers drawn once, before the first step, by the initial model with the belief sampler
    (``method.bss_*`` sampling settings), their sampler log-probs the reference's (AltPO)."""
    bss_base: bool = False
    """May serve as BS-S's base forget loss (``method.bss_base``)."""
    dual: bool = False
    """The retain term is a constraint retain <= ``method.pdu_retain_eps``: it enters the loss as lambda (retain -
    eps) with lambda = ``state.dual`` instead of ``method.alpha`` (PDU)."""
    after_step: Callable | None = None
    """Hook ``step_*(state, retain, epoch)`` the trainer calls after every optimizer step with the step's global
    retain value (0-d, on the device) and the 0-based epoch (PDU's dual step); ``state.dual`` is checkpointed."""
    setup: Callable | None = None
    """Hook ``setup_*(state, lm, *, tokenizer, dataset, seed, device)`` run once on the CPU model, before it moves."""
    scaled: bool = True
    """The forget term is scaled by ``method.gamma`` (fine-tuning's NLL is the loss itself)."""
    command: str = "unlearn"
    """The run command the method belongs to: ``unlearn`` or ``finetune``."""
    terms: tuple[str, ...] = ("forget", "retain")
    """Names of the loss's parts in ``metrics.jsonl`` and the summary, in ``method_loss``'s order (forget, retain);
    fine-tuning has one part, its NLL on the train split, and no forget set to name it after."""
    recipe: bool = True
    """Run by the TOFU recipe by default."""
    demo: bool = False
    """Run by the offline demo by default."""
    open_unlearning: tuple[str, ...] = ()
    """Config overrides (``section.key=value``) under which this method's run is its reference trainer's, loss and
    training arguments, each with its source: the ``open-unlearning`` preset (``PRESETS``) applies them after the
    preset's common ones."""


# The open-unlearning preset's per-method settings. Sources: locuslab/open-unlearning (main, d3d7cf9)
# configs/trainer/<Trainer>.yaml and src/trainer/unlearn/*.py (GA, GradDiff and WGA take one token mean over the
# batch: ``-model(**forget).loss`` / ``compute_wga_loss``'s ``[mask].mean()``; UNDIAL.yaml alpha 0.0 and
# ``compute_undial_loss``'s mean over every position; SatImp.yaml gamma 0.1, alpha 1.0; pdu.py's margin at the answer
# tokens' own positions), community/methods/AltPO (generate.yaml ``repeats: 5``, ``temperature: 1.0``,
# ``max_new_tokens: 200``, sampled by HF ``generate`` with its default top_k=50 (top_p is whatever the checkpoint's
# generation_config.json holds; none is given); generate.py writes one row per alternate; run.sh trains 2 epochs at
# batch 8 x 4); the authors' fork kemoulee/open-unlearning (dev, 1c278ec) configs/trainer/{BST,BSS}.yaml and
# src/trainer/unlearn/{bst,bss}.py (BS-T: mean per sequence then over sequences; BS-S: GA with the batch token mean
# on targets and beliefs, beliefs drawn by HF ``generate(do_sample=True, top_p=None, max_new_tokens=200)``, i.e.
# generate's default top_k=50).
_TOKEN_MEAN = ("method.reduction=token",)
METHODS: dict[str, Method] = {
    "finetune": Method(forget_nll, retain=None, scaled=False, command="finetune", recipe=False, terms=("train_nll",)),
    "ga": Method(forget_ga, retain=None, bss_base=True, demo=True, open_unlearning=_TOKEN_MEAN),
    "graddiff": Method(forget_ga, open_unlearning=(*_TOKEN_MEAN, "method.gamma=1", "method.alpha=1")),
    "npo": Method(forget_npo, ref_logp=True, bss_base=True, demo=True,
                  open_unlearning=("method.npo_beta=0.1", "method.gamma=1", "method.alpha=1")),
    "simnpo": Method(forget_simnpo, open_unlearning=("method.simnpo_beta=4.5", "method.simnpo_delta=0",
                                                     "method.gamma=0.125", "method.alpha=1")),
    "rmu": Method(forget_rmu, retain=retain_rmu, reference=True, setup=setup_rmu,
                  open_unlearning=("method.rmu_coeff=2", "method.rmu_layer=7", "method.rmu_params=all",
                                   "method.gamma=1", "method.alpha=1")),
    "wga": Method(forget_wga, bss_base=True, open_unlearning=(*_TOKEN_MEAN, "method.wga_beta=1", "method.gamma=1",
                                                              "method.alpha=1")),
    "dpo": Method(forget_dpo, ref_logp=True, alternates=True, setup=setup_dpo,
                  open_unlearning=("method.dpo_beta=0.1", "method.gamma=1", "method.alpha=1")),
    "altpo": Method(forget_dpo, ref_logp=True, alternates=True, sample_alternates=True, setup=setup_bss,
                    open_unlearning=("method.dpo_beta=0.1", "method.gamma=1", "method.alpha=1",
                                     "method.bss_samples=5", "method.bss_temperature=1", "method.bss_top_k=50",
                                     "method.bss_top_p=1", "method.bss_max_new_tokens=200",
                                     "method.altpo_rows=alternate", "train.epochs=2")),
    # alpha 0 makes the retain term count for nothing; retain=none also skips computing it (the same loss)
    "undial": Method(forget_undial, reference=True,
                     open_unlearning=("method.undial_beta=10", "method.gamma=1", "method.alpha=0", "method.retain=none",
                                      "method.undial_positions=all")),
    "ceu": Method(forget_ceu, retain=None, open_unlearning=("method.ceu_ignore_first=1",)),
    "satimp": Method(forget_satimp, open_unlearning=("method.satimp_beta1=5", "method.satimp_beta2=1",
                                                     "method.gamma=0.1", "method.alpha=1")),
    "pdu": Method(forget_pdu, dual=True, after_step=step_pdu, setup=setup_pdu, recipe=False,
                  open_unlearning=("method.pdu_dual_step=1", "method.pdu_dual_warmup_epochs=5", "method.gamma=1",
                                   "method.alpha=1", "method.pdu_positions=answer")),
    "bs_t": Method(forget_bst, bss_base=True, demo=True,
                   open_unlearning=("method.reduction=sequence", "method.bst_lam=0.2", "method.bst_topk=20")),
    "bs_s": Method(forget_bss, beliefs=True, setup=setup_bss, demo=True,
                   open_unlearning=("method.bss_base=ga", *_TOKEN_MEAN, "method.bss_lam=0.5", "method.bss_samples=3",
                                    "method.bss_temperature=1", "method.bss_top_k=50", "method.bss_top_p=1",
                                    "method.bss_max_new_tokens=200", "method.bss_regen=epochs",
                                    "method.bss_regen_every=2")),
}
"""The method table: every method, declared once (see the module docstring)."""

# The reference's training arguments, as Hydra composes ``src/train.py --config-name=unlearn.yaml
# experiment=unlearn/tofu/default trainer=<Trainer>`` (locuslab/open-unlearning d3d7cf9, checked with hydra-core
# 1.3.8's compose for every trainer): configs/experiment/unlearn/tofu/default.yaml sets learning_rate 1e-5,
# num_train_epochs 10, weight_decay 0.01 and warmup_epochs 1.0, and being composed after the trainer's file it wins
# over WGA.yaml's and SatImp.yaml's 5 epochs, UNDIAL.yaml's lr 1e-4 and finetune.yaml's weight_decay 0.00 (those hold
# only without the TOFU experiment); configs/trainer/finetune.yaml sets per_device_train_batch_size 8,
# gradient_accumulation_steps 4, seed 0 and optim paged_adamw_32bit (AdamW's update); Hugging Face's
# TrainingArguments defaults give lr_scheduler_type linear (``hf_linear``: its warm-up starts at rate 0),
# max_grad_norm 1.0 and group_by_length False (a plain shuffle: no length buckets), and its Trainer exempts biases and
# norm weights from the decay (``decay_exempt=bias_norm``). Not set here: bf16 compute
# (finetune.yaml ``bf16: True``) is what ``train.mixed_precision=auto`` gives on a GPU, and the reference's bf16
# weights (configs/model/*.yaml ``torch_dtype: bfloat16``) stepped by a 32-bit AdamW, which drops updates below bf16's
# resolution, are left out: add model.dtype=bfloat16 to reproduce that too.
_OU_COMMON = ("train.batch_size=8", "train.grad_accum=4", "train.schedule=hf_linear", "train.max_grad_norm=1",
              "train.seed=0", "train.bucket_window=0", "train.optimizer=adamw", "train.decay_exempt=bias_norm")
# Fine-tuning (configs/experiment/finetune/tofu/default.yaml sets no training argument): finetune.yaml's lr 1e-5,
# 10 epochs and weight_decay 0.00, no warm-up (TrainingArguments' default).
_OU_FINETUNE = ("train.lr=1e-5", "train.epochs=10", "train.weight_decay=0", "train.warmup_steps=0",
                "train.warmup_epochs=0", *_OU_COMMON)
_OU_UNLEARN = ("train.lr=1e-5", "train.epochs=10", "train.weight_decay=0.01", "train.warmup_epochs=1", *_OU_COMMON)
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # per command; unlearning: open-unlearning's compute_kl_divergence over all B x T positions, its TOFU experiment's
    # training arguments
    "open-unlearning": {"unlearn": ("method.kl_positions=all", *_OU_UNLEARN), "finetune": _OU_FINETUNE},
}
"""Config presets: their overrides common to every method of a command; each method's own are its row's
``open_unlearning`` field."""


def preset_overrides(preset: str, method: str) -> list[str]:
    """The ``section.key=value`` overrides of ``preset`` for ``method``: those of its command, then the row's."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    if method not in METHODS:
        raise ValueError(f"method.name must be one of {tuple(METHODS)}, got {method!r}")
    return [*PRESETS[preset][METHODS[method].command], *METHODS[method].open_unlearning]


def method_for(command: str) -> str:
    """The one method of a command that has only one (``finetune``)."""
    return next(name for name, m in METHODS.items() if m.command == command)


def retain_term(cfg) -> Callable | None:
    """The retain term a method config trains with, or None."""
    retain = METHODS[cfg.name].retain
    return RETAIN_TERMS[cfg.retain] if retain == CONFIGURED else retain


def _base(cfg) -> Method | None:
    """The row of BS-S's base forget loss, for a method that trains on beliefs."""
    return METHODS[cfg.bss_base] if METHODS[cfg.name].beliefs else None


def method_loss(model, forget: dict, retain: dict | None, st: MethodState, n: Norms, beliefs: dict | None = None):
    """``(loss, {"forget": ..., "retain": ...})`` for one micro-batch; loss = gamma * forget + alpha * retain.

    ``beliefs`` (methods with ``beliefs=True`` or ``alternates=True``) holds the beliefs or alternate answers of
    exactly the prompts in ``forget`` (``BeliefSet.batch``)."""
    cfg = st.cfg
    row = METHODS[cfg.name]
    paired = row.beliefs or row.alternates
    forget_term = row.forget(model, forget, st, n, beliefs) if paired else row.forget(model, forget, st, n)
    term = retain_term(cfg)
    retain_value = term(model, retain, st, n) if term is not None and retain is not None else forget_term.new_zeros(())
    gamma = cfg.gamma if row.scaled else 1.0
    if row.dual:  # PDU: lambda (retain - eps), lambda the dual variable
        loss = gamma * forget_term + st.dual * (retain_value - cfg.pdu_retain_eps)
    else:
        loss = gamma * forget_term + cfg.alpha * retain_value
    return loss, {"forget": forget_term.detach(), "retain": retain_value.detach()}


def forget_copies(cfg) -> int:
    """How many rows each forget example fills: N for AltPO with ``altpo_rows=alternate`` (open-unlearning's one row
    per (example, alternate)), else 1."""
    return cfg.bss_samples if METHODS[cfg.name].sample_alternates and cfg.altpo_rows == "alternate" else 1


def belief_config(cfg):
    """The method config beliefs / alternates are drawn with: one per row when each example fills N rows
    (``forget_copies``), else ``bss_samples`` per prompt."""
    return replace(cfg, bss_samples=1) if forget_copies(cfg) > 1 else cfg


def needs_retain(cfg) -> bool:
    return retain_term(cfg) is not None


def needs_topk(cfg) -> bool:
    """The forget loss draws on the model's top-k beliefs (BS-T, or BS-S on a BS-T base): ``bst_topk`` must be at
    most the vocabulary size."""
    base = _base(cfg)
    return METHODS[cfg.name].forget is forget_bst or (base is not None and base.forget is forget_bst)


def needs_ref_logp(cfg) -> bool:
    base = _base(cfg)
    return METHODS[cfg.name].ref_logp or (base is not None and base.ref_logp)


def needs_belief_ref_logp(cfg) -> bool:
    """Beliefs need the initial model's log-probs when the BS-S base needs reference log-probs (NPO)."""
    base = _base(cfg)
    return base is not None and base.ref_logp


def needs_reference(cfg) -> bool:
    """KL retain and RMU compare with the initial model; so does BS-S's NPO base on beliefs drawn after round 1."""
    belief_rounds = needs_belief_ref_logp(cfg) and cfg.bss_regen != "never"
    return METHODS[cfg.name].reference or retain_term(cfg) is retain_kl or belief_rounds


def belief_ref_logp(reference: LossHead, beliefs, impl: str, pad_id: int, device,
                    prompts_per_batch: int = 8) -> list[list[float]]:
    """log pi_ref(belief | prompt), summed over the belief's tokens, of every belief: [n_forget][N].

    Every rank scores the whole set in the same batches, so an FSDP-sharded reference sees matching collectives."""
    n = len(beliefs.answers)
    batches = (beliefs.batch(list(range(i0, min(i0 + prompts_per_batch, n))), pad_id)
               for i0 in range(0, n, prompts_per_batch))  # "index" = the flat belief id
    return precompute_ref_logp(reference, batches, impl, n * beliefs.n, device).view(n, beliefs.n).tolist()


@torch.no_grad()
def precompute_ref_logp(model: LossHead, loader, impl: str, n_examples: int, device) -> torch.Tensor:
    """log pi_ref(y|x) (sum over answer tokens) of every example under the initial model, [n_examples]; ``loader``
    yields collated batches whose ``index`` is each row's example id."""
    out = torch.zeros(n_examples, dtype=torch.float32)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out[batch["index"].cpu()] = sequence_logprob(model, batch, impl).float().cpu()
    return out
