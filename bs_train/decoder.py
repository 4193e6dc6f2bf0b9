"""A Hugging Face decoder's forward over a static KV cache, run from the model's own submodules: the belief
sampler's engine (``sampler.py``), for every family of ``FAMILIES``.

The sampler cannot call a decoder block's ``forward``: under FSDP2 every block call all-gathers that block's shards,
once per token, and ranks that decode different numbers of tokens would then disagree on their collectives. It calls
the modules *inside* the blocks instead (projections, norms, MLP, rotary embedding, the embedding and the final
norm), whose parameters the round has gathered once (``gathered_parameters``), so what differs between families is
only how they are wired. ``layout`` reads that once per model (``Layout``, one ``LayerLayout`` per block):

* q/k/v: separate projections (Llama), one fused ``qkv_proj`` split as [q | k | v] (Phi-3), or GPT-NeoX's
  ``query_key_value`` laid out per head as [q_h, k_h, v_h];
* q/k norms: per head after the split (Qwen3, Gemma-3) or over all heads before it (OLMo-2);
* rotary: one table, or one per layer type (Gemma-3's local and global bases); partial rotary (GPT-NeoX, Phi-3 with
  ``partial_rotary_factor < 1``) rotates the first ``cos.shape[-1]`` dims of each head, as transformers does;
* residual wiring: ``pre`` (Llama: norm before attention and MLP), ``sandwich`` (Gemma-2/3: norms before and after
  each), ``post`` (OLMo-2: norms after each) and ``parallel`` (attention and MLP on the same input: GPT-NeoX with a
  norm each, Phi-1/1.5/2 with one shared norm);
* attention: scale from the module, Gemma-2's soft-capped scores (written out; SDPA cannot cap), a sliding window per
  layer (Mistral, Phi-3: every layer from the config; Gemma-2/3, Qwen2/3: the layers the attention module marks);
* the MLP, dense or mixture-of-experts, is the model's own module; the head is ``bs_kernels.hf.lm_head`` (bias,
  logit scale, Gemma-2's final soft-capping).

``FAMILIES`` lists the model types this layout is tested on, token for token against ``generate`` with the same
weights (``tests/test_families.py``); any other model is refused by ``layout`` and generated with HF ``generate``.

``CpuPlan`` packs one round's GEMM weights for oneDNN on the CPU (q/k/v and gate/up fused), in ``bs_kernels``' CPU
GEMM dtype.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bs_kernels.head import transform_logits
from bs_kernels.hf import lm_head

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "olmo2",
            "gpt_neox", "qwen3_moe")
"""``config.model_type`` of the families the layout drives (tested against ``generate``: tests/test_families.py)."""

_WINDOW_FROM_CONFIG = ("mistral", "phi3")
"""Families whose every layer attends within ``config.sliding_window`` (the others mark their windowed layers on the
attention module's ``sliding_window``)."""


def decoder_of(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _first(obj, *names):
    """The first of ``obj``'s attributes ``names`` that is set, else None (families name the same module apart)."""
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class LayerLayout:
    """One block's modules and wiring (see the module docstring)."""

    qkv: tuple[torch.nn.Module, ...]  # (q, k, v) projections, or the one fused projection
    qkv_kind: str  # "split" | "fused" | "neox"
    out: torch.nn.Module
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    qk_norm_per_head: bool
    norms: tuple  # (before attention, after attention, before MLP, after MLP), None where the family has none
    parallel: bool
    mlp: torch.nn.Module
    scaling: float
    softcap: float | None  # attention-score soft-capping (Gemma-2)
    window: int | None  # sliding window (tokens), None for full attention
    rope_type: str | None  # the layer's rotary table (Gemma-3), None when the model has one


@dataclass(frozen=True)
class Layout:
    n_heads: int
    n_kv: int
    head_dim: int
    qkv_sizes: tuple[int, int, int]
    embed: torch.nn.Module
    norm: torch.nn.Module
    rotary: torch.nn.Module
    rope_types: tuple[str, ...] | None
    layers: tuple[LayerLayout, ...]

    @property
    def windows(self) -> set:
        return {layer.window for layer in self.layers}


def _norms(layer) -> tuple[tuple, bool]:
    """(before attention, after attention, before MLP, after MLP) norms and whether the residual is parallel."""
    get = lambda name: getattr(layer, name, None)  # noqa: E731
    if get("pre_feedforward_layernorm") is not None and get("post_feedforward_layernorm") is not None:
        return (get("input_layernorm"), get("post_attention_layernorm"), get("pre_feedforward_layernorm"),
                get("post_feedforward_layernorm")), False
    if get("input_layernorm") is None and get("post_feedforward_layernorm") is not None:
        return (None, get("post_attention_layernorm"), None, get("post_feedforward_layernorm")), False
    if get("input_layernorm") is not None and get("post_attention_layernorm") is not None:
        return (get("input_layernorm"), None, get("post_attention_layernorm"), None), bool(
            getattr(layer, "use_parallel_residual", False))
    if get("input_layernorm") is not None:  # Phi: attention and MLP both read the one norm's output
        return (get("input_layernorm"), None, get("input_layernorm"), None), True
    raise ValueError(f"{type(layer).__name__}: unknown norm layout")


def _window(model_type: str, cfg, attn) -> int | None:
    if model_type in _WINDOW_FROM_CONFIG:
        return getattr(cfg, "sliding_window", None)
    return getattr(attn, "sliding_window", None)


def layout(model) -> Layout:
    """How ``model``'s decoder is wired (``Layout``); ValueError, naming the reason, for a model outside ``FAMILIES``
    (generate it with HF ``generate``)."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"{type(model).__name__} (model_type {model_type!r}): the sampler drives {FAMILIES}; "
                         "use HF generate for this model")
    dec = decoder_of(model)
    rotary = getattr(dec, "rotary_emb", None)
    norm = _first(dec, "norm", "final_layer_norm", "final_layernorm")
    if rotary is None or norm is None or getattr(dec, "layers", None) is None:
        raise ValueError(f"{type(model).__name__}: the sampler drives decoders with layers, rotary_emb and a final "
                         "norm; this one lacks one of them: use HF generate for this model")
    by_type = "layer_type" in inspect.signature(rotary.forward).parameters
    layers = []
    for i, block in enumerate(dec.layers):
        attn = _first(block, "self_attn", "attention")
        if hasattr(attn, "qkv_proj"):
            qkv, kind = (attn.qkv_proj,), "fused"
        elif hasattr(attn, "query_key_value"):
            qkv, kind = (attn.query_key_value,), "neox"
        else:
            qkv, kind = (attn.q_proj, attn.k_proj, attn.v_proj), "split"
        norms, parallel = _norms(block)
        q_norm, k_norm = _first(attn, "q_norm", "q_layernorm"), _first(attn, "k_norm", "k_layernorm")
        head_dim = _first(attn, "head_dim", "head_size")
        layers.append(LayerLayout(
            qkv=qkv, qkv_kind=kind, out=_first(attn, "o_proj", "dense"), q_norm=q_norm, k_norm=k_norm,
            qk_norm_per_head=q_norm is not None and q_norm.weight.shape[-1] == head_dim, norms=norms,
            parallel=parallel, mlp=block.mlp, scaling=float(attn.scaling),
            softcap=getattr(attn, "attn_logit_softcapping", None), window=_window(model_type, cfg, attn),
            rope_type=cfg.layer_types[i] if by_type else None))
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    return Layout(n_heads, n_kv, head_dim, (n_heads * head_dim, n_kv * head_dim, n_kv * head_dim),
                  dec.get_input_embeddings(), norm, rotary, tuple(sorted(set(cfg.layer_types))) if by_type else None,
                  tuple(layers))


def _rope(x, cos, sin):
    """Rotary embedding of x [B, H, T, D] by cos / sin [B, 1, T, R]: the first R dims rotate (partial rotary)."""
    r = cos.shape[-1]
    rot, keep = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
    half = rot.chunk(2, dim=-1)
    rot = rot * cos + torch.cat((-half[1], half[0]), dim=-1) * sin
    return rot if keep is None else torch.cat((rot, keep), dim=-1)


def _norm(module, x):
    return x if module is None else module(x)


class Runner:
    """The model's forward over a static KV cache, for prompts [B, L] (prefill) or one token per row (decode)."""

    def __init__(self, model, rows: int, max_len: int, device, dtype):
        self.model, self.lay = model, layout(model)
        shape = (rows, self.lay.n_kv, max_len, self.lay.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.lay.layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.lay.layers]
        self.max_len = max_len

    def _qkv(self, i, layer, h, plan):
        """q [B, H, T, D], k and v [B, H_kv, T, D] of normed input h [B, T, D], q/k norms applied."""
        lay, (b, t, _) = self.lay, h.shape
        if plan is not None:
            out = plan.qkv[i](h.to(plan.dtype))
        elif layer.qkv_kind == "split":
            out = torch.cat([m(h) for m in layer.qkv], dim=-1)
        else:
            out = layer.qkv[0](h)
        if layer.qkv_kind == "neox":  # per head [q_h, k_h, v_h]
            q, k, v = out.view(b, t, lay.n_heads, 3 * lay.head_dim).chunk(3, dim=-1)
        else:
            q, k, v = out.split(lay.qkv_sizes, dim=-1)
            if layer.q_norm is not None and not layer.qk_norm_per_head:  # OLMo-2: over all heads
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k, v = (x.view(b, t, -1, lay.head_dim) for x in (q, k, v))
        if layer.q_norm is not None and layer.qk_norm_per_head:  # Qwen3, Gemma-3
            q, k = layer.q_norm(q), layer.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def _scores_attention(q, keys, values, mask, layer):
        """softmax(cap(q k^T * scale)) v written out (Gemma-2's soft-capped scores), float32 softmax as in HF."""
        s = torch.matmul(q, keys.transpose(-1, -2)) * layer.scaling
        s = torch.tanh(s / layer.softcap) * layer.softcap
        s = s.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), values)

    def _attention(self, i, layer, h, cos, sin, write_idx, mask, rows, end, plan):
        lay = self.lay
        b, t, _ = h.shape
        q, k, v = self._qkv(i, layer, h, plan)
        q, k = _rope(q, cos[:, None], sin[:, None]), _rope(k, cos[:, None], sin[:, None])
        if rows is None:  # decode: one query per row over cache slots [:end]
            self.k[i].index_copy_(2, write_idx, k.to(self.k[i].dtype))
            self.v[i].index_copy_(2, write_idx, v.to(self.v[i].dtype))
            keys, values = self.k[i][:, :, :end].to(q.dtype), self.v[i][:, :, :end].to(q.dtype)
            # fold each kv head's query group into the query axis, [B, H_kv, H/H_kv, D], so grouped-query attention
            # reads the cache as it is, with no repeated K/V per step
            q = q.reshape(b, lay.n_kv, lay.n_heads // lay.n_kv, lay.head_dim)
            if layer.softcap is not None:
                out = self._scores_attention(q, keys, values, mask, layer)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=layer.scaling)
            out = out.reshape(b, 1, -1)
        else:  # prefill: attend within the prompt, then copy each prompt's cache into its sample rows
            self.k[i][:, :, :t] = k.to(self.k[i].dtype).index_select(0, rows)
            self.v[i][:, :, :t] = v.to(self.v[i].dtype).index_select(0, rows)
            if layer.softcap is not None:
                g = lay.n_heads // lay.n_kv
                out = self._scores_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), mask, layer)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scaling,
                                                     enable_gqa=lay.n_kv != lay.n_heads)
            out = out.transpose(1, 2).reshape(b, t, -1)
        return plan.o[i](out) if plan is not None else layer.out(out)

    def _mlp(self, i, layer, x, plan):
        if plan is None or plan.gate_up[i] is None:
            return layer.mlp(x)
        gate, up = plan.gate_up[i](x.to(plan.dtype)).chunk(2, dim=-1)
        return plan.down[i](plan.act[i](gate).mul_(up))

    def _block(self, i, layer, x, rope, write_idx, masks, rows, end, plan):
        n_attn, n_attn_out, n_mlp, n_mlp_out = layer.norms
        cos, sin = rope[layer.rope_type]
        a = self._attention(i, layer, _norm(n_attn, x), cos, sin, write_idx, masks[layer.window], rows, end, plan)
        a = _norm(n_attn_out, a)
        if layer.parallel:
            return x + a + self._mlp(i, layer, _norm(n_mlp, x), plan)
        x = x + a
        return x + _norm(n_mlp_out, self._mlp(i, layer, _norm(n_mlp, x), plan))

    def forward(self, ids, positions, write_idx, masks, rows=None, end=None, plan=None):
        """fp32 logits [B, V] of the last position. ``masks`` maps each layer window (None: full) to its boolean
        attention mask; ``rows`` (prefill) the cache rows of each prompt's samples, or None (decode, one token per row,
        attending over cache slots ``[:end]``); ``plan`` a ``CpuPlan`` or None (the model's own layers)."""
        lay = self.lay
        x = lay.embed(ids)
        if plan is not None:
            x = x.to(plan.dtype)
        if lay.rope_types is None:
            rope = {None: lay.rotary(x, positions)}
        else:
            rope = {t: lay.rotary(x, positions, t) for t in lay.rope_types}
        for i, layer in enumerate(lay.layers):
            x = self._block(i, layer, x, rope, write_idx, masks, rows, end, plan)
        h = lay.norm(x[:, -1])
        head = lm_head(self.model)
        if plan is not None:
            x = plan.head(h.to(plan.dtype)).float()
        else:
            # F.linear, not an explicit .to(): under autocast the weight's bf16 copy is cached for the whole round
            x = F.linear(h, head.weight, head.bias).float()
        return transform_logits(x, logit_scale=head.logit_scale, softcap=head.softcap)


