"""The trainer end to end on CPU with a tiny Llama and the generated dataset.

* fine-tuning lowers the answer NLL;
* unlearning with every method lowers the forget log-likelihood, and where a retain term is used the retain NLL
  stays within the bound stated below;
* a 2-rank gloo FSDP2 run gives the 1-process loss curve (same effective batch);
* a run stopped mid-way and resumed from its checkpoint reproduces the uninterrupted loss curve;
* bad configs and malformed data fail with clear errors before training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor
from safetensors.torch import load_file

import bs_kernels as bk
from bs_train.config import load_config
from bs_train.data import QADataset, collate, load_qa
from bs_train.methods import needs_retain
from bs_train.model import LossHead, decoder_blocks, load_model
from bs_train.trainer import NonFiniteError, StopRun, frozen_reference, run

REPO = Path(__file__).resolve().parents[1]
from small_runs import SMALL

# Stated bound: with its retain term, a method may raise the retain NLL by at most this factor in the 6-step runs
# below (the synthetic authors share templates, so some spill-over is expected). Measured on 2026-11-23: 1.1x
# (GradDiff) to 1.6x (NPO), while GA, which has no retain term, reaches 3.1x with the same settings.
RETAIN_BOUND = 1.75


def answer_nll(model_dir: Path, data_dir: Path, split: str) -> float:
    """Mean per-token NLL of a split's answers under a saved model."""
    model, tok = load_model(str(model_dir))
    ds = QADataset(load_qa(str(data_dir), split), tok, max_length=256, name=split)
    b = collate([ds[i] for i in range(len(ds))], tok.pad_token_id)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        return float(bk.linear_cross_entropy(hidden, model.lm_head.weight, b["labels"], shift=True, impl="torch"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]



def test_finetune_lowers_answer_nll(original):
    before = answer_nll_of_initial(original)
    after = answer_nll(original / "final", original / "data", "full")
    assert after < before - 1.0, (before, after)
    assert json.loads((original / "summary.json").read_text())["steps"] == 12 * 5


def answer_nll_of_initial(original: Path) -> float:
    """NLL of the untrained tiny model (same seed) on the same data: save it once and measure it."""
    model, tok = load_model("tiny")
    path = original.parent / "initial"
    if not path.exists():
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return answer_nll(path, original / "data", "full")


METHODS = ["ga", "graddiff", "npo", "simnpo", "wga", "bs_t", "rmu", "dpo", "undial", "ceu", "satimp", "pdu"]


# PDU's retain constraint: eps a little above the original's retain NLL (about 1.95 here), the dual moving from the
# first step and starting at 50 (its README: 50 to 100); with PDU.yaml's 5 warm-up epochs and lambda = 1 the
# flattening loss alone took the retain NLL from 1.95 to 7.3 in these 6 steps.
EXTRA = {"pdu": ("method.pdu_retain_eps=2.0", "method.pdu_dual_warmup_epochs=0", "method.alpha=50")}


@pytest.mark.parametrize("method", METHODS)
def test_unlearning_lowers_forget_likelihood(original, method, tmp_path):
    data = original / "data"
    cfg = load_config(None, SMALL + [
        f"output_dir={tmp_path / method}", f"model.path={original / 'final'}", f"data.source={data}",
        f"method.name={method}", "method.rmu_layer=0", "method.rmu_coeff=20", "method.rmu_params=down_proj",
        *EXTRA.get(method, ()),
        f"train.lr={5e-3 if method == 'rmu' else 5e-4}", "train.max_steps=6",
        "train.warmup_steps=0", "train.schedule=constant"], command="unlearn")
    run(cfg, progress=False)
    forget_before = answer_nll(original / "final", data, "forget10")
    forget_after = answer_nll(tmp_path / method / "final", data, "forget10")
    if method == "rmu":  # only mlp.down_proj of layers l-2..l = 0 trains; everything else is the original's
        before, after = (load_file(str(d / "final" / "model.safetensors")) for d in (original, tmp_path / method))
        changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
        assert changed == ["model.layers.0.mlp.down_proj.weight"], changed
    assert forget_after > forget_before + 0.02, (forget_before, forget_after)  # NLL up = likelihood down
    if needs_retain(cfg.method):  # GA and CE-U have no retain term
        retain_before = answer_nll(original / "final", data, "retain90")
        retain_after = answer_nll(tmp_path / method / "final", data, "retain90")
        assert retain_after <= RETAIN_BOUND * retain_before, (retain_before, retain_after)


def _unlearn_args(original: Path, out: Path, extra: list[str]) -> list[str]:
    return ["unlearn", f"output_dir={out}", f"model.path={original / 'final'}", f"data.source={original / 'data'}",
            "train.lr=1e-3", "train.max_steps=4", "train.batch_size=2", "train.export=false", "--no-progress", *extra]


# BS-S with greedy beliefs: the 2-rank run samples half of the prompts on each rank and gathers them, so its
# beliefs (and curve) must equal the single process's. One prompt per round gives the two ranks different numbers of
# sampler calls (3 and 2), which must not desynchronise their collectives.
# KL retain, RMU and BS-S's NPO base (scoring round-2 beliefs) also run the frozen reference, whose blocks are
# sharded too (``frozen_reference``). IdkDPO scores its refusals under the initial model on every rank before the
# first step (``prepare_method_state``); UNDIAL distils from the sharded reference.
@pytest.mark.parametrize("method", [["method.name=bs_t"],
                                    ["method.name=bs_s", "method.bss_temperature=0", "method.bss_max_new_tokens=8",
                                     "method.bss_regen=steps", "method.bss_regen_every=2",
                                     "method.bss_prompts_per_round=1"],
                                    ["method.name=bs_s", "method.bss_base=npo", "method.bss_temperature=0",
                                     "method.bss_max_new_tokens=8", "method.bss_regen=steps",
                                     "method.bss_regen_every=2"],
                                    ["method.name=graddiff", "method.retain=kl"],
                                    ["method.name=rmu", "method.rmu_layer=0"],
                                    ["method.name=dpo"], ["method.name=undial"], ["method.name=ceu"],
                                    ["method.name=satimp"],
                                    ["method.name=pdu", "method.pdu_retain_eps=1.0",
                                     "method.pdu_dual_warmup_epochs=0"],
                                    ["method.name=altpo", "method.bss_temperature=0", "method.bss_max_new_tokens=8",
                                     "method.bss_samples=2"]],
                         ids=["bs_t", "bs_s", "bs_s_npo", "kl_retain", "rmu", "dpo", "undial", "ceu", "satimp", "pdu",
                              "altpo"])
def test_fsdp2_two_ranks_match_one_process(original, tmp_path, method):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "bs_train.cli",
           *_unlearn_args(original, tmp_path / "fsdp", ["train.grad_accum=1", *method])]
    one = [sys.executable, "-m", "bs_train.cli",
           *_unlearn_args(original, tmp_path / "single", ["train.grad_accum=2", *method])]
    for cmd in (two, one):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(tmp_path / "fsdp"), metrics(tmp_path / "single")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        for key in ("loss", "forget", "retain", "grad_norm"):
            assert abs(ma[key] - mb[key]) <= 1e-4 * max(1.0, abs(mb[key])), (key, ma, mb)
        assert ma.get("belief_round") == mb.get("belief_round")
        assert ("dual" in ma) == ("dual" in mb) and abs(ma.get("dual", 0) - mb.get("dual", 0)) <= 1e-4 * max(
            1.0, abs(mb.get("dual", 0))), (ma, mb)  # PDU's dual variable follows the same global retain loss


