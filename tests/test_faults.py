"""Faults on purpose: kills inside save and export, damaged checkpoint files, a full disk, two writers on one run
folder, and the errors a user can cause with files and paths.

Each test asserts what a user needs after the fault: the rerun resumes onto the uninterrupted run's loss curve, or
the command stops with a one-line error and exit code 2; and nothing complete was deleted. Kills are real SIGKILLs of
a subprocess at the points ``checkpoint.fault_point`` names (``BS_UNLEARN_KILL_AT``), and, to sweep every point
cheaply, an exception raised at the same points in-process: save and export have no cleanup code that it could run
and a kill could not, except the run folder's lock (released on the way out), which the SIGKILL tests cover. The full
disk is a real tmpfs where the test can mount one (root in its own mount namespace); a writer patched to fail with
ENOSPC covers the write path everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bs_train import checkpoint
from bs_train.checkpoint import DiskFull, damage, latest_checkpoint
from bs_train.config import load_config
from bs_train.run_lock import LOCK
from bs_train.trainer import StopRun, run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from small_runs import SMALL  # noqa: E402

# A 6-step fine-tune of the tiny model with checkpoints at steps 2 and 4 (and 6, at the end, when export is off).
ARGS = [*SMALL, "model.path=tiny", "train.max_steps=6", "train.checkpoint_every=2", "train.export=false",
        "train.lr=1e-3"]


def _cfg(out: Path, *extra: str):
    return load_config(None, [*ARGS, f"output_dir={out}", *extra], command="finetune")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_curve(run_dir: Path, reference: list[dict]) -> None:
    got = _metrics(run_dir)
    assert [m["step"] for m in got] == [m["step"] for m in reference] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The uninterrupted run's metrics."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    run(_cfg(out), progress=False)
    return _metrics(out)


@pytest.fixture(scope="module")
def cut(tmp_path_factory) -> Path:
    """A run stopped after step 4: complete checkpoints step_0000002 and step_0000004. Tests work on copies (a
    copied run folder resumes: its identity is its settings, not its path)."""
    out = tmp_path_factory.mktemp("faults") / "cut"
    with pytest.raises(StopRun):
        run(_cfg(out), progress=False, stop_after=4)
    return out


@pytest.fixture
def copy(cut, tmp_path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(cut, dest)
    return dest


# ---- kills -------------------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Raised at a fault point: unwinds past every ``except Exception``, as a kill leaves a save."""


SAVE_POINTS = ["save:begin", "save:weights", "save:state", "save:manifest", "save:before_rename", "save:renamed",
               "save:pointer"]
EXPORT_POINTS = ["export:begin", "export:written", "export:manifest", "export:renamed"]


@pytest.mark.parametrize("point", SAVE_POINTS + EXPORT_POINTS)
def test_a_kill_at_any_point_of_save_or_export_resumes_onto_the_same_curve(copy, reference, point, monkeypatch):
    """The run resumed from step 4 is killed while it saves its end-of-run checkpoint (step 6) or exports final/;
    at that moment a complete checkpoint of step >= 4 is on disk, and the rerun finishes on the uninterrupted curve
    with a complete final/ and no leftovers."""
    def hit(name: str) -> None:
        if name == point:
            raise Killed(name)

    finish = ("train.export=true", "train.keep_checkpoints=true")  # not part of the run's identity
    monkeypatch.setattr(checkpoint, "fault_point", hit)
    with pytest.raises(Killed):
        run(_cfg(copy, *finish), progress=False)
    monkeypatch.undo()
    survivor = latest_checkpoint(copy, say=None)
    assert survivor is not None and int(survivor.name[5:]) >= 4
    assert damage(copy / "checkpoints" / "step_0000004") is None  # the newest complete one before the save
    summary = run(_cfg(copy, *finish), progress=False)
    assert summary["steps"] == 6
    _same_curve(copy, reference)
    assert damage(copy / "final") is None
    assert not [p.name for p in copy.iterdir() if p.name.endswith((".tmp", ".old"))]
    assert not list((copy / "checkpoints").glob("*.tmp"))


