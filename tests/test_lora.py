"""LoRA unlearning (``model.lora_rank``) on CPU with the tiny Llama.

* every unlearning method of the method table, through ``bs-unlearn unlearn ... model.lora_rank=16``, lowers the
  forget likelihood with retain NLL within the trainer's stated bound, and only the adapters change: the merged
  export is exactly base + (alpha / r) B A of the original base weights, every other tensor bit-identical;
* the merged export reloads in plain transformers and scores the same as the base + adapter under PEFT;
* the reference with the adapters off equals the initial model exactly, and holds no weights of its own;
* activation checkpointing trains the adapters (the open-unlearning #178 trap, reentrant checkpointing included);
* a checkpoint holds only the adapters (and their optimizer state), and a resumed run continues the same loss curve;
* 2 gloo ranks under FSDP2 match one process with LoRA (KL retain: the reference runs on the sharded model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bs_train.cli import main
from bs_train.config import load_config
from bs_train.lora import AdaptersOff, apply_lora, has_adapters
from bs_train.methods import METHODS
from bs_train.model import LossHead, load_model
from bs_train.trainer import StopRun, parallelize, run
from small_runs import SMALL
from test_trainer import EXTRA, RETAIN_BOUND, answer_nll, metrics

REPO = Path(__file__).resolve().parents[1]
UNLEARN = [name for name, m in METHODS.items() if m.command == "unlearn"]
# Settings a method needs on the 2-layer tiny model, or to stay within seconds (BS-S: short greedy beliefs).
# RMU as in tests/test_trainer.py: the down_proj choice (the default is open-unlearning's all) at c = 20; PDU with
# the retain bound its config leaves to the user (test_trainer.EXTRA).
FITS_TINY = {"rmu": ["method.rmu_layer=0", "train.lr=1e-2", "method.rmu_params=down_proj", "method.rmu_coeff=20"],
             "bs_s": ["method.bss_max_new_tokens=8", "method.bss_temperature=0"],
             "pdu": list(EXTRA["pdu"]),
             # Their token weights (p^beta; SimNPO's beta / |y| at open-unlearning's beta 4.5) shrink the step: at
             # 1e-3 six adapter steps move the forget NLL by < 0.02 on the tiny model.
             **{m: ["train.lr=5e-3"] for m in ("simnpo", "wga", "satimp")}}


def _lora_cli(original: Path, out: Path, method: str) -> list[str]:
    return ["unlearn", *SMALL, f"output_dir={out}", f"model.path={original / 'final'}",
            f"data.source={original / 'data'}", f"method.name={method}", "model.lora_rank=16", "train.lr=1e-3",
            "train.max_steps=6", "train.warmup_steps=0", "train.schedule=constant", "--no-progress",
            *FITS_TINY.get(method, [])]


@pytest.mark.parametrize("method", UNLEARN)
def test_lora_unlearning_with_every_method_changes_only_the_adapters(original, method, tmp_path):
    out = tmp_path / method
    assert main(_lora_cli(original, out, method)) == 0
    data = original / "data"
    forget_before, forget_after = (answer_nll(d, data, "forget10") for d in (original / "final", out / "final"))
    assert forget_after > forget_before + 0.02, (forget_before, forget_after)  # NLL up = likelihood down
    if METHODS[method].retain is not None:
        retain_before, retain_after = (answer_nll(d, data, "retain90") for d in (original / "final", out / "final"))
        assert retain_after <= RETAIN_BOUND * retain_before, (retain_before, retain_after)
    base = load_file(str(original / "final" / "model.safetensors"))
    merged = load_file(str(out / "final" / "model.safetensors"))
    adapter = load_file(str(out / "final" / "adapter" / "adapter_model.safetensors"))
    scale = json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())["lora_alpha"] / 16
    assert sorted(merged) == sorted(base)  # a plain model: no base_layer / lora_ names
    trained = set()
    for key, w in base.items():
        a = adapter.get(f"base_model.model.{key.removesuffix('.weight')}.lora_A.weight")
        if a is None:  # no adapter: bit-identical to the original
            assert torch.equal(merged[key], w), key
            continue
        b = adapter[f"base_model.model.{key.removesuffix('.weight')}.lora_B.weight"]
        assert torch.equal(merged[key], (w.float() + scale * (b.float() @ a.float())).to(w.dtype)), key
        if b.abs().max() > 0:
            trained.add(key)
    assert trained and "lm_head.weight" not in trained
    if method == "rmu":  # RMU trains only the down_proj adapters of layers l-2..l = 0
        assert trained == {"model.layers.0.mlp.down_proj.weight"}, trained


def test_merged_export_reloads_without_peft_and_scores_like_the_adapter(original, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "npo"
    assert main(_lora_cli(original, out, "npo") + ["train.max_steps=2"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(str(out / "final"))  # no peft involved
    assert not any("lora" in n for n, _ in plain.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(original / "final")),
                                        str(out / "final" / "adapter"))
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, adapted(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(original / "final"))(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - base).abs().max() > 1e-3  # the adapter did change the model
    assert answer_nll(out / "final", original / "data", "forget10") > answer_nll(original / "final",
                                                                              original / "data", "forget10")


def test_reference_with_adapters_off_is_the_initial_model_exactly():
    initial, _ = load_model("tiny")
    lm, _ = load_model("tiny")
    cfg = load_config(None, ["model.lora_rank=4"], command="unlearn")
    apply_lora(lm, cfg.model)
    head = LossHead(lm)
    ids = torch.randint(0, lm.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = LossHead(initial)(ids, mask, lambda h, w, a: (h, a), layer=0)
        for name, p in lm.named_parameters():  # trained adapters: B != 0
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ref = AdaptersOff(head)
    got = ref(ids, mask, lambda h, w, a: (h, a), layer=0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with torch.no_grad():
        adapted = head(ids, mask, lambda h, w, a: h)
    assert (adapted - want[0]).abs().max() > 1e-3  # adapters back on after the reference call
    assert not isinstance(ref, torch.nn.Module)  # holds the trained head, no second copy of the weights
    assert all(p.requires_grad == ("lora_" in n) for n, p in lm.named_parameters())  # flags left as they were


@pytest.mark.parametrize("reentrant", [False, True], ids=["trainer", "reentrant"])
def test_activation_checkpointing_trains_the_adapters(reentrant):
    """With frozen embeddings the embedding output needs no grad; under reentrant checkpointing every recomputed
    block then yields no gradient and LoRA never trains (open-unlearning #178). ``parallelize`` calls
    ``enable_input_require_grads``; the adapters of every block get nonzero gradients."""
    lm, _ = load_model("tiny")
    cfg = load_config(None, ["model.lora_rank=4", "train.activation_checkpointing=true"], command="unlearn")
    apply_lora(lm, cfg.model)
    head = parallelize(LossHead(lm), cfg, 1, None)
    if reentrant:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert lm.model.gradient_checkpointing
    ids = torch.randint(0, lm.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # so that lora_A gets gradient too
    head(ids, torch.ones_like(ids), lambda h, lm, a: lm.logits(h).logsumexp(-1).mean()).backward()
    grads = {n: p.grad for n, p in lm.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not g.abs().max() > 0]
    assert all(p.grad is None for n, p in lm.named_parameters() if not p.requires_grad)


def test_adapter_checkpoint_resumes_the_same_loss_curve(original, tmp_path):
    args = SMALL + [f"model.path={original / 'final'}", f"data.source={original / 'data'}", "method.name=graddiff",
                    "method.retain=kl", "model.lora_rank=8", "train.lr=5e-3", "train.max_steps=5",
                    "train.checkpoint_every=2", "train.export=false"]
    run(load_config(None, args + [f"output_dir={tmp_path / 'full'}"], command="unlearn"), progress=False)
    cut = load_config(None, args + [f"output_dir={tmp_path / 'cut'}"], command="unlearn")
    with pytest.raises(StopRun):
        run(cut, progress=False, stop_after=3)  # the last checkpoint is step 2
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(tmp_path / "cut" / "checkpoints" / "step_0000002")).read_metadata()
    model_keys = [k for k in saved.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys  # adapters only, no base weights
    assert any(k.startswith("optim.state.") for k in saved.state_dict_metadata)
    run(cut, progress=False)
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for ma, mb in zip(a, b):
        for key in ("loss", "forget", "retain", "grad_norm"):
            assert abs(ma[key] - mb[key]) <= 1e-5 * max(1.0, abs(ma[key])), (key, ma, mb)


def test_fsdp2_two_ranks_match_one_process_with_lora(original, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    common = ["unlearn", f"model.path={original / 'final'}", f"data.source={original / 'data'}", "train.lr=5e-3",
              "train.max_steps=3", "train.batch_size=2", "method.name=npo", "method.retain=kl", "model.lora_rank=8",
              "train.activation_checkpointing=true", "--no-progress"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "bs_train.cli", *common,
           f"output_dir={tmp_path / 'two'}", "train.grad_accum=1", "train.export=true"]
    one = [sys.executable, "-m", "bs_train.cli", *common, f"output_dir={tmp_path / 'one'}", "train.grad_accum=2",
           "train.export=true"]
    for cmd in (two, one):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for ma, mb in zip(a, b):
        for key in ("loss", "forget", "retain", "grad_norm"):
            assert abs(ma[key] - mb[key]) <= 1e-4 * max(1.0, abs(mb[key])), (key, ma, mb)
    wa, wb = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("two", "one"))
    for key in wb:  # the sharded export gathers and merges the same model
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


def test_memory_plan_fills_in_only_what_the_config_leaves_unset():
    cfg = load_config(None, ["train.memory_plan=lora24", "train.batch_size=2"], command="unlearn")
    assert (cfg.model.lora_rank, cfg.model.dtype, cfg.train.activation_checkpointing) == (16, "bfloat16", True)
    assert cfg.train.batch_size == 2 and cfg.train.grad_accum == 8  # set wins; unset comes from the plan
    off = load_config(None, ["train.memory_plan=offload40"], command="unlearn")
    assert off.train.cpu_offload and off.train.optimizer == "adamw_bf16_sr" and off.model.lora_rank == 0
    with pytest.raises(ValueError, match="train.memory_plan must be one of"):
        load_config(None, ["train.memory_plan=lora12"], command="unlearn")
    with pytest.raises(ValueError, match="lm_head"):
        load_config(None, ["model.lora_rank=4", "model.lora_targets=q_proj,lm_head"], command="unlearn")
    assert not has_adapters(load_model("tiny")[0])


def test_cpu_offload_gives_the_curve_of_the_model_on_the_device(original, tmp_path):
    """``train.cpu_offload=true`` (the 40 GB plan's FSDP2 ``CPUOffloadPolicy``, in a 1-rank process group) only moves
    where parameters, gradients and optimizer state live: the loss curve is the one without it."""
    import torch.distributed as dist

    args = SMALL + [f"model.path={original / 'final'}", f"data.source={original / 'data'}", "method.name=graddiff",
                    "train.lr=1e-3", "train.max_steps=2", "train.export=false"]
    run(load_config(None, args + [f"output_dir={tmp_path / 'on'}"], command="unlearn"), progress=False)
    try:
        run(load_config(None, args + [f"output_dir={tmp_path / 'off'}", "train.cpu_offload=true"],
                        command="unlearn"), progress=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for ma, mb in zip(metrics(tmp_path / "on"), metrics(tmp_path / "off"), strict=True):
        for key in ("loss", "forget", "retain", "grad_norm"):
            assert abs(ma[key] - mb[key]) <= 1e-5 * max(1.0, abs(ma[key])), (key, ma, mb)