def test_resume_reproduces_uninterrupted_curve(original, tmp_path):
    args = SMALL + [f"model.path={original / 'final'}", f"data.source={original / 'data'}", "method.name=npo",
                    "train.lr=1e-3", "train.max_steps=6", "train.checkpoint_every=2", "train.export=false",
                    "train.squeezing_every=3", "train.squeezing_beliefs=2", "train.squeezing_max_new_tokens=6"]
    full = load_config(None, args + [f"output_dir={tmp_path / 'full'}"], command="unlearn")
    run(full, progress=False)
    cut = load_config(None, args + [f"output_dir={tmp_path / 'cut'}"], command="unlearn")
    with pytest.raises(StopRun):
        run(cut, progress=False, stop_after=5)  # killed after step 5; the last checkpoint is step 4
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step_0000004"
    assert not list((tmp_path / "cut" / "checkpoints").glob("*.tmp"))
    run(cut, progress=False)  # resumes from step 4
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for ma, mb in zip(a, b):
        for key in ("loss", "forget", "retain", "lr"):
            assert abs(ma[key] - mb[key]) <= 1e-5 * max(1.0, abs(ma[key])), (key, ma, mb)
    # the squeezing monitor resumes too: the same beliefs, and its curve continues rather than restarting
    sa, sb = (json.loads((tmp_path / run / "squeezing.json").read_text()) for run in ("full", "cut"))
    assert sa["beliefs"] == sb["beliefs"]
    assert [h["step"] for h in sa["history"]] == [h["step"] for h in sb["history"]] == [0, 3, 6]
    for ha, hb in zip(sa["history"], sb["history"]):
        for key, value in ha.items():
            assert value == pytest.approx(hb[key], rel=1e-5, abs=1e-6), (key, ha, hb)