class PackedLinear:
    """``x W^T + b`` for the concatenation of some ``nn.Linear`` layers' weights, converted to ``dtype`` and, where
    this torch has oneDNN, reordered once into its blocked layout (``mkldnn._reorder_linear_weight``, what inductor's
    CPU freezing pass uses). Measured on the project's 2-core AVX2 CPU at a decode batch of 96 rows (2026-12-01,
    interleaved, loaded machine): a SmolLM2 block's GEMMs 91 ms packed and fused against 101 ms as the model's own
    ``nn.Linear`` calls, the [96, 576] x [576, 49152] head 463 ms against 747 ms."""

    def __init__(self, linears: list[torch.nn.Linear], dtype: torch.dtype, rows: int):
        w = torch.cat([m.weight.detach() for m in linears]).to(dtype)
        biases = [m.bias for m in linears]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(m.out_features, dtype=dtype, device=w.device) if b is None else b.detach().to(dtype)
             for m, b in zip(linears, biases)])
        self.weight, self.packed = w, None
        if w.device.type == "cpu" and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
                self.weight = None  # the packed copy is all the GEMM reads
            except (RuntimeError, AttributeError):  # a torch without the op, or a dtype oneDNN does not pack
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _plain_linear(m) -> bool:
    return type(m) is torch.nn.Linear  # a LoRA / quantized wrapper computes more than its .weight says


