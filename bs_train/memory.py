"""The memory plans (one GPU of 24, 40 or 80 GB) and their budgets, computed from a model's shapes.

``PLANS`` is what ``train.memory_plan`` selects: the settings each plan fills in (``config.loading._with_plan``) and the GPU
it is sized for. ``budget(shape, plan)`` computes, per component, what one GPU holds at the peak of a training step
(weights, gradients, optimizer states, block-boundary activations under checkpointing, one recomputed block, the
fused loss's logits chunk) and during a BS-S sampling round (its KV cache), and for the offload plan the host memory
and the PCIe time per step. Every figure is **computed** from the shapes and the stated assumptions, never measured
(``python -m benchmarks.bench_train_step`` measures; ``python -m benchmarks.memory_budget`` prints these as JSON).
Pure Python on purpose: the config imports the plan table without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .methods import METHODS

GIB = 2**30

PLANS: dict[str, dict] = {
    # LoRA r = 16 on every linear layer over frozen bf16 weights; fp32 adapters with fp32 AdamW (exact and small).
    # Micro-batch 4 x grad_accum 8 keeps the paper's effective batch of 32; 8 prompts per BS-S sampling call keep
    # its KV cache under 1 GiB at 8B. Ours: sized by ``budget`` to leave >= 2 GiB of a 24 GB card free.
    "lora24": {"gpu_gib": 24 * 1e9 / GIB, "settings": {
        "model": {"dtype": "bfloat16", "lora_rank": 16},
        "method": {"bss_prompts_per_round": 8},
        "train": {"optimizer": "adamw", "activation_checkpointing": True, "batch_size": 4, "grad_accum": 8}}},
    # Full-parameter: FSDP2 CPU offload of parameters, gradients and optimizer state (the optimizer steps on the
    # CPU), bf16 weights with torchao's bf16 AdamW states and stochastic rounding (host RAM 6 bytes / param).
    # Not 8-bit states: torchao 0.18's OptimState8bit fails on FSDP2's DTensor parameters (``aten.view.dtype``
    # is not implemented for it; measured on torch 2.13 CPU by benchmarks/test_bench_scripts.py).
    "offload40": {"gpu_gib": 40 * 1e9 / GIB, "settings": {
        "model": {"dtype": "bfloat16"},
        "method": {"bss_prompts_per_round": 16},
        "train": {"optimizer": "adamw_bf16_sr", "activation_checkpointing": True, "cpu_offload": True,
                  "batch_size": 8, "grad_accum": 4}}},
    # Full-parameter on the GPU: the plan of docs/guides/gpus.md's 80 GB table (bf16 + 8-bit states + stochastic rounding).
    "full80": {"gpu_gib": 80 * 1e9 / GIB, "settings": {
        "model": {"dtype": "bfloat16"},
        "train": {"optimizer": "adamw8bit", "activation_checkpointing": True, "batch_size": 16, "grad_accum": 2}}},
}


@dataclass(frozen=True)
class Shape:
    """What the budget needs of a Llama-family model config (the names of Hugging Face's ``LlamaConfig``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @classmethod
    def of(cls, config) -> Shape:
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        return cls(**{k: get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "vocab_size")},
                   tie_word_embeddings=bool(get("tie_word_embeddings", False)))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block: q, k, v, o, gate, up, down."""
        d, kv, i = self.hidden_size, self.num_key_value_heads * self.head_dim, self.intermediate_size
        return [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]

    def block_params(self) -> int:
        return sum(a * b for a, b in self.linears()) + 2 * self.hidden_size  # + two RMSNorm weights

    def root_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def params(self) -> int:
        return self.num_hidden_layers * self.block_params() + self.root_params()

    def lora_params(self, rank: int) -> int:
        """Adapter parameters of LoRA rank r on every linear layer of the decoder (``all-linear``)."""
        return self.num_hidden_layers * sum(rank * (a + b) for a, b in self.linears())

    def block_activation_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """What autograd saves per token inside one recomputed block: the two norm outputs and the residual inputs
        (4 D), q, k, v (D + 2 kv), the attention output (D), and the MLP's gate, up, silu(gate) and their product
        (4 I)."""
        d, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        return (6 * d + 2 * kv + 4 * self.intermediate_size) * dtype_bytes


@dataclass(frozen=True)
class Workload:
    """The step a budget is computed for (defaults: the TOFU settings of the plans; ``seq`` = TOFU's 256)."""

    method: str = "bs_s"
    batch: int = 4  # examples per micro-batch, forget and retain each
    seq: int = 256
    beliefs: int = 3  # BS-S N
    prompts_per_round: int = 8
    prompt_len: int = 56
    new_tokens: int = 200

    @property
    def samples(self) -> bool:
        """Whether the method draws beliefs with the sampler (its table row's ``beliefs``: BS-S)."""
        return METHODS[self.method].beliefs

    def tokens_in_graph(self) -> int:
        """Tokens whose block-boundary activations are alive at once: forget + retain (+ N beliefs per prompt for
        BS-S): ``method_loss`` builds every term's graph before one backward."""
        rows = 2 * self.batch + (self.beliefs * self.batch if self.samples else 0)
        return rows * self.seq

    def largest_forward_tokens(self) -> int:
        rows = self.beliefs * self.batch if self.samples else self.batch
        return rows * self.seq


# Stated assumptions of the offload plan's time cost (ours; change them with ``budget(..., pcie_gbps=...)``).
PCIE_GBPS = 25.0  # PCIe 4.0 x16, effective host <-> device bytes/s in each direction (32 GB/s peak)
HOST_GBPS = 50.0  # host memory bandwidth the CPU optimizer step streams at
GPU_TFLOPS = 0.4 * 312  # 40% of an A100's dense bf16 peak: the compute the transfers compete with


def budget(shape: Shape, plan: str, work: Workload = Workload(), *, pcie_gbps: float = PCIE_GBPS,
           host_gbps: float = HOST_GBPS, gpu_tflops: float = GPU_TFLOPS, lora_rank: int = 16,
           loss_chunk_bytes: int = 96 * 2**20) -> dict:
    """Per-component GPU bytes of ``plan`` (a ``PLANS`` key) for ``work``: the training peak, the sampling peak
    (BS-S) and the plan's total; for ``offload40`` also the host memory and the computed tokens/s."""
    p, bf16 = shape.params(), 2
    boundary = shape.num_hidden_layers * shape.hidden_size * bf16 * work.tokens_in_graph()
    recompute = shape.block_activation_bytes_per_token() * work.largest_forward_tokens()
    kv = (2 * shape.num_hidden_layers * work.prompts_per_round * work.beliefs * shape.num_key_value_heads
          * (work.prompt_len + work.new_tokens) * shape.head_dim * bf16)
    sampler_logits = work.prompts_per_round * work.beliefs * shape.vocab_size * 4
    comp: dict[str, float] = {}
    host: dict[str, float] = {}
    if plan == "lora24":
        lp = shape.lora_params(lora_rank)
        comp["base weights, bf16 (frozen)"] = p * bf16
        comp[f"LoRA r={lora_rank} adapters, fp32"] = lp * 4
        comp["adapter gradients, fp32"] = lp * 4
        comp["adapter AdamW states, fp32 (2 per param)"] = lp * 8
        comp["base-weight gradients"] = 0
    elif plan == "full80":
        comp["weights, bf16"] = p * bf16
        comp["gradients, bf16"] = p * bf16
        comp["AdamW states, 8-bit + one fp32 scale per 256"] = p * 2 * (1 + 4 / 256)
    elif plan == "offload40":
        block, root = shape.block_params(), shape.root_params()
        comp["root weights gathered for the step (embeddings, lm_head), bf16"] = root * bf16
        comp["root gradients before the copy to host, fp32"] = root * 4
        comp["two blocks' weights gathered (current + prefetched), bf16"] = 2 * block * bf16
        comp["two blocks' gradients before the copy to host, fp32"] = 2 * block * 4
        host["weights, bf16"] = p * bf16
        host["gradients, fp32 (FSDP's reduce dtype)"] = p * 4
        host["AdamW states, bf16 (stochastic rounding)"] = p * 2 * bf16
    else:
        raise ValueError(f"memory plan {plan!r} is not one of {tuple(PLANS)}")
    train = {"block-boundary activations (checkpointed), bf16": boundary,
             "one block recomputed in backward, bf16": recompute,
             "fused loss: one logits chunk": loss_chunk_bytes}
    sampling = {"BS-S sampler KV cache, bf16": kv if work.samples else 0,
                "BS-S sampler logits, fp32": sampler_logits if work.samples else 0}
    static = sum(comp.values())
    if plan == "lora24":  # gradients exist only during the step; the sampler runs between steps
        static_sampling = static - comp["adapter gradients, fp32"]
    elif plan == "full80":
        static_sampling = static - comp["gradients, bf16"]
    else:  # offload: the sampler gathers every block for the round (``gathered_parameters``)
        static_sampling = p * bf16
    peak_train, peak_sample = static + sum(train.values()), static_sampling + sum(sampling.values())
    out = {"plan": plan, "computed": True, "gpu_gib": PLANS[plan]["gpu_gib"], "params": p,
           "workload": work.__dict__, "gpu": {k: round(v / GIB, 3) for k, v in {**comp, **train}.items()},
           "sampling": {k: round(v / GIB, 3) for k, v in sampling.items()},
           "peak_train_gib": round(peak_train / GIB, 2), "peak_sampling_gib": round(peak_sample / GIB, 2),
           "peak_gib": round(max(peak_train, peak_sample) / GIB, 2)}
    out["fits"] = out["peak_gib"] <= out["gpu_gib"]
    if plan == "offload40":
        out["gpu_note"] = ("a BS-S sampling round gathers every block onto the GPU for the round (bf16 weights, "
                           "peak_sampling_gib), then reshards; training holds two blocks at a time")
        tokens = work.tokens_in_graph()
        h2d = 2 * p * bf16  # every block gathered in forward and again for the recompute + backward
        d2h = p * 4  # fp32 gradients of every parameter to the host
        transfer_s = h2d / (pcie_gbps * 1e9) + d2h / (pcie_gbps * 1e9)
        compute_s = 8 * p * tokens / (gpu_tflops * 1e12)  # 6 N per token + the checkpointed recompute (2 N)
        optim_s = 12 * p / (host_gbps * 1e9)  # read weight, fp32 grad, states; write weight and states
        micro_s = max(transfer_s, compute_s)  # FSDP2 overlaps copies with compute at best
        out["host"] = {k: round(v / GIB, 2) for k, v in host.items()}
        out["host_gib"] = round(sum(host.values()) / GIB, 2)
        out["time"] = {"assumptions": {"pcie_GBps_each_way": pcie_gbps, "host_mem_GBps": host_gbps,
                                       "gpu_effective_TFLOPs": gpu_tflops},
                       "per_micro_batch": {"tokens": tokens, "pcie_s": round(transfer_s, 2),
                                           "compute_s": round(compute_s, 2)},
                       "cpu_optimizer_step_s": round(optim_s, 2),
                       "tokens_per_s_grad_accum_1": round(tokens / (micro_s + optim_s)),
                       "tokens_per_s_grad_accum_4": round(4 * tokens / (4 * micro_s + optim_s)),
                       "tokens_per_s_on_gpu_same_compute": round(tokens / compute_s)}
    return out