def test_resume_refuses_a_different_config(original, tmp_path):
    args = SMALL + [f"model.path={original / 'final'}", f"data.source={original / 'data'}", "method.name=ga",
                    "train.max_steps=2", "train.export=false", f"output_dir={tmp_path / 'r'}"]
    run(load_config(None, args, command="unlearn"), progress=False)
    with pytest.raises(ValueError, match=r"other settings \(train.lr: 1e-05 -> 5e-05\)"):
        run(load_config(None, args + ["train.lr=5e-5"], command="unlearn"), progress=False)


def test_starting_over_sets_the_old_run_aside_and_never_resumes_from_it(original, tmp_path):
    """--no-resume used to leave the old checkpoints in place while overwriting config.yaml, so a new run cut off
    before its first checkpoint "resumed" from the old run's and returned the old model. The old run is now moved to
    replaced/<time>/ (nothing deleted), and a checkpoint carries the config that wrote it."""
    out = tmp_path / "r"
    args = SMALL + [f"model.path={original / 'final'}", f"data.source={original / 'data'}", "method.name=ga",
                    "train.max_steps=4", f"output_dir={out}"]
    old = run(load_config(None, args + ["train.lr=1e-5"], command="unlearn"), progress=False)
    new_cfg = load_config(None, args + ["train.lr=1e-3"], command="unlearn")
    with pytest.raises(StopRun):
        run(new_cfg, resume=False, progress=False, stop_after=2)  # no checkpoint of the new run yet
    (aside,) = (out / "replaced").iterdir()
    assert (aside / "final" / "model.safetensors").exists() and (aside / "metrics.jsonl").exists()
    assert json.loads((aside / "summary.json").read_text()) == old
    assert not (out / "checkpoints").exists() and not (out / "final").exists()
    run(new_cfg, progress=False)  # starts from step 0: nothing of the old run is resumable
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert metrics(out)[0]["lr"] == pytest.approx(100 * metrics(aside)[0]["lr"])  # the new run's lr throughout


def test_rerunning_a_finished_run_keeps_its_summary_and_model(original, tmp_path):
    out = tmp_path / "r"
    cfg = load_config(None, SMALL + [f"model.path={original / 'final'}", f"data.source={original / 'data'}",
                                     "method.name=ga", "train.max_steps=2", f"output_dir={out}"], command="unlearn")
    first = run(cfg, progress=False)
    weights = (out / "final" / "model.safetensors").read_bytes()
    again = run(cfg, progress=False)  # finished: its summary stands, nothing is retrained or rewritten
    assert again["final"] == first["final"] and again["final"]["step"] == 2
    assert not (out / "final.tmp").exists() and (out / "final" / "model.safetensors").read_bytes() == weights
    assert not (out / "checkpoints").exists()  # train.keep_checkpoints=false: deleted once final/ was exported


def test_synthetic_data_follows_its_settings(tmp_path):
    from bs_train.trainer import build_data
    from bs_train.tiny import byte_tokenizer

    def rows(authors):
        cfg = load_config(None, ["data.source=synthetic", f"data.synthetic_authors={authors}",
                                 "data.synthetic_qa_per_author=5", "data.forget_split=full"], command="unlearn")
        return len(build_data(cfg, byte_tokenizer(), tmp_path)[0])

    assert rows(4) == 20 and rows(10) == 50  # the second config does not reuse the first one's data


@pytest.mark.parametrize("overrides, match", [
    (["train.lr=abc"], "train.lr must be float"),
    (["train.lr=-1"], "train.lr must be > 0"),
    (["method.name=orpo"], "method.name must be one of"),
    (["method.bst_lam=1.5"], "bst_lam"),
    (["train.bogus=1"], r"unknown key\(s\) \['bogus'\] in section 'train'"),
    (["nonsense=1"], "unknown top-level key"),
    (["train.batch_size=0"], "batch_size"),
    (["method.wga_beta=nan"], "method.wga_beta must be a finite number"),
    (["method.ceu_ignore_first=3"], "method.ceu_ignore_first must be 0, 1 or 2, got 3"),
    (["train.lr=inf"], "train.lr must be a finite number"),
    (["train.weight_decay=-1"], "train.weight_decay must be >= 0"),
    (["trainlr"], "must look like section.key=value"),
])
def test_bad_config_is_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides, command="unlearn")


