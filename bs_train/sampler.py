"""KV-cached batched belief sampler: N responses per prompt from the model being trained, near the bandwidth floor.

BS-S needs N samples ("beliefs") for every forget prompt, drawn by the *current* model, over and over during
training. Hugging Face ``generate`` re-allocates its cache each call, prefills every sample separately and syncs
with the host each token. This sampler, after gpt-fast:

* owns a static KV cache ``(P*N, H_kv, T_max, D)`` per layer, allocated once and reused across rounds;
* left-pads the prompts (right-padded or ragged input is repacked), prefills each prompt **once** and copies its
  cache into the rows of its N samples;
* decodes all rows together with per-row positions, per-row EOS and an early exit checked every ``sync_every``
  tokens (the only host syncs), temperature / top-k / top-p / greedy, and samples without a host sync by inverting
  each row's CDF at one uniform draw from an explicit ``torch.Generator``;
* eager (the CPU default), attends over the filled part of the cache only and pads each batch to its own longest
  prompt; grouped-query attention folds the query heads onto their kv head instead of repeating K/V;
* on the CPU, runs each round's GEMMs from a ``CpuPlan``: the weights packed once per round for oneDNN, q/k/v and
  gate/up fused into one GEMM each, in ``bs_kernels``' CPU GEMM dtype (bf16 weights as fp32 GEMMs where the CPU has
  no bf16 instructions and would emulate them);
* on CUDA, captures the decode step with CUDA graphs (``torch.compile(mode="reduce-overhead")``) over the whole
  static cache, one fixed shape; on the CPU compiling is opt-in (``compile_decode=True``), see the benchmarks;
* under FSDP2, all-gathers the parameters once per round (``unshard``) and reshards after, never per token.

It runs the model's own submodules (projections, norms, MLP, rotary embedding, the head with its logit transform)
wired as the family wires them (``decoder.py``): Llama, Mistral, Qwen2/3, Gemma-1/2/3, Phi-3, OLMo-2, GPT-NeoX and
Qwen3-MoE, with sliding windows, soft-capped attention and per-head q/k norms; ``check_supported`` refuses anything
else (``generation.generate`` then uses HF ``generate``). Returned log-probs are those of the sampled tokens under
the model's unmodified distribution (temperature 1, no truncation), which is what belief likelihoods and the
squeezing monitor need.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from bs_kernels.torch_path import gemm_dtype

from .decoder import CpuPlan, Runner, layout


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. ``temperature=0`` is greedy."""

    n: int = 3
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    sync_every: int = 16  # check "all rows finished" every this many tokens (a host sync)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.sync_every}")


