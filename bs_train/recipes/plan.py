"""The recipe's time plan on one GPU, checkable without one: ``bs-unlearn recipe --plan``.

For every piece of work the recipe would do (two fine-tunes, the selection runs, the unlearning runs, every
evaluation) it counts, from the same configs the runs would use (``recipe.FINETUNE`` / ``UNLEARN`` plus the CLI's
overrides, the method table's needs):

* sequences and tokens: training tokens are the padded tokens of the real sampler's batches (``ForgetRetainSampler``,
  length-bucketed when ``train.bucket_window`` is on) for the real row lengths when the data folder is there, else
  for TOFU's stated statistics (``TOFU_STATS``); scoring counts come from ``evaluate.plan``;
* FLOPs: 6·N·P for training (P the parameters a token passes through, lm_head included) plus 12·L·d·s per token
  for attention at length s, 2·N·P for scoring, and belief / answer decoding as bandwidth-bound steps (one read of
  the weights and the KV cache per step) with a launch floor;
* the in-training evaluation of a run with ``train.eval_every`` (``in_training_work``): its evaluations (step 0,
  every N steps or epochs, the last step) counted as the scoring and decoding they do, plus their host work and the
  best states a selecting run writes before its checkpoints; a run stopped early by ``train.stop_at_epoch`` or a
  stopping rule is planned at its whole schedule (an upper bound);
* seconds at stated assumptions (``Hardware``): FLOPs / (peak · MFU) plus per-micro-batch, per-step, per-run and
  per-evaluation overheads, each with its reason.

It is a model of the time, not a measurement: ``stages.jsonl`` of a real run is, and ``benchmarks/GPU.md`` says how
to compare the two. The plan is what decided the GPU job's settings (``tools/gpu_job.py``): if it exceeds the budget
with honest assumptions, the job runs less (fewer methods or grid points), it does not assume a higher MFU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# TOFU (locuslab/TOFU) rows per split and mean tokens per row (prompt + answer + EOS) with SmolLM2's tokenizer and
# chat template, measured here on 2026-12-01 from the JSON Lines in ../shared/data/tofu (ours). Used when no data
# folder is given; with one, lengths come from the rows themselves (TOKENS_PER_CHAR below).
TOFU_STATS = {"full": (4000, 82.2), "retain90": (3600, 81.9), "retain95": (3800, 82.1), "forget10": (400, 85.4),
              "forget05": (200, 84.2), "holdout10": (400, 85.4), "holdout05": (200, 84.2),
              "forget10_perturbed": (400, 85.4), "forget05_perturbed": (200, 84.2), "retain_perturbed": (400, 79.6),
              "real_authors": (100, 49.2), "world_facts": (117, 45.8)}
PERTURBED_PER_ROW = 5  # TOFU's perturbed_answer lists hold 5 wrong answers (forget*_perturbed, retain_perturbed)
OPTIONS_PER_ROW = 3  # real_authors / world_facts: option1..4 minus the right one
# tokens ~= a * characters(question + answer) + b for SmolLM2 on TOFU full (least squares, mean error 4.8 tokens;
# measured here, ours): lets the plan read lengths from the data in milliseconds instead of loading the GGUF's
# tokenizer (40 s on a 2-core CPU).
TOKENS_PER_CHAR, TOKENS_FIXED = 0.1637, 43.1


@dataclass
class ModelShape:
    """The decoder the recipe trains. Defaults: HuggingFaceTB/SmolLM2-135M-Instruct's config.json."""

    layers: int = 30
    """num_hidden_layers."""
    hidden: int = 576
    """hidden_size."""
    intermediate: int = 1536
    """intermediate_size (SwiGLU: three d x f matrices)."""
    heads: int = 9
    """num_attention_heads."""
    kv_heads: int = 3
    """num_key_value_heads."""
    vocab: int = 49152
    """vocab_size (the lm_head is tied to the embedding, but its matmul is still done per token)."""

    def __post_init__(self):
        for k, v in asdict(self).items():
            if v < 1:
                raise ValueError(f"ModelShape.{k} must be >= 1, got {v}")

    @property
    def matmul_params(self) -> int:
        """Parameters one token's forward multiplies by: the blocks' matrices and the lm_head."""
        d, hd = self.hidden, self.hidden // self.heads
        attn = 2 * d * d + 2 * d * self.kv_heads * hd
        return self.layers * (attn + 3 * d * self.intermediate) + d * self.vocab

    @property
    def weight_bytes(self) -> int:
        """bf16 bytes read per decode step (the blocks and the embedding / lm_head once)."""
        return 2 * self.matmul_params

    @property
    def kv_bytes_per_token(self) -> int:
        """bf16 K and V of one cached token over all layers."""
        return 2 * 2 * self.layers * self.kv_heads * (self.hidden // self.heads)


@dataclass
class Hardware:
    """One GPU and the overheads of this code on it. Defaults: one H200 as the device README's KINDS.md measured it,
    and overheads that are ours, each with its reason."""

    name: str = "NVIDIA H200"
    """What the plan is for."""
    peak_tflops: float = 790.0
    """Dense bf16 matmul rate: KINDS.md measured 788 TFLOP/s (8192^3 bf16, random data, 2026-10-28) and 769-798
    on 2026-11-04; the datasheet's 990 is not reached by cuBLAS on random data."""
    hbm_tbs: float = 4.3
    """Memory bandwidth: KINDS.md measured a device-to-device copy at 4.3 TB/s (datasheet 4.8)."""
    mfu: float = 0.25
    """Share of peak reached by a 135M model's GEMMs: with d = 576 and a few thousand tokens per micro-batch a
    [T, 576] x [576, 1536] product is a few microseconds of work, tiles are small and wave quantisation is high;
    nanoGPT reports ~40-50% MFU at 124M only with 16k-token micro-batches on an A100 (ours: half that)."""
    micro_batch_s: float = 0.012
    """Launch floor of one forward + backward pass: 30 compiled blocks, ~3 fused kernels each per pass direction
    plus attention and the fused loss, and autograd's Python per op (ours: ~10 us per launch, ~1200 launches)."""
    step_s: float = 0.004
    """One optimizer step: gradient clipping and foreach AdamW over 135M fp32 parameters (16 bytes read and
    written each, ~4.3 GB, 1 ms at 4.3 TB/s) plus their launches (ours)."""
    score_batch_s: float = 0.006
    """Launch floor of one forward-only scoring batch (ours: a third of a training pass, plus the per-batch host
    work of collating and reading results)."""
    decode_step_s: float = 0.0015
    """Launch floor of one decode step of the CUDA-graph sampler: ~12 kernels per block x 30 blocks replayed at
    ~4 us each (ours); a step takes the larger of this and its bytes over ``hbm_tbs``."""
    run_s: float = 3.0
    """Fixed cost of a training run: weights to the GPU, the exported final/ (0.5 GB of fp32 safetensors hashed and
    written), the config and summary (ours)."""
    eval_s: float = 1.5
    """Fixed cost of an evaluation: the model folder loaded, the results written (ours)."""
    gguf_s: float = 15.0
    """Loading the GGUF (tokenizer and dequantised weights) for each fine-tune: 40 s here on a shared 2-core CPU,
    the GPU host has 16 cores (ours)."""
    compile_s: float = 25.0
    """First ``torch.compile`` of the decoder blocks in a run (dynamic shapes; one block graph reused by all 30)."""
    eval_host_s: float = 0.3
    """Host work of one in-training evaluation besides the model: ROUGE-L of its greedy answers (160 at the default
    40 rows of four splits; 0.74 ms a pair on a loaded 2-core CPU with the stemmer's cache, ``evaluation/metrics.py``),
    collating its batches, the per-row results gathered, trajectory.json written (ours)."""
    best_save_s: float = 1.0
    """Writing a selected state's weights (0.54 GB of fp32 for SmolLM2) with its manifest, once before a checkpoint
    that names a new best: ~0.5 s at ~1 GB/s plus 0.4 s of sha256 at 1.34 GiB/s (``checkpoint.write_manifest``;
    ours)."""

    def __post_init__(self):
        for k, v in asdict(self).items():
            if k != "name" and not v > 0:
                raise ValueError(f"Hardware.{k} must be > 0, got {v}")
        if self.mfu > 1:
            raise ValueError(f"Hardware.mfu must be <= 1, got {self.mfu}")


# The GPUs the recipe is lent (the device README's KINDS.md), by the name ``bs-unlearn recipe --plan-gpu`` takes; the
# H100 is the machine a call gets by default. Their overheads above are the same: one image on a 16-core host.
GPUS = {
    # KINDS.md, 2026-11-13: an 8192^3 bf16 product at 798 TFLOP/s, a device-to-device copy at 3.0 TB/s (datasheet 3.35)
    "h100": Hardware(name="NVIDIA H100 80GB HBM3", peak_tflops=798.0, hbm_tbs=3.0),
    "h200": Hardware(),
}


@dataclass
class Work:
    """One piece of the recipe's work, counted."""

    stage: str
    item: str
    sequences: int = 0
    tokens: int = 0
    flops: float = 0.0
    decode_steps: int = 0
    seconds: float = 0.0


def _row_tokens(row: dict) -> int:
    return round(TOKENS_PER_CHAR * (len(row["question"]) + len(row["answer"])) + TOKENS_FIXED)


class PlanData:
    """Row counts and lengths per split: from a data folder when it holds the split, else ``TOFU_STATS``."""

    def __init__(self, source: str | None):
        self.source, self.rows, self.measured = source, {}, []

    def split(self, name: str) -> list[dict[str, Any]]:
        if name not in self.rows:
            rows = None
            if self.source and (Path(self.source) / f"{name}.jsonl").is_file():
                from ..data import load_qa

                rows = load_qa(self.source, name)
                self.measured.append(name)
            elif name in TOFU_STATS:
                n, mean = TOFU_STATS[name]
                wrong = ["x"] * (PERTURBED_PER_ROW if name.endswith("_perturbed") else 0)
                rows = [{"question": "", "answer": "", "tokens": round(mean), "perturbed_answer": wrong,
                         "paraphrased_answer": "", **{f"option{i}": f"o{i}" for i in range(1, OPTIONS_PER_ROW + 1)}}
                        for _ in range(n)]
            self.rows[name] = rows
        return self.rows[name]

    def lengths(self, name: str) -> list[int]:
        return [r.get("tokens") or _row_tokens(r) for r in self.split(name)]

    def mapping(self, names) -> dict[str, list[dict]]:
        return {n: self.split(n) for n in names if self.split(n) is not None}


def _attention_flops(shape: ModelShape, tokens: int, mean_len: float, passes: int) -> float:
    """QK^T and AV per layer: 4·s·d FLOPs a token forward at length s (no causal saving), times ``passes``."""
    return passes * 4 * shape.layers * shape.hidden * mean_len * tokens


def _decode_s(shape: ModelShape, hw: Hardware, steps: int, rows: int, context: float) -> float:
    per = (shape.weight_bytes + rows * context * shape.kv_bytes_per_token) / (hw.hbm_tbs * 1e12)
    return steps * max(per, hw.decode_step_s)


def train_work(stage: str, item: str, cfg, data: PlanData, shape: ModelShape, hw: Hardware,
               from_gguf: bool) -> Work:
    """One training run of ``cfg`` (a RunConfig): its padded tokens through the real sampler, FLOPs and seconds."""
    from ..data import ForgetRetainSampler
    from ..methods import METHODS, needs_ref_logp, needs_reference, needs_retain

    t = cfg.train
    finetune = cfg.command == "finetune"
    main = data.lengths(cfg.data.train_split if finetune else cfg.data.forget_split)
    retain = [] if finetune or not needs_retain(cfg.method) else data.lengths(cfg.data.retain_split)
    sampler = ForgetRetainSampler(len(main), len(retain), t.batch_size * t.grad_accum, seed=t.seed,
                                  bucket_window=t.bucket_window, forget_lengths=main if t.bucket_window else None,
                                  retain_lengths=retain if t.bucket_window and retain else None)
    steps = sampler.steps_per_epoch * t.epochs if t.max_steps is None else min(t.max_steps,
                                                                              sampler.steps_per_epoch * t.epochs)
    tokens = seqs = micro = 0
    done, it = 0, iter(sampler)
    while done < steps:
        try:
            f_idx, r_idx = next(it)
        except StopIteration:
            it = iter(sampler)
            continue
        done += 1
        for lengths, idx in ((main, f_idx), (retain, r_idx)):
            size = -(-len(idx) // t.grad_accum) if idx else 0
            for m in range(t.grad_accum if idx else 0):
                part = idx[m * size:(m + 1) * size]
                if part:
                    tokens += len(part) * max(lengths[i] for i in part)
                    seqs += len(part)
        micro += t.grad_accum * (2 if retain else 1)
    mean_len = tokens / max(seqs, 1)
    row = METHODS[cfg.method.name] if not finetune else None
    belief_tokens = decode_steps = 0
    decode_s = 0.0
    if row is not None and (row.beliefs or row.sample_alternates):
        m = cfg.method
        rounds = 1 if (row.sample_alternates or m.bss_regen == "never") else math.ceil(t.epochs / m.bss_regen_every)
        per_round = math.ceil(len(main) / m.bss_prompts_per_round)
        decode_steps = rounds * per_round * m.bss_max_new_tokens
        decode_s = _decode_s(shape, hw, decode_steps, m.bss_prompts_per_round * m.bss_samples,
                             mean_len + m.bss_max_new_tokens / 2)
        if row.beliefs:  # every forget row's N beliefs trained on each epoch, as long as they may grow
            belief_tokens = t.epochs * len(main) * m.bss_samples * (mean_len + m.bss_max_new_tokens)
            micro += steps * t.grad_accum
    ref_tokens = sum(main) * (1 if row is not None and needs_ref_logp(cfg.method) else 0)
    if row is not None and needs_reference(cfg.method):
        ref_tokens += tokens  # the frozen model's forward beside every step
    train_tokens = tokens + belief_tokens
    flops = (6 * shape.matmul_params * train_tokens + _attention_flops(shape, train_tokens, mean_len, 3)
             + 2 * shape.matmul_params * ref_tokens)
    compiled = t.compile == "on" or t.compile == "auto"
    seconds = (flops / (hw.peak_tflops * 1e12 * hw.mfu) + micro * hw.micro_batch_s + steps * hw.step_s + decode_s
               + hw.run_s + (hw.compile_s if compiled else 0.0) + (hw.gguf_s if from_gguf else 0.0))
    return Work(stage, item, seqs, int(train_tokens), flops, decode_steps, seconds)


def in_training_work(stage: str, item: str, cfg, data: PlanData, shape: ModelShape, hw: Hardware) -> Work | None:
    """The in-training evaluations of one run of ``cfg`` (None without ``train.eval_every``): what
    ``evaluation/in_training.py`` scores and answers, each evaluation, at its whole schedule's cadence."""
    from ..data import ForgetRetainSampler
    from ..methods import needs_retain
    from ..selection import parse_every

    t = cfg.train
    if t.eval_every is None:
        return None
    n, unit = parse_every(t.eval_every)
    main = data.lengths(cfg.data.train_split if cfg.command == "finetune" else cfg.data.forget_split)
    retain = 0 if cfg.command == "finetune" or not needs_retain(cfg.method) else len(data.lengths(cfg.data.retain_split))
    per_epoch = ForgetRetainSampler(len(main), retain, t.batch_size * t.grad_accum, seed=t.seed).steps_per_epoch
    steps = per_epoch * t.epochs if t.max_steps is None else min(t.max_steps, per_epoch * t.epochs)
    every = n * (per_epoch if unit == "epochs" else 1)
    evals = 1 + steps // every + (1 if steps % every else 0)  # step 0, the cadence, the last step
    saves = (steps // t.checkpoint_every if t.checkpoint_every else 0) if t.select_by else 0
    if cfg.data.text:  # MUSE / WMDP: the first windows of the forget and retain splits scored, nothing generated
        windows = min(t.eval_rows, len(main)) + min(t.eval_rows, len(data.lengths(cfg.data.retain_split)))
        one = _forward_work(stage, item, shape, hw, windows, data.window, t.eval_batch_size)
        return Work(stage, item, evals * one.sequences, evals * one.tokens, evals * one.flops, 0,
                    evals * (one.seconds + hw.eval_host_s) + saves * hw.best_save_s)
    split = t.eval_split or cfg.data.forget_split
    rows = {split: len(data.split(split)), **{s: len(data.split(s)) for s in t.eval_utility_splits.split(",")
                                             if s and data.split(s) is not None}}
    rows = {s: min(t.eval_rows, r) for s, r in rows.items()}
    per_row = {split: 2 + PERTURBED_PER_ROW, "retain_perturbed": 2 + PERTURBED_PER_ROW}  # answer, paraphrase, wrong
    scored = sum(r * per_row.get(s, 1 + OPTIONS_PER_ROW) for s, r in rows.items())
    prompts = sum(rows.values()) if t.eval_max_new_tokens else 0
    mean = sum(data.lengths(split)) / len(data.lengths(split))
    tokens = int(scored * mean)
    flops = 2 * shape.matmul_params * tokens + _attention_flops(shape, tokens, mean, 1)
    gen_batches = math.ceil(prompts / t.eval_batch_size)
    decode = _decode_s(shape, hw, gen_batches * t.eval_max_new_tokens, min(prompts, t.eval_batch_size),
                       mean + t.eval_max_new_tokens / 2) if prompts else 0.0
    one = (flops / (hw.peak_tflops * 1e12 * hw.mfu) + math.ceil(scored / t.eval_batch_size) * hw.score_batch_s
           + decode + hw.eval_host_s)
    return Work(stage, item, evals * scored, evals * tokens, evals * flops,
                evals * gen_batches * t.eval_max_new_tokens, evals * one + saves * hw.best_save_s)


def eval_work(stage: str, item: str, forget_split: str, data: PlanData, shape: ModelShape, hw: Hardware,
              batch_size: int, max_new_tokens: int, with_reference: bool = False) -> Work:
    """One evaluation (``evaluate.plan``'s counts): scored answers as forward passes, greedy answers as decode
    steps of ``max_new_tokens`` per batch of ``batch_size`` questions."""
    from ..evaluation.tofu import UTILITY_SPLITS, plan

    names = [forget_split, f"{forget_split}_perturbed", forget_split.replace("forget", "holdout", 1),
             *UTILITY_SPLITS, *(f"{s}_perturbed" for s in UTILITY_SPLITS[1:])]
    work = plan(data.mapping(names), forget_split, UTILITY_SPLITS)
    if with_reference:  # the retain model's own statistics on the forget split, once
        work["reference"] = {"score": work[forget_split]["score"], "generate": 0}
    scored = sum(w["score"] for w in work.values())
    mean = sum(data.lengths(forget_split)) / len(data.lengths(forget_split))
    tokens = int(scored * mean)
    flops = 2 * shape.matmul_params * tokens + _attention_flops(shape, tokens, mean, 1)
    batches = sum(math.ceil(w["score"] / batch_size) for w in work.values())
    gen_batches = [(math.ceil(w["generate"] / batch_size), min(w["generate"], batch_size)) for w in work.values()]
    steps = sum(b for b, _ in gen_batches) * max_new_tokens
    decode_s = sum(_decode_s(shape, hw, b * max_new_tokens, rows, mean + max_new_tokens / 2)
                   for b, rows in gen_batches if b)
    seconds = flops / (hw.peak_tflops * 1e12 * hw.mfu) + batches * hw.score_batch_s + decode_s + hw.eval_s
    return Work(stage, item, scored, tokens, flops, steps, seconds)


def recipe_plan(recipe, shape: ModelShape | None = None, hw: Hardware | None = None) -> list[Work]:
    """Every piece of work ``run_recipe(recipe)`` would do, in order, counted and timed."""
    from ..config import load_config
    from .tofu import EVALUATE, METHOD_ARGS, SELECT_BY

    shape, hw = shape or ModelShape(), hw or Hardware()
    data = PlanData(recipe.data if recipe.data and Path(recipe.data).is_dir() else None)
    evaluate = (*EVALUATE, f"train.eval_batch_size={recipe.eval_batch_size}", f"train.select_by={SELECT_BY}")
    gguf = not Path(recipe.model).is_dir()
    out: list[Work] = []
    for name, split in (("original", "full"), ("retain", "retain90")):
        cfg = load_config(None, [f"data.train_split={split}", *recipe.finetune], command="finetune")
        out.append(train_work("finetune", name, cfg, data, shape, hw, gguf))
    probe = eval_work("finetune", "probe original", "forget10", data, shape, hw, recipe.eval_batch_size,
                      recipe.max_new_tokens)
    out.append(probe)

    def unlearn_cfg(method, forget, retain, extra=()):
        return load_config(None, [f"method.name={method}", f"data.forget_split={forget}",
                                  f"data.retain_split={retain}", *METHOD_ARGS.get(method, ()), *extra,
                                  *recipe.unlearn], command="unlearn", preset=recipe.preset)

    for method in recipe.methods:  # each selection run evaluates itself: no evaluation after it
        for lr in recipe.lr_grid:
            cfg = unlearn_cfg(method, "forget05", "retain95", (f"train.lr={lr}", *evaluate))
            out.append(train_work("select", f"{method} lr {lr:g}", cfg, data, shape, hw, False))
            out.append(in_training_work("select", f"eval during {method} lr {lr:g}", cfg, data, shape, hw))
    for method in recipe.methods:  # at the whole schedule: the selected epoch is not known before selection
        cfg = unlearn_cfg(method, "forget10", "retain90", ("train.squeezing_every=10",))
        out.append(train_work("unlearn", method, cfg, data, shape, hw, False))
    for i, name in enumerate(("retain", "original", *recipe.methods)):
        out.append(eval_work("evaluate", f"eval {name}", "forget10", data, shape, hw, recipe.eval_batch_size,
                             recipe.max_new_tokens, with_reference=i == 0))
    return out


def format_plan(work: list[Work], recipe, shape: ModelShape, hw: Hardware, budget_s: float) -> str:
    """The plan as text: the assumptions, one line per stage (and per run with ``detail``), the total and the
    verdict against ``budget_s``."""
    grid = f"lr grid {','.join(f'{x:g}' for x in recipe.lr_grid)}" if hasattr(recipe, "lr_grid") else \
        f"lr {getattr(recipe, 'lr', 'per the unlearning settings')}"
    lines = [f"time plan of `bs-unlearn recipe` ({type(recipe).__name__}) on one {hw.name} (a model, not a "
             "measurement)",
             f"  data: {recipe.data if Path(str(recipe.data)).is_dir() else 'measured statistics (bs_train/recipes/plan.py)'}; "
             f"methods {','.join(recipe.methods)}; {grid}; eval batch {recipe.eval_batch_size}",
             "  model: " + ", ".join(f"{k} {v}" for k, v in asdict(shape).items())
             + f" ({shape.matmul_params / 1e6:.0f}M parameters per token)",
             "  assumptions: " + ", ".join(f"{k} {v}" for k, v in asdict(hw).items() if k != "name"),
             f"  {'stage':<9} {'items':>5} {'sequences':>10} {'tokens':>11} {'TFLOP':>8} {'decode steps':>12} "
             f"{'seconds':>8}"]
    total = 0.0
    for stage in dict.fromkeys(w.stage for w in work):
        ws = [w for w in work if w.stage == stage]
        s = sum(w.seconds for w in ws)
        total += s
        lines.append(f"  {stage:<9} {len(ws):>5} {sum(w.sequences for w in ws):>10} {sum(w.tokens for w in ws):>11} "
                     f"{sum(w.flops for w in ws) / 1e12:>8.1f} {sum(w.decode_steps for w in ws):>12} {s:>8.1f}")
    verdict = "fits" if total <= budget_s else "does NOT fit"
    lines.append(f"  total {total:.0f} s: {verdict} the {budget_s:.0f} s budget")
    return "\n".join(lines) + "\n"


def total_seconds(work: list[Work]) -> float:
    return sum(w.seconds for w in work)


# ---- MUSE and WMDP -------------------------------------------------------------------------------------------------

# SmolLM2 tokens per character of English prose, measured here on 2026-12-06 on MUSE-News / MUSE-Books and WMDP's
# questions (0.23-0.25; WMDP-cyber's code-heavy questions 0.60, MMLU 0.23) (ours): the plan reads the data's length in
# characters, not through the tokenizer.
TEXT_TOKENS_PER_CHAR = 0.24
# Tokens (SmolLM2) per split, measured the same day from ../shared/data (ours), for a plan without the data at hand.
# MUSE-News's raw retain text is not in the offline copy: taken equal to its forget text (an assumption, said).
MUSE_TOKENS = {"MUSE-News": {"raw/forget": 753_593, "raw/retain1": 753_593},
               "MUSE-Books": {"raw/forget": 1_029_682, "raw/retain1": 199_912}}
MUSE_PROBES = {"verbmem": (100, 1040), "knowmem": (100, 25), "privleak": (100, 1860)}
"""(rows, mean SmolLM2 tokens per row) of each MUSE probe split (both corpora alike within 10%; ours, measured)."""
WMDP_QUESTIONS = {"wmdp_bio": (1520, 77), "wmdp_chem": (412, 49), "wmdp_cyber": (2225, 632), "mmlu": (14042, 104)}
"""(questions, mean SmolLM2 tokens of question + choices) of the WMDP v1 files and MMLU's test set (ours, measured);
lm-eval's prompt adds ~25 tokens (the description and the A-D letters)."""
WMDP_CORPUS_WINDOWS = 10_000
"""Windows assumed in a WMDP corpus when it is not at hand (ours): any size above the recipe's 80 steps x 16 windows
plans the same, since ``train.max_steps`` bounds the run."""


class TextPlanData:
    """Window lengths of raw-text splits for ``train_work``: from a data folder when it holds the split (characters
    x ``TEXT_TOKENS_PER_CHAR``), else from ``known`` (tokens per split)."""

    def __init__(self, source: str | None, window: int, known: dict[str, int] | None = None):
        self.source, self.window, self.known, self.measured = source, window, known or {}, []

    def tokens(self, split: str) -> int:
        total = 0
        for part in split.split("+"):
            file = Path(self.source, f"{part}.jsonl") if self.source else None
            if file is not None and file.is_file():
                import json

                chars = sum(len(json.loads(line).get("text", "")) for line in file.open() if line.strip())
                total += round(chars * TEXT_TOKENS_PER_CHAR)
                self.measured.append(part)
            elif part in self.known:
                total += self.known[part]
            else:
                raise ValueError(f"plan: no length known for split {part!r}: give the data folder")
        return total

    def lengths(self, split: str) -> list[int]:
        n = max(1, math.ceil(self.tokens(split) / self.window))
        return [self.window] * n


def _forward_work(stage: str, item: str, shape: ModelShape, hw: Hardware, rows: int, mean: float, batch: int,
                  decode_tokens: int = 0) -> Work:
    """Scoring ``rows`` sequences of ``mean`` tokens in batches of ``batch``, then greedy decoding of
    ``decode_tokens`` per row, batch by batch."""
    tokens = int(rows * mean)
    flops = 2 * shape.matmul_params * tokens + _attention_flops(shape, tokens, mean, 1)
    batches = math.ceil(rows / batch)
    steps = batches * decode_tokens
    decode = _decode_s(shape, hw, steps, min(rows, batch), mean + decode_tokens / 2) if decode_tokens else 0.0
    seconds = flops / (hw.peak_tflops * 1e12 * hw.mfu) + batches * hw.score_batch_s + decode
    return Work(stage, item, rows, tokens, flops, steps, seconds)


def muse_plan(recipe, shape: ModelShape | None = None, hw: Hardware | None = None) -> list[Work]:
    """Every piece of work ``muse.run_recipe(recipe)`` would do, counted and timed."""
    from ..config import load_config
    from .muse import METHOD_ARGS, runs

    shape, hw = shape or ModelShape(), hw or Hardware()
    folder = recipe.data if Path(recipe.data).is_dir() else None
    known = MUSE_TOKENS["MUSE-Books" if "Books" in str(recipe.data) else "MUSE-News"]
    gguf, out = not Path(recipe.model).is_dir(), []

    def cfg(command: str, extra: list[str]):
        return load_config(None, ["data.benchmark=muse", "data.source=plan", *extra], command=command,
                           preset=recipe.preset if command == "unlearn" else None)

    probe = load_config(None, ["data.benchmark=muse", "data.source=plan", *recipe.finetune], command="finetune")
    data = TextPlanData(folder, probe.data.window_tokens, known)
    fine = []
    if recipe.target is None:
        fine.append(("target", f"{recipe.forget_split}+{recipe.retain_split}"))
    if recipe.retain_model is None:
        fine.append(("retain", recipe.retain_split))
    for name, split in fine:
        out.append(train_work("finetune", name, cfg("finetune", [f"data.train_split={split}", *recipe.finetune]),
                              data, shape, hw, gguf))
    out.append(_forward_work("finetune", "probe target", shape, hw, *MUSE_PROBES["verbmem"], recipe.eval_batch_size,
                             128))
    for name, method, forget, _ in runs(recipe):
        c = cfg("unlearn", [f"method.name={method}", f"data.forget_split={forget}",
                            f"data.retain_split={recipe.retain_split}", *METHOD_ARGS.get(method, ()), *recipe.unlearn])
        out.append(train_work("unlearn", name, c, data, shape, hw, False))
        out.append(in_training_work("unlearn", f"eval during {name}", c, data, shape, hw))
    for name in ("target", "retain", *(r[0] for r in runs(recipe))):
        rows = (recipe.max_rows or 10**9)
        work = [_forward_work("evaluate", name, shape, hw, min(n, rows), mean, recipe.eval_batch_size, new)
                for (n, mean), new in ((MUSE_PROBES["verbmem"], 128), (MUSE_PROBES["verbmem"], 0),
                                       (MUSE_PROBES["knowmem"], 32), (MUSE_PROBES["knowmem"], 32),
                                       (MUSE_PROBES["privleak"], 0), (MUSE_PROBES["privleak"], 0))]
        knowmem_icl = 400  # the in-context examples in front of every KnowMem question (ours, ~10 x 40 tokens)
        total = Work("evaluate", f"eval {name}", sum(w.sequences for w in work), sum(w.tokens for w in work),
                     sum(w.flops for w in work), sum(w.decode_steps for w in work),
                     sum(w.seconds for w in work) + hw.eval_s)
        total.flops += 2 * shape.matmul_params * knowmem_icl * 2 * min(MUSE_PROBES["knowmem"][0], rows)
        out.append(total)
    return [w for w in out if w is not None]  # a run without train.eval_every has no in-training work


def wmdp_plan(recipe, shape: ModelShape | None = None, hw: Hardware | None = None) -> list[Work]:
    """Every piece of work ``wmdp.run_recipe(recipe)`` would do, counted and timed. lm-eval scores the four letters
    after one shared context with one forward pass (``HFLM``'s logits cache), so a question costs one pass."""
    from ..config import load_config
    from .wmdp import METHOD_ARGS

    shape, hw = shape or ModelShape(), hw or Hardware()
    folder = recipe.data if Path(recipe.data).is_dir() else None
    forget, retain = f"{recipe.domain}-forget-corpus", f"{recipe.domain}-retain-corpus"
    probe = load_config(None, ["data.benchmark=wmdp", "data.source=plan"], command="unlearn")
    window = probe.data.window_tokens
    data = TextPlanData(folder, window, {forget: WMDP_CORPUS_WINDOWS * window, retain: WMDP_CORPUS_WINDOWS * window})
    out = []
    for method in recipe.methods:
        c = load_config(None, ["data.benchmark=wmdp", "data.source=plan", f"method.name={method}",
                               f"data.forget_split={forget}", f"data.retain_split={retain}",
                               *METHOD_ARGS.get(method, ()), *recipe.unlearn], command="unlearn", preset=recipe.preset)
        out.append(train_work("unlearn", method, c, data, shape, hw, not Path(recipe.model).is_dir()))
        out.append(in_training_work("unlearn", f"eval during {method}", c, data, shape, hw))
    for name in ("original", *recipe.methods):
        work = [_forward_work("evaluate", t, shape, hw, min(n, recipe.limit or n), mean + 25, recipe.eval_batch_size)
                for t, (n, mean) in WMDP_QUESTIONS.items() if t in recipe.tasks]
        out.append(Work("evaluate", f"eval {name}", sum(w.sequences for w in work), sum(w.tokens for w in work),
                        sum(w.flops for w in work), 0, sum(w.seconds for w in work) + hw.eval_s))
    return [w for w in out if w is not None]  # a run without train.eval_every has no in-training work


def plan_for(recipe, shape: ModelShape | None = None, hw: Hardware | None = None) -> tuple[list[Work], str]:
    """(the work, its text) of any benchmark's recipe."""
    shape, hw = shape or ModelShape(), hw or Hardware()
    kind = type(recipe).__name__
    work = {"MuseRecipe": muse_plan, "WmdpRecipe": wmdp_plan}.get(kind, recipe_plan)(recipe, shape, hw)
    return work, format_plan(work, recipe, shape, hw, recipe.budget_s)