def _write(folder: Path, split: str, rows: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.mark.parametrize("forget_rows, match", [
    ([{"question": "Who?", "answer": "Me."}, {"question": "Where?"}], "answer"),
    ([], "empty"),
    (['{"question": "Who?", "answer": '], "forget10.jsonl"),
    ([{"question": "Who?", "answer": "word " * 400}], "max_length|longer|exceeds"),
])
def test_malformed_data_fails_before_training(tmp_path, forget_rows, match):
    data = tmp_path / "data"
    _write(data, "forget10", forget_rows)
    _write(data, "retain90", [{"question": "Q?", "answer": "A."}])
    cfg = load_config(None, SMALL + [f"output_dir={tmp_path / 'run'}", f"data.source={data}"], command="unlearn")
    with pytest.raises(ValueError, match=match):
        run(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_reports_a_run_error_in_one_line(tmp_path, capsys):
    from bs_train.cli import main

    data = tmp_path / "data"
    _write(data, "forget10", ['{"question": "Who?", "answer": '])
    _write(data, "retain90", [{"question": "Q?", "answer": "A."}])
    code = main(["unlearn", *SMALL, f"output_dir={tmp_path / 'run'}", f"data.source={data}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("bs-unlearn: error:") and "forget10.jsonl" in err
    assert "Traceback" not in err


def test_frozen_reference_is_sharded_in_the_compute_dtype(tmp_path):
    """Under a process group the reference's blocks become FSDP2 shards (DTensors) and everything is bf16 and frozen,
    while the trained model is left as it was; its forward still runs (a 1-rank gloo group stands in for torchrun)."""
    lm, _ = load_model("tiny")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ref = frozen_reference(lm, torch.device("cpu"), torch.bfloat16)
        assert all(isinstance(p, DTensor) for b in decoder_blocks(ref.lm) for p in b.parameters())
        assert not isinstance(ref.lm.lm_head.weight, DTensor)  # the root stays whole (retain_kl reads lm_head)
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref.parameters())
        assert all(p.dtype == torch.float32 and p.requires_grad for p in lm.parameters())
        assert ref.lm.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep their dtype
        ids = torch.randint(0, lm.config.vocab_size, (2, 7))
        with torch.no_grad():
            hidden = ref(ids, torch.ones_like(ids), lambda h, w, _: h)
        assert hidden.shape == (2, 7, lm.config.hidden_size) and hidden.dtype == torch.bfloat16
    finally:
        dist.destroy_process_group()


def test_bf16_load_casts_parameters_and_keeps_rope_in_fp32():
    """model.dtype=bfloat16 casts the parameters only, as from_pretrained(dtype=...) does: RoPE's inv_freq rounded to
    bf16 would shift the rotary angles, and the bf16 model would drift from its fp32 self with position."""
    ref, _ = load_model("tiny")
    bf16, _ = load_model("tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(bf16.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq, rtol=0, atol=0)


def test_a_nonfinite_loss_stops_the_run_before_anything_corrupted_is_saved(original, tmp_path, capsys):
    """GA at an absurd learning rate drives the loss to -inf / NaN: the run stops with an error that names the step
    and the last good checkpoint, and every checkpoint on disk holds finite weights. The command line says it in one
    line, without a traceback, and exits with 5."""
    args = SMALL + [f"model.path={original / 'final'}", f"data.source={original / 'data'}", "method.name=ga",
                    "train.lr=1e4", "train.max_steps=20", "train.warmup_steps=0", "train.schedule=constant"]
    run_dir = tmp_path / "diverged"
    cfg = load_config(None, args + [f"output_dir={run_dir}", "train.checkpoint_every=1", "train.log_every=5"],
                      command="unlearn")
    with pytest.raises(NonFiniteError, match=r"by step \d+ .*last good checkpoint is .*step_"):
        run(cfg, progress=False)
    assert not (run_dir / "final").exists()
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    state = {"model": get_model_state_dict(LossHead(load_model(str(original / "final"))[0]))}
    dcp.load(state, checkpoint_id=str(latest))
    assert all(torch.isfinite(v).all() for v in state["model"].values())

    from bs_train.cli import main

    assert main(["unlearn", "--no-progress", *args, f"output_dir={tmp_path / 'cli'}"]) == 5
    err = capsys.readouterr().err
    assert "bs-unlearn: non-finite loss or gradient" in err and "Traceback" not in err