@dataclass
class Samples:
    """``tokens`` [P, N, T] (``pad_id`` after the end), ``logprobs`` [P, N, T] (0 after the end), ``lengths`` [P, N]
    (generated tokens, the EOS included when one was produced)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor

    def sequences(self) -> list[list[list[int]]]:
        """Python lists of generated ids per prompt and sample, cut at their lengths."""
        toks, lens = self.tokens.tolist(), self.lengths.tolist()
        return [[row[:n] for row, n in zip(tp, lp)] for tp, lp in zip(toks, lens)]


def check_supported(model) -> None:
    """Raise ValueError (naming why) unless the sampler can drive ``model``: a family of ``decoder.FAMILIES``."""
    layout(model)


def _pick(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from fp32 logits [B, V]: greedy, or temperature / top-k / top-p sampling, no host sync.

    Sampling inverts each row's CDF at one uniform draw (``searchsorted``): B random numbers per step. The
    exponential race of gpt-fast, ``argmax(probs / Exponential(1))``, draws B*V of them: on the CPU, at SmolLM2's
    vocabulary, a third of the time of one decoder layer's GEMMs (profiled at 24 rows). A token of probability 0 is
    never drawn: the first CDF entry above the draw always has a positive step."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    z = logits if cfg.temperature == 1 else logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(z, min(cfg.top_k, z.shape[-1]), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        cum = torch.softmax(sorted_z, -1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_z, -1)) >= cfg.top_p  # keep the smallest set reaching top_p
        z = z.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    cdf = torch.softmax(z, -1).cumsum_(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=gen) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max_(cdf.shape[-1] - 1)


def _fsdp_modules(model) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered_parameters(model):
    """Under FSDP2, all-gather every shard once for the whole sampling round, then reshard; else a no-op.

    Re-entrant: a nested call (the sampler inside ``draw_beliefs``' round) neither gathers again nor reshards early;
    an early reshard would make every later chunk re-gather, a collective whose count then differs across ranks."""
    fsdp = _fsdp_modules(model)
    fresh = [m for m in fsdp if getattr(m, "_bs_gather_depth", 0) == 0]
    for m in fsdp:
        m._bs_gather_depth = getattr(m, "_bs_gather_depth", 0) + 1
    for m in fresh:
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp:
            m._bs_gather_depth -= 1
        for m in fresh:
            m.reshard()


def _left_pad(prompts: list[list[int]], pad_id: int, device, width: int | None = None):
    """(ids [P, width] left-padded, pad counts [P]) on ``device``."""
    length = max(len(p) for p in prompts) if width is None else width
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
    pads = torch.tensor([length - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), pads.to(device)


PROMPT_BUCKET = 64  # prompt widths are rounded up to this, so rounds with similar prompts share one decode graph


class Sampler:
    """A reusable sampler with fixed shapes: up to ``max_prompts`` prompts of up to ``prompt_width`` tokens.

    Fixed shapes mean one static KV cache and one compiled decode step (one CUDA graph on CUDA), reused by every
    call: shorter prompts are left-padded to the (bucketed) width, and a smaller batch of prompts is padded with
    copies of its first prompt whose samples are dropped. ``sample`` is the one-off form.
    """

    def __init__(self, model, cfg: SamplingConfig, *, max_prompts: int, prompt_width: int, eos_id: int, pad_id: int,
                 compile_decode: bool | None = None):
        if max_prompts < 1 or prompt_width < 1:
            raise ValueError(f"max_prompts and prompt_width must be >= 1, got {max_prompts}, {prompt_width}")
        check_supported(model)  # before any work: a family the sampler cannot drive fails here, in one line
        self.model, self.cfg, self.eos_id, self.pad_id = model, cfg, eos_id, pad_id
        self.max_prompts = max_prompts
        self.width = -(-prompt_width // PROMPT_BUCKET) * PROMPT_BUCKET
        self.device = model.get_output_embeddings().weight.device
        self.compile_decode = self.device.type == "cuda" if compile_decode is None else compile_decode
        self._runner: Runner | None = None
        self._plan: CpuPlan | None = None  # this round's CPU GEMM weights (None: the model's own layers)
        self._step = None
        self.generator: torch.Generator | None = None

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], generator: torch.Generator | None = None) -> Samples:
        self.generator = generator
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must hold at least one token")
        if len(prompts) > self.max_prompts:
            raise ValueError(f"{len(prompts)} prompts exceed this sampler's max_prompts={self.max_prompts}")
        if any(len(p) > self.width for p in prompts):
            raise ValueError(f"a prompt of {max(map(len, prompts))} tokens exceeds prompt_width={self.width}")
        was_training = self.model.training
        self.model.eval()
        try:
            with gathered_parameters(self.model):
                padded = list(prompts) + [prompts[0]] * (self.max_prompts - len(prompts)) if prompts else []
                self._plan = self._round_plan()
                # the plan's GEMMs run in its own dtype: autocast would recast every operand at every call
                with torch.autocast("cpu", enabled=False) if self._plan is not None else nullcontext():
                    out = self._sample(padded)
        finally:
            self._plan = None  # its weight copies are stale once training steps
            self.model.train(was_training)
        p = len(prompts)
        return Samples(out.tokens[:p], out.logprobs[:p], out.lengths[:p])

    def _compute_dtype(self) -> torch.dtype:
        dev = self.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else next(self.model.parameters()).dtype

    def _round_plan(self) -> CpuPlan | None:
        """A ``CpuPlan`` on the CPU, eager, for a model of plain ``nn.Linear`` projections outside FSDP; else None."""
        if self.device.type != "cpu" or self.compile_decode or _fsdp_modules(self.model) or \
                not CpuPlan.applies(self.model):
            return None
        return CpuPlan(self.model, gemm_dtype(self._compute_dtype(), self.device), self.max_prompts * self.cfg.n)

    def _ensure_runner(self):
        # the cache lives in the dtype attention computes in: under autocast (fp32 master weights, bf16 compute)
        # an fp32 cache would be converted for every layer at every step
        dtype = self._plan.dtype if self._plan is not None else self._compute_dtype()
        if self._runner is None or self._runner.k[0].dtype != dtype:
            rows = self.max_prompts * self.cfg.n
            self._runner = Runner(self.model, rows, self.width + self.cfg.max_new_tokens, self.device, dtype)
            self._step = None
        if self._step is None:
            self._step = self._decode
            if self.compile_decode:
                for buf in self._runner.k + self._runner.v:  # written in place: fixed addresses for CUDA graphs
                    torch._dynamo.mark_static_address(buf)
                self._step = torch.compile(self._decode, mode="reduce-overhead", dynamic=False)
        return self._runner

    def _decode(self, tok, write, row_pads, end: int | None = None):
        """One token per row written at cache slot ``write`` ([1], a device tensor); returns fp32 logits.

        Attention reads cache slots ``[:end]`` (``end`` a host int, the filled part) or, compiled (``end=None``),
        the whole cache under the mask: one fixed shape, so one graph for every step."""
        runner = self._runner
        end = runner.max_len if end is None else end
        slots = torch.arange(end, device=tok.device)
        pos = (write - row_pads)[:, None]
        valid = (slots[None] >= row_pads[:, None]) & (slots[None] <= write)
        # a sliding window of w tokens: keys within w - 1 positions before the query (transformers' rule)
        masks = {w: (valid if w is None else valid & (write - slots < w)[None])[:, None, None, :]
                 for w in runner.lay.windows}
        return runner.forward(tok[:, None], pos, write, masks, end=end, plan=self._plan)

    def _sample(self, prompts: list[list[int]]) -> Samples:
        cfg, device = self.cfg, self.device
        runner = self._ensure_runner()
        # compiled, every round pads to the one bucketed width (one graph); eager, to this batch's longest prompt, so
        # neither the prefill nor any decode step computes over padding it does not need
        ids, pads = _left_pad(prompts, self.pad_id, device, width=self.width if self.compile_decode else None)
        p, length = ids.shape
        rows = p * cfg.n
        row_of = torch.arange(p, device=device).repeat_interleave(cfg.n)
        slots = torch.arange(runner.max_len, device=device)

        # prefill each prompt once; causal within the prompt, padding keys masked; every position also sees itself,
        # so a left-pad query has one finite key (a fully masked row would put NaN keys/values in the cache, and
        # 0 * NaN poisons later attention even where masked)
        positions = (slots[None, :length] - pads[:, None]).clamp_min(0)
        key_ok = slots[None, :length] >= pads[:, None]
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=device)
        masks = {w: ((causal[None] & key_ok[:, None, :]) | eye[None])[:, None] if w is None else
                 ((causal.triu(1 - w)[None] & key_ok[:, None, :]) | eye[None])[:, None] for w in runner.lay.windows}
        logits = runner.forward(ids, positions, None, masks, rows=row_of, plan=self._plan)[row_of]

        row_pads = pads[row_of]
        tokens = torch.full((rows, cfg.max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(rows, cfg.max_new_tokens, dtype=torch.float32, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        for t in range(cfg.max_new_tokens):
            tok = _pick(logits, cfg, self.generator)
            lp = logits.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)  # no [B, V] copy
            live = ~finished
            tokens[:, t] = torch.where(live, tok, torch.full_like(tok, self.pad_id))
            logprobs[:, t] = torch.where(live, lp, torch.zeros_like(lp))
            lengths += live.long()
            finished |= tok == self.eos_id
            if t + 1 == cfg.max_new_tokens:
                break
            if (t + 1) % cfg.sync_every == 0 and bool(finished.all()):  # host sync every sync_every tokens only
                break
            write = slots[length + t:length + t + 1]  # a view of a device tensor: no host-to-device copy
            try:
                logits = self._step(tok, write, row_pads) if self.compile_decode else \
                    self._step(tok, write, row_pads, length + t + 1)
            except Exception as e:  # noqa: BLE001 - a compiler failure must not lose a training run
                if self._step == self._decode:
                    raise
                warnings.warn(f"compiled decode step failed ({type(e).__name__}: {e}); continuing in eager mode")
                self._step = self._decode
                logits = self._decode(tok, write, row_pads, length + t + 1)
        shape = (p, cfg.n, cfg.max_new_tokens)
        return Samples(tokens.view(shape), logprobs.view(shape), lengths.view(p, cfg.n))


@torch.no_grad()
def sample(model, prompts: list[list[int]], cfg: SamplingConfig, *, eos_id: int, pad_id: int,
           generator: torch.Generator | None = None, compile_decode: bool | None = None) -> Samples:
    """Draw ``cfg.n`` continuations of every prompt (token-id lists of any lengths) with ``model``.

    ``generator`` must live on the model's device; ``compile_decode`` (default: on CUDA) captures the decode step
    with CUDA graphs. The model's train/eval mode is restored afterwards. For repeated rounds, build one ``Sampler``
    and call it: its cache and compiled step are reused.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    s = Sampler(model, cfg, max_prompts=len(prompts), prompt_width=max(map(len, prompts)), eos_id=eos_id,
                pad_id=pad_id, compile_decode=compile_decode)
    return s(prompts, generator)


def prompts_from_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Token-id lists from a padded batch, left- or right-padded alike (the mask says which ids are real)."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must be the same [B, T] shape")
    return [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]


# Peak HBM bandwidth (bytes/s) by device name, for the "one read of the weights per decode step" floor.
HBM_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def bandwidth_floor_s(model, decode_steps: int) -> float | None:
    """Seconds to read every weight once per decode step on this GPU, or None off a GPU in ``HBM_BANDWIDTH``."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    bw = next((v for k, v in HBM_BANDWIDTH.items() if k in name), None)
    if bw is None:
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return decode_steps * weight_bytes / bw
