"""BS-S beliefs: N of the model's own responses for *every* forget prompt, stored with the prompt they belong to.

A known reference implementation regenerates beliefs only for the prompts of the current batch, so most prompts
train against stale beliefs of other prompts. Here ``draw_beliefs`` samples all forget prompts each round (sharded
across ranks, then gathered), and ``BeliefSet.batch(indices)`` returns exactly the beliefs of the forget examples
``indices``: belief ``j`` of forget example ``i`` has the flat id ``i * N + j``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from bs_kernels import IGNORE_INDEX

from ..data import collate
from ..sampler import Sampler, SamplingConfig, gathered_parameters


@dataclass
class BeliefSet:
    prompts: list[list[int]]  # [n_forget] prompt ids (chat template applied)
    answers: list[list[list[int]]]  # [n_forget][N] generated ids, the EOS included when produced
    logp: list[list[float]]  # [n_forget][N] summed log-prob of each belief: under the model that drew it,
    # replaced by the initial model's for NPO-base rounds after the first (``methods.belief_ref_logp``)
    round: int  # how many regenerations produced this set (1 = the first)

    @property
    def n(self) -> int:
        return len(self.answers[0])

    @property
    def ref_logp(self) -> torch.Tensor:
        """Flat [n_forget * N] ``logp``: the NPO base's reference on beliefs."""
        return torch.tensor([v for row in self.logp for v in row], dtype=torch.float32)

    def batch(self, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Every belief of the forget examples ``indices`` (answer-only labels), with ``index`` = flat belief id and
        ``owner`` = the forget example it belongs to."""
        items, owners = [], []
        for i in indices:
            for j, ans in enumerate(self.answers[i]):
                items.append({"input_ids": self.prompts[i] + ans, "labels": [IGNORE_INDEX] * len(self.prompts[i]) + ans,
                              "index": i * self.n + j})
                owners.append(i)
        out = collate(items, pad_id)
        out["owner"] = torch.tensor(owners, dtype=torch.long)
        return out

    def state_dict(self) -> dict:
        return {"prompts": self.prompts, "answers": self.answers, "logp": self.logp, "round": self.round}

    @classmethod
    def from_state_dict(cls, state: dict) -> BeliefSet:
        return cls(state["prompts"], state["answers"], state["logp"], int(state["round"]))


# ``cfg`` below is a ``config.MethodConfig``, not imported: the config imports the method table, which builds
# BeliefSets (IdkDPO's alternates).
def sampling_config(cfg: Any) -> SamplingConfig:
    return SamplingConfig(n=cfg.bss_samples, max_new_tokens=cfg.bss_max_new_tokens, temperature=cfg.bss_temperature,
                          top_k=cfg.bss_top_k, top_p=cfg.bss_top_p)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def belief_sampler(lm: torch.nn.Module, prompts: list[list[int]], cfg: Any, *, eos_id: int,
                   pad_id: int) -> Sampler:
    """One sampler for a whole run: shapes fixed by the longest forget prompt, so every round reuses its cache and
    compiled decode step."""
    return Sampler(lm, sampling_config(cfg), max_prompts=cfg.bss_prompts_per_round,
                   prompt_width=max(map(len, prompts)), eos_id=eos_id, pad_id=pad_id)


def draw_beliefs(root: torch.nn.Module, lm: torch.nn.Module, prompts: list[list[int]], cfg: Any, *,
                 eos_id: int, pad_id: int, seed: int, round_: int, rank: int = 0, world: int = 1,
                 sampler: Sampler | None = None) -> BeliefSet:
    """Sample N beliefs for every prompt with the current weights of ``lm`` (``root`` is the FSDP root holding it).

    Rank r samples prompts r, r + world, ...; the pieces are gathered so every rank holds the whole set. The
    parameters are all-gathered once for the round, not per token or per chunk. Pass the run's ``sampler``
    (``belief_sampler``) to reuse its cache and compiled step across rounds.
    """
    sampler = sampler or belief_sampler(lm, prompts, cfg, eos_id=eos_id, pad_id=pad_id)
    device = lm.get_output_embeddings().weight.device
    mine = list(range(rank, len(prompts), world))
    gen = torch.Generator(device=device).manual_seed(_seed(seed, "beliefs", round_, rank))
    answers: dict[int, list[list[int]]] = {}
    logp: dict[int, list[float]] = {}
    with gathered_parameters(root):
        for c0 in range(0, len(mine), cfg.bss_prompts_per_round):
            chunk = mine[c0:c0 + cfg.bss_prompts_per_round]
            out = sampler([prompts[i] for i in chunk], gen)
            sums = out.logprobs.sum(-1).tolist()
            for k, (i, seqs) in enumerate(zip(chunk, out.sequences())):
                answers[i], logp[i] = seqs, sums[k]
    if world > 1:
        pieces: list = [None] * world
        dist.all_gather_object(pieces, (answers, logp))
        for a, lp in pieces:
            answers.update(a)
            logp.update(lp)
    order = range(len(prompts))
    return BeliefSet(prompts, [answers[i] for i in order], [logp[i] for i in order], round_)