@pytest.fixture
def ctrl_c(monkeypatch):
    """``ctrl_c(method, n)``: from inside the dcp filesystem writer's or reader's ``method`` (deep in a save or load,
    where dcp wraps every exception), the process sends itself SIGINT ``n`` times, as Ctrl-C pressed n times there.
    Python's own SIGINT handler is put in place first (a shell that starts pytest in the background ignores SIGINT)."""
    from torch.distributed.checkpoint import filesystem

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    classes = {"write_data": filesystem.FileSystemWriter, "read_data": filesystem.FileSystemReader}
    originals = {method: getattr(cls, method) for method, cls in classes.items()}

    def arm(method: str, n: int) -> None:
        cls, real = classes[method], originals[method]

        def pressed(self, *a, **k):
            for _ in range(n):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs between bytecodes: each press is handled before the next
            return real(self, *a, **k)

        monkeypatch.setattr(cls, method, pressed)

    yield arm
    monkeypatch.undo()
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_a_save_finishes_the_save_then_stops(copy, reference, ctrl_c, capsys):
    """Ctrl-C while dcp writes the step-6 checkpoint: the save completes (the step just saved is the one a rerun
    resumes from) and the run stops with a KeyboardInterrupt, which the CLI turns into its one line and exit 130;
    dcp wraps it in a CheckpointException, which once ended the command in a traceback."""
    ctrl_c("write_data", 1)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(copy), progress=False)
    assert "interrupted: finishing the checkpoint of step 6 first (Ctrl-C again to stop now)" in capsys.readouterr().err
    assert latest_checkpoint(copy, say=None) == copy / "checkpoints" / "step_0000006"
    assert not list((copy / "checkpoints").glob("*.tmp"))
    _same_curve(copy, reference)


def test_a_second_ctrl_c_inside_a_save_stops_at_once_and_loses_nothing(copy, reference, ctrl_c):
    """Ctrl-C twice while dcp writes the step-6 checkpoint: the run stops at once, a KeyboardInterrupt (not dcp's
    CheckpointException); the cut-off save never counts, step 4 stays the newest complete one and the rerun ends
    on the uninterrupted curve."""
    ctrl_c("write_data", 2)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(copy), progress=False)
    assert latest_checkpoint(copy, say=None) == copy / "checkpoints" / "step_0000004"
    ctrl_c("write_data", 0)
    run(_cfg(copy), progress=False)
    _same_curve(copy, reference)


def test_ctrl_c_while_a_resume_loads_is_an_interrupt_not_a_damaged_checkpoint(copy, reference, ctrl_c):
    """Ctrl-C while dcp reads the checkpoint a resume starts from stops the run as Ctrl-C anywhere else does; it
    once came back as "its weights cannot be read", naming a whole checkpoint damaged."""
    ctrl_c("read_data", 1)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(copy), progress=False)
    assert damage(copy / "checkpoints" / "step_0000004") is None
    ctrl_c("read_data", 0)
    run(_cfg(copy), progress=False)
    _same_curve(copy, reference)


