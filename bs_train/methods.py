"""Unlearning methods as small functions over the fused per-token scores of ``bs_kernels``.

Each method maps (model, forget batch, retain batch) to a loss that is *minimised*. Every loss here is a sum over
the micro-batch divided by a global count for the whole optimizer step (all micro-batches, all ranks: ``Norms``),
so gradient accumulation and FSDP2 (with its own gradient division switched off) give the gradient of one batch.

    finetune  NLL of the answers (mean over tokens).
    ga        gradient ascent: mean over sequences of the mean answer log-likelihood.
    graddiff  ga + alpha * retain term.
    npo       -(2/beta) log sigmoid(-beta (log pi(y|x) - log pi_ref(y|x))), log pi summed over answer tokens;
              reference log-probs precomputed once (``precompute_ref_logp``) so no second model is held.
    simnpo    -(2/beta) log sigmoid(-(beta/|y|) log pi(y|x) - delta): length-normalised, no reference.
    wga       ga with each token weighted by the detached p(y_i)^beta.
    bs_t      the BS-T forget loss: soft target (1 - lam) e_y + lam sg[q] over the model's top-k beliefs.
    bs_s      BS-S: (1 - lam_S) L(D_u) + lam_S L(D^_u), with L in {ga, npo, wga, bs_t} and D^_u the model's own
              sampled responses to each forget prompt (``beliefs.py``). With the NPO base, the beliefs' reference
              log-probs are the initial model's, as for the targets: round 1 is drawn by the initial model itself
              (its sampler log-probs serve), later rounds are scored by the frozen reference (``belief_ref_logp``).
    rmu       push the output activations of decoder layer l on the forget answers to c * u (u a fixed random
              unit vector) and keep them equal to the initial model's on the retain answers, training only
              mlp.down_proj of layers l-2..l by default (open-unlearning's RMU on TOFU: answer-token mask, mean
              over each sequence's answer tokens, then over sequences).
Retain terms (``method.retain``): ``nll`` on retain answers (mean over tokens), or ``kl``: KL(p_init || p_theta)
on retain answer tokens, computed in chunks under activation checkpointing so the logits are never all held.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import bs_kernels as bk

from .config import MethodConfig
from .model import LossHead

IGNORE = bk.IGNORE_INDEX


@dataclass
class Norms:
    """Global denominators for one optimizer step (0-d tensors; all-reduced across ranks by the trainer)."""

    forget_seqs: torch.Tensor
    forget_tokens: torch.Tensor
    retain_seqs: torch.Tensor
    retain_tokens: torch.Tensor
    belief_seqs: torch.Tensor
    belief_tokens: torch.Tensor

    def for_beliefs(self) -> Norms:
        """These norms with the belief counts in the forget slots, to run a base forget loss on beliefs."""
        return replace(self, forget_seqs=self.belief_seqs, forget_tokens=self.belief_tokens)


def local_counts(forget: dict | None, retain: dict | None, beliefs: dict | None = None) -> torch.Tensor:
    """[6] counts of one micro-batch in ``Norms`` field order (computed on the host from CPU batches); the trainer
    sums them over micro-batches and ranks."""
    out = []
    for batch in (forget, retain, beliefs):
        if batch is None:
            out += [0, 0]
            continue
        active = bk.shift_labels(batch["labels"], IGNORE) != IGNORE
        out += [int((active.sum(-1) > 0).sum()), int(active.sum())]
    return torch.tensor(out, dtype=torch.float64)


@dataclass
class MethodState:
    """Everything a method needs beyond the batch, built once before training."""

    cfg: MethodConfig
    impl: str
    ref_logp: torch.Tensor | None = None  # [n_forget] NPO reference log pi_ref(y|x), indexed by example
    reference: LossHead | None = None  # frozen initial model for the KL retain term and RMU
    rmu_direction: torch.Tensor | None = None  # [D] unit vector
    beliefs: object | None = None  # BS-S: the current beliefs.BeliefSet


def _cast(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring hidden states and head weight to one dtype: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        return hidden.to(dtype), weight.to(dtype)
    return hidden.to(weight.dtype), weight


def _flat(hidden, weight, labels):
    h, w = _cast(hidden, weight)
    y = bk.shift_labels(labels, IGNORE)
    return h.reshape(-1, h.shape[-1]), w, y


def _seq_weights(y: torch.Tensor, n_seqs: torch.Tensor) -> torch.Tensor:
    """Token weights of "mean over answer tokens per sequence, summed, divided by the global sequence count"."""
    active = (y != IGNORE).float()
    return (active / active.sum(-1, keepdim=True).clamp_min(1) / n_seqs).reshape(-1)


def _weighted(model, batch, st: MethodState, token_weights_fn, *, topk=0, lam=0.0):
    """sum_i w_i s_i on the fused three-GEMM path; ``token_weights_fn(y)`` builds the weights from shifted labels."""

    def fn(hidden, weight, _):
        h, w, y = _flat(hidden, weight, batch["labels"])
        loss, _ = bk.linear_weighted_score_sum(h, w, y.reshape(-1), token_weights_fn(y).to(h.device),
                                               topk=topk, lam=lam, impl=st.impl)
        return loss

    return model(batch["input_ids"], batch["attention_mask"], fn)


def _seq_scores(model, batch, st: MethodState):
    """Per-token log p(y_i) [B, T-shifted] (recompute path: any upstream gradient) and the answer mask."""

    def fn(hidden, weight, _):
        h, w, y = _flat(hidden, weight, batch["labels"])
        s = bk.linear_token_scores(h, w, y.reshape(-1), impl=st.impl).view(y.shape)
        return s, y != IGNORE

    return model(batch["input_ids"], batch["attention_mask"], fn)


# ---- forget losses -------------------------------------------------------------------------------------------


def finetune_loss(model, batch, st, n: Norms):
    return _weighted(model, batch, st, lambda y: -(y != IGNORE).float().reshape(-1) / n.forget_tokens)


def ga_loss(model, batch, st, n: Norms):
    return _weighted(model, batch, st, lambda y: _seq_weights(y, n.forget_seqs))


def bst_loss(model, batch, st, n: Norms):
    return _weighted(model, batch, st, lambda y: _seq_weights(y, n.forget_seqs), topk=st.cfg.bst_topk,
                     lam=st.cfg.bst_lam)


def npo_loss(model, batch, st, n: Norms):
    s, mask = _seq_scores(model, batch, st)
    logp = (s * mask).sum(-1)
    ref = st.ref_logp.to(logp.device)[batch["index"]]
    beta = st.cfg.npo_beta
    keep = mask.any(-1)
    return (-(2.0 / beta) * F.logsigmoid(-beta * (logp - ref)) * keep).sum() / n.forget_seqs


def simnpo_loss(model, batch, st, n: Norms):
    s, mask = _seq_scores(model, batch, st)
    mean_logp = (s * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    beta, delta = st.cfg.simnpo_beta, st.cfg.simnpo_delta
    keep = mask.any(-1)
    return (-(2.0 / beta) * F.logsigmoid(-beta * mean_logp - delta) * keep).sum() / n.forget_seqs


def wga_loss(model, batch, st, n: Norms):
    s, mask = _seq_scores(model, batch, st)
    w = torch.exp(st.cfg.wga_beta * s).detach() * mask
    per_seq = (w * s).sum(-1) / mask.sum(-1).clamp_min(1)
    return per_seq.sum() / n.forget_seqs


def _answer_mse(act: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, n_seqs: torch.Tensor):
    """RMU's activation loss: squared error averaged over the hidden dimension, then over each sequence's answer
    tokens (``labels != -100``, unshifted: the activations *of* the answer), summed over sequences / ``n_seqs``."""
    mask = (labels != IGNORE).float()
    sq = ((act.float() - target) ** 2).mean(-1)
    return ((sq * mask).sum(-1) / mask.sum(-1).clamp_min(1)).sum() / n_seqs


def rmu_forget(model, batch, st, n: Norms):
    target = (st.cfg.rmu_coeff * st.rmu_direction).float()

    def fn(_h, _w, act):
        return _answer_mse(act, target.to(act.device), batch["labels"], n.forget_seqs)

    return model(batch["input_ids"], batch["attention_mask"], fn, layer=st.cfg.rmu_layer)


BSS_BASES = {"ga": ga_loss, "npo": npo_loss, "wga": wga_loss, "bs_t": bst_loss}


def bss_loss(model, forget, st, n: Norms, beliefs: dict):
    """BS-S: (1 - lam_S) L(targets) + lam_S L(beliefs of the same prompts), L the configured base loss."""
    base, lam = BSS_BASES[st.cfg.bss_base], st.cfg.bss_lam
    on_targets = base(model, forget, st, n)
    on_beliefs = base(model, beliefs, replace(st, ref_logp=st.beliefs.ref_logp), n.for_beliefs())
    return (1.0 - lam) * on_targets + lam * on_beliefs


FORGET = {"finetune": finetune_loss, "ga": ga_loss, "graddiff": ga_loss, "npo": npo_loss, "simnpo": simnpo_loss,
          "wga": wga_loss, "bs_t": bst_loss, "rmu": rmu_forget}

# ---- retain terms ----------------------------------------------------------------------------------------------


def retain_nll(model, batch, st, n: Norms):
    return _weighted(model, batch, st, lambda y: -(y != IGNORE).float().reshape(-1) / n.retain_tokens)


def _kl_chunk(h, w, h_ref, w_ref, mask):
    logq = torch.log_softmax((h @ w.t()).float(), -1)
    logp = torch.log_softmax((h_ref @ w_ref.t()).float(), -1)
    return ((logp.exp() * (logp - logq)).sum(-1) * mask).sum()


def retain_kl(model, batch, st, n: Norms, chunk: int = 256):
    with torch.no_grad():
        ref = st.reference(batch["input_ids"], batch["attention_mask"], lambda h, w, _: (h, w))

    def fn(hidden, weight, _):
        h, w, y = _flat(hidden, weight, batch["labels"])
        mask = (y.reshape(-1) != IGNORE).float()  # a weight, not a row selection: nonzero() would sync the host
        h_ref = ref[0].reshape(-1, ref[0].shape[-1]).to(h.dtype)
        w_ref = ref[1].to(h.dtype)
        total = h.new_zeros((), dtype=torch.float32)
        for c0 in range(0, h.shape[0], chunk):  # checkpointed: backward recomputes each chunk's logits
            c1 = c0 + chunk
            total = total + checkpoint(_kl_chunk, h[c0:c1], w, h_ref[c0:c1], w_ref, mask[c0:c1],
                                       use_reentrant=False)
        return total / n.retain_tokens

    return model(batch["input_ids"], batch["attention_mask"], fn)


def rmu_retain(model, batch, st, n: Norms):
    layer = st.cfg.rmu_layer
    with torch.no_grad():
        ref_act = st.reference(batch["input_ids"], batch["attention_mask"], lambda h, w, a: a, layer=layer)

    def fn(_h, _w, act):
        return _answer_mse(act, ref_act.float(), batch["labels"], n.retain_seqs)

    return model(batch["input_ids"], batch["attention_mask"], fn, layer=layer)


def method_loss(model, forget: dict, retain: dict | None, st: MethodState, n: Norms, beliefs: dict | None = None):
    """``(loss, {"forget": ..., "retain": ...})`` for one micro-batch; loss = gamma * forget + alpha * retain.

    ``beliefs`` (BS-S only) holds the beliefs of exactly the prompts in ``forget`` (``BeliefSet.batch``)."""
    cfg = st.cfg
    if cfg.name == "bs_s":
        if beliefs is None:
            raise ValueError("method bs_s needs the belief batch of its forget batch")
        forget_term = bss_loss(model, forget, st, n, beliefs)
    else:
        forget_term = FORGET[cfg.name](model, forget, st, n)
    retain_term = forget_term.new_zeros(())
    if retain is not None and cfg.name not in ("finetune", "ga"):
        if cfg.name == "rmu":
            retain_term = rmu_retain(model, retain, st, n)
        elif cfg.retain == "nll":
            retain_term = retain_nll(model, retain, st, n)
        elif cfg.retain == "kl":
            retain_term = retain_kl(model, retain, st, n)
    gamma = 1.0 if cfg.name == "finetune" else cfg.gamma
    loss = gamma * forget_term + cfg.alpha * retain_term
    return loss, {"forget": forget_term.detach(), "retain": retain_term.detach()}


def needs_retain(cfg: MethodConfig) -> bool:
    return cfg.name == "rmu" or (cfg.name not in ("finetune", "ga") and cfg.retain != "none")


def needs_ref_logp(cfg: MethodConfig) -> bool:
    return cfg.name == "npo" or (cfg.name == "bs_s" and cfg.bss_base == "npo")


def needs_reference(cfg: MethodConfig) -> bool:
    """KL retain and RMU compare with the initial model; so does BS-S's NPO base on beliefs drawn after round 1."""
    bss_npo_rounds = cfg.name == "bs_s" and cfg.bss_base == "npo" and cfg.bss_regen != "never"
    return cfg.name == "rmu" or (needs_retain(cfg) and cfg.retain == "kl") or bss_npo_rounds


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
    st = MethodState(MethodConfig(name="npo"), impl)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        s, mask = _seq_scores(model, batch, st)
        out[batch["index"].cpu()] = (s * mask).sum(-1).float().cpu()
    return out