def _gated(mlp) -> tuple[list, torch.nn.Module, object] | None:
    """(gate/up linears in [gate | up] order, down projection, activation) of a gated MLP of plain linears, else
    None (GPT-NeoX's ungated MLP, a mixture of experts, LoRA-wrapped projections: the module itself runs)."""
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        parts, act = [mlp.gate_proj, mlp.up_proj], getattr(mlp, "act_fn", None)
    elif hasattr(mlp, "gate_up_proj") and hasattr(mlp, "down_proj"):  # Phi-3: already fused as [gate | up]
        parts, act = [mlp.gate_up_proj], getattr(mlp, "activation_fn", None)
    else:
        return None
    if not all(_plain_linear(m) for m in [*parts, mlp.down_proj]) or not callable(act):
        return None
    return parts, mlp.down_proj, act


class CpuPlan:
    """One round's GEMM weights on the CPU (see ``PackedLinear``): fused q/k/v and gate/up, output, down and head
    projections, in ``dtype``; an MLP that is not a gated one of plain linears runs as the model's module. Built at
    the start of every round, so it always reads the current weights."""

    def __init__(self, model, dtype: torch.dtype, rows: int):
        lay = layout(model)
        self.dtype = dtype
        self.qkv, self.o, self.gate_up, self.down, self.act = [], [], [], [], []
        for layer in lay.layers:
            self.qkv.append(PackedLinear(list(layer.qkv), dtype, rows))
            self.o.append(PackedLinear([layer.out], dtype, rows))
            gated = _gated(layer.mlp)
            self.gate_up.append(None if gated is None else PackedLinear(gated[0], dtype, rows))
            self.down.append(None if gated is None else PackedLinear([gated[1]], dtype, rows))
            self.act.append(None if gated is None else gated[2])
        self.head = PackedLinear([model.get_output_embeddings()], dtype, rows)

    @staticmethod
    def applies(model) -> bool:
        """Whether every attention projection and the head are plain ``nn.Linear`` layers (a plan packs them)."""
        lay = layout(model)
        mods = [m for layer in lay.layers for m in (*layer.qkv, layer.out)] + [model.get_output_embeddings()]
        return all(_plain_linear(m) for m in mods)