def _cli(out: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if kill_at:
        env[checkpoint.FAULT_ENV] = kill_at
    cmd = [sys.executable, "-m", "bs_train.cli", "finetune", *ARGS, f"output_dir={out}", "--no-progress", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_sigkill_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path, reference, capsys):
    """A real SIGKILL while the step-4 checkpoint's weights are written (no manifest yet): the run folder keeps the
    complete step 2; the rerun takes over the dead process's lock, says so, and resumes onto the same curve."""
    out = tmp_path / "r"
    proc = _cli(out, kill_at="save:weights@2")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "checkpoints" / "step_0000004.tmp").is_dir()  # the cut-off save
    assert latest_checkpoint(out, say=None).name == "step_0000002"
    pid = json.loads((out / LOCK).read_text())["pid"]
    from bs_train.cli import main

    assert main(["finetune", *ARGS, f"output_dir={out}", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"taking over {out / LOCK} from PID {pid}, which is no longer running" in said
    _same_curve(out, reference)
    assert not (out / LOCK).exists()


def test_sigkill_while_a_finished_run_re_exports_loses_nothing(tmp_path, capsys):
    """The issue's replay: a finished run is rerun (here: its summary is gone, as after a kill between export and
    summary) and killed after the old final/ was moved aside for the new one. Both complete copies stay on disk; the
    next run puts one back, says so, and finishes with the first run's summary, no final.tmp / final.old left."""
    out = tmp_path / "r"
    keep = ("train.export=true", "train.keep_checkpoints=true")
    first = run(_cfg(out, *keep), progress=False)
    (out / "summary.json").unlink()
    proc = _cli(out, *keep, kill_at="export:old_aside")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "final").exists()
    assert damage(out / "final.tmp") is None and damage(out / "final.old") is None
    assert latest_checkpoint(out, say=None).name == "step_0000006"
    again = run(_cfg(out, *keep), progress=False)
    assert "restored from final.tmp" in capsys.readouterr().out
    assert again["final"] == first["final"]
    assert damage(out / "final") is None and not (out / "final.tmp").exists() and not (out / "final.old").exists()


# ---- damaged files -----------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bad_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = b"\xffGARBAGE"
    path.write_bytes(bytes(data))


def _flip_inside(path: Path) -> None:  # same size, one byte in the middle of the tensor data
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": ("__0_0.distcp", _truncate),
    "bad bytes inside the weights": ("__0_0.distcp", _flip_inside),
    "bad header of .metadata": (".metadata", _bad_header),
    "truncated .metadata": (".metadata", _truncate),
    "truncated trainer_state.pt": ("trainer_state.pt", _truncate),
    "empty RNG file": ("rng_rank0.pt", lambda p: p.write_bytes(b"")),
    "no manifest": ("manifest.json", lambda p: p.unlink()),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_and_says_why(copy, reference, kind, capsys):
    name, spoil = DAMAGE[kind]
    spoil(copy / "checkpoints" / "step_0000004" / name)
    run(_cfg(copy), progress=False)
    said = capsys.readouterr().out
    assert f"resuming from {copy / 'checkpoints' / 'step_0000002'}: step_0000004 is damaged: " in said
    assert (name in said) if name != "manifest.json" else ("no manifest.json" in said)
    _same_curve(copy, reference)


def test_no_complete_checkpoint_is_one_line_exit_2_and_deletes_nothing(copy, capsys):
    from bs_train.cli import main

    for step in ("step_0000002", "step_0000004"):
        _truncate(copy / "checkpoints" / step / "trainer_state.pt")
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    assert main(["finetune", *ARGS, f"output_dir={copy}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no complete checkpoint in" in err
    assert "step_0000004 is damaged: trainer_state.pt has" in err and "step_0000002 is damaged" in err
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before


def test_latest_naming_a_missing_checkpoint_falls_back(copy, reference, capsys):
    (copy / "checkpoints" / "latest").write_text("step_0000009")
    run(_cfg(copy), progress=False)
    assert "`latest` names step_0000009, which is not there" in capsys.readouterr().out
    _same_curve(copy, reference)


def test_metrics_cut_off_mid_line_are_repaired_on_resume(copy, reference, capsys):
    """A kill mid-write leaves half a line; steps logged after the checkpoint are dropped too (they rerun)."""
    with (copy / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
    run(_cfg(copy), progress=False)
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().out
    _same_curve(copy, reference)


# ---- a full disk ---------------------------------------------------------------------------------------------


def test_too_little_free_space_is_named_before_writing(copy, monkeypatch, capsys):
    from bs_train.cli import main

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    assert main(["finetune", *ARGS, f"output_dir={copy}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"no space left on {copy / 'checkpoints'}: need ~" in err and " GB" in err
    assert not (copy / "checkpoints" / "step_0000006.tmp").exists()
    assert damage(copy / "checkpoints" / "step_0000004") is None


def test_enospc_while_writing_removes_only_the_partial_save(copy, reference, monkeypatch):
    """The disk fills up mid-write (simulated: torch.save writes a little, then fails with ENOSPC, as a full
    filesystem makes it): the error says so, only the partial step_0000006.tmp is removed, and the run resumes."""
    real_save = torch.save

    def full(obj, f, *a, **k):
        if not isinstance(f, (str, os.PathLike)):  # dcp serialises small objects into memory first
            return real_save(obj, f, *a, **k)
        Path(f).write_bytes(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFull, match=r"no space left on .*checkpoints: need ~"):
        run(_cfg(copy), progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert not (copy / "checkpoints" / "step_0000006.tmp").exists()
    assert damage(copy / "checkpoints" / "step_0000004") is None and damage(copy / "checkpoints" / "step_0000002") is None
    run(_cfg(copy), progress=False)
    _same_curve(copy, reference)


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs to mount a tmpfs (root in a mount namespace)")
def test_a_real_small_filesystem_gives_a_one_line_no_space_error(cut, tmp_path):
    """The run folder on a tmpfs with room for what is there plus a third of a checkpoint: the end-of-run save is
    refused in one line naming the folder, exit code 2, and both checkpoints stay complete."""
    used = sum(p.stat().st_size for p in cut.rglob("*") if p.is_file())
    ckpt = sum(p.stat().st_size for p in (cut / "checkpoints" / "step_0000004").rglob("*"))
    mnt = tmp_path / "small"
    mnt.mkdir()
    size_kb = (used + ckpt // 3) // 1024 + 64
    out = mnt / "run"
    script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {mnt} && cp -r {cut} {out} && "
              f"{sys.executable} -m bs_train.cli finetune {' '.join(ARGS)} output_dir={out} --no-progress; "
              f"echo rc=$?; {sys.executable} -c \"import bs_train.checkpoint as c, pathlib; "
              f"print('intact', all(c.damage(p) is None for p in pathlib.Path('{out}/checkpoints').glob('step_???????')))\"")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("bs-unlearn")]
    assert "rc=2" in proc.stdout and "intact True" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert len(err) == 1 and f"no space left on {out / 'checkpoints'}: need ~" in err[0], proc.stderr[-2000:]


# ---- two writers ---------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(copy, capsys):
    from bs_train.cli import main

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (copy / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        before = (copy / "metrics.jsonl").read_bytes()
        assert main(["finetune", *ARGS, f"output_dir={copy}", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"in use by another run: PID {holder.pid}" in err
        assert (copy / "metrics.jsonl").read_bytes() == before  # the holder's files untouched
    finally:
        holder.kill()
        holder.wait()


# ---- errors a user can cause, caught before anything heavy loads ---------------------------------------------


def _no_model(*a, **k):
    raise AssertionError("the model was loaded before the cheap checks")


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    from bs_train.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-5\n  epochs: 2\nmethod: {name: npo\n")
    assert main(["unlearn", "--config", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:" in err and "YAML syntax error" in err
    line = int(err.split(f"{bad}:")[1].split(":")[0])
    assert 2 <= line <= 4


def test_non_utf8_data_names_file_and_line_before_the_model_loads(tmp_path, monkeypatch):
    from bs_train import trainer

    data = tmp_path / "data"
    data.mkdir()
    (data / "full.jsonl").write_bytes(b'{"question": "Q?", "answer": "A."}\n{"question": "\xff?", "answer": "B."}\n')
    monkeypatch.setattr(trainer, "load_model", _no_model)
    with pytest.raises(ValueError, match=r"full\.jsonl:2: not UTF-8 text \(byte 0xff"):
        run(_cfg(tmp_path / "r", f"data.source={data}"), progress=False)


def test_missing_data_folder_fails_before_the_model_loads(tmp_path, monkeypatch):
    from bs_train import trainer

    monkeypatch.setattr(trainer, "load_model", _no_model)
    with pytest.raises(ValueError, match="no such data folder"):
        run(_cfg(tmp_path / "r", f"data.source={tmp_path / 'nope'}"), progress=False)


@pytest.mark.parametrize("path, match", [
    ("runs/orignal/final", "no such model folder"),
    ("./nope", "no such model folder"),
    ("x.gguf", "no such GGUF file"),
    ("HuggingFaceTB/SmolLM2-135M-Instructt", "not in the Hugging Face cache"),
])
def test_a_bad_model_path_is_one_line_before_the_run_folder_is_touched(tmp_path, monkeypatch, path, match):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # this machine has no network
    with pytest.raises(ValueError, match=match):
        run(_cfg(tmp_path / "r", f"model.path={path}"), progress=False)
    assert not (tmp_path / "r").exists()


def test_topk_above_the_vocabulary_fails_before_the_model_loads(tmp_path, monkeypatch):
    from bs_train import trainer

    monkeypatch.setattr(trainer, "load_model", _no_model)
    cfg = load_config(None, [*SMALL, "model.path=tiny", f"output_dir={tmp_path / 'r'}", "method.name=bs_t",
                             "method.bst_topk=100000"], command="unlearn")
    with pytest.raises(ValueError, match=r"method.bst_topk=100000 exceeds the vocabulary of tiny \(\d+ tokens\)"):
        run(cfg, progress=False)
