"""The command line as a user meets it: every command listed, configs printed and validated without running, strict
booleans, results never silently replaced, an evaluation that says what it does, and quiet, escape-free logs."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import yaml

from bs_train import cli
from bs_train.console import PlainProgress, progress, quiet_third_party


def test_no_command_prints_help_and_exits_2_without_claiming_overrides_are_required(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    for command in cli.COMMANDS:
        assert command in err
    assert "required" not in err and "overrides" not in err.split("\n\n")[-1]


def test_help_and_errors_list_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "{" + ",".join(cli.COMMANDS) + "}" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate"])  # a typo: argparse names the commands there are
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(c in err for c in cli.COMMANDS)


@pytest.mark.parametrize("argv", [["config", "unlearn"], ["unlearn", "--print-config"]])
def test_config_is_printed_resolved_and_validated_without_running(argv, tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert cli.main([*argv, "method.name=npo", "train.lr=2e-5", f"output_dir={out_dir}"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"]["name"] == "npo" and printed["train"]["lr"] == 2e-5
    assert printed["method"]["npo_beta"] == 0.1 and printed["command"] == "unlearn"  # defaults resolved too
    assert not out_dir.exists()  # nothing ran, nothing was written
    assert cli.main([*argv, "train.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.lr must be > 0" in err


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "y", "1"])
def test_booleans_are_only_true_or_false(word, tmp_path, capsys):
    assert cli.main(["config", "finetune", f"model.trust_remote_code={word}"]) == 2
    assert "model.trust_remote_code must be true or false" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  trust_remote_code: {word}\n")
    assert cli.main(["config", "finetune", "--config", str(config)]) == 2
    assert "model.trust_remote_code" in capsys.readouterr().err
    assert cli.main(["config", "finetune", "model.trust_remote_code=false", "model.use_liger=True"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["trust_remote_code"] is False and printed["model"]["use_liger"] is True


def test_eval_never_replaces_existing_results_unless_asked(tmp_path, capsys):
    out, md = tmp_path / "results.json", tmp_path / "results.md"
    out.write_bytes(b'{"mine": 1}\n')
    md.write_bytes(b"my notes\n")
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "eval.json").write_bytes(b"{}\n")
    code = cli.main(["eval", str(run), "--data", "synthetic", "--out", str(out), "--markdown", str(md)])
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite" in err and str(out) in err and str(run / "eval.json") in err
    assert out.read_bytes() == b'{"mine": 1}\n' and md.read_bytes() == b"my notes\n"
    assert (run / "eval.json").read_bytes() == b"{}\n"


def test_eval_says_what_it_does_and_what_it_cannot(tmp_path, capsys):
    """No retain model: the reason forget quality is missing is on stderr in the command line's words; a time
    estimate comes first; progress goes to stderr as plain lines (not a terminal); --max-rows and --splits bound the
    work; an existing --out is replaced only with --overwrite."""
    out = tmp_path / "r.json"
    argv = ["eval", "tiny", "--data", "synthetic", "--judge", "none", "--max-new-tokens", "4", "--max-rows", "3",
            "--splits", "retain_perturbed", "--out", str(out)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "no --retain-model: forget quality is not computed" in err and "retain_model=" not in err
    assert "about " in err and "answers scored" in err
    assert "eval tiny forget10: " in err and "eval tiny retain_perturbed: " in err  # one bar per split
    assert "\r" not in err and "\x1b" not in err
    res = json.loads(out.read_text())["results"][0]
    assert res["forget_quality"] is None and len(res["per_example"]["forget_generations"]) == 3
    assert res["utility_splits"] == ["retain"] and res["settings"]["max_rows"] == 3
    assert cli.main(argv) == 2 and out.exists()
    assert cli.main([*argv, "--overwrite"]) == 0
    assert cli.main([*argv[:-4], "--splits", "facts", "--out", str(tmp_path / "other.json")]) == 2
    assert "'facts'" in capsys.readouterr().err.splitlines()[-1]


def test_plain_progress_writes_lines_without_escape_codes(capsys):
    bar = progress(10, "unlearn bs_t", unit="steps")  # stderr under pytest is not a terminal
    assert isinstance(bar, PlainProgress)
    bar.every_s = 0.0
    for _ in range(10):
        bar.update(1)
        bar.set_postfix(loss="1.0000")
    bar.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0].startswith("unlearn bs_t: 1/10 steps (10%)") and "left" in lines[0]
    assert lines[-1].startswith("unlearn bs_t: 10/10 steps (100%)") and "loss=1.0000" in lines[-1]
    assert "\r" not in err and "\x1b" not in err
    silent = progress(10, "x", enabled=False)
    silent.update(10)
    silent.close()
    assert capsys.readouterr().err == ""


def test_third_party_noise_is_filtered_by_message_and_nothing_else(caplog):
    quiet_third_party()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.cpython-310.so: nope")
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile", "<enum 'K'>")
        logging.getLogger("torchao").warning("something a user must see")
    assert [r.getMessage() for r in caplog.records] == ["something a user must see"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_third_party()  # catch_warnings reset the filters; installed again, as the CLI does at start
        warnings.warn_explicit("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is "
                               "to save in a single process.", UserWarning, "utils.py", 1,
                               module="torch.distributed.checkpoint.utils")
        warnings.warn_explicit("a real problem", UserWarning, "utils.py", 2,
                               module="torch.distributed.checkpoint.utils")
    assert [str(w.message) for w in seen] == ["a real problem"]


def test_readme_quick_start_commands_parse_and_their_configs_validate(capsys):
    """Every `bs-unlearn` line of the README's TOFU quick start (``example:tofu-quick-start``), with its placeholders
    filled, parses; the finetune / unlearn ones give a valid config (checked through `bs-unlearn config`, which runs
    nothing), the retain model's included."""
    from tools.doc_blocks import blocks, commands as block_commands

    block = next(b for b in blocks() if b.name == "tofu-quick-start")
    commands = [["bs-unlearn", *argv] for argv in block_commands(block)]
    assert any("data.train_split=retain90" in c for c in commands)  # the retain model's command is there
    _, subs = cli.build_parser()
    for argv in commands:
        command, rest = argv[1], argv[2:]
        if command in ("finetune", "unlearn"):
            assert cli.main(["config", command, *rest]) == 0, argv
            cfg = yaml.safe_load(capsys.readouterr().out)
            assert cfg["data"]["source"] == "path/to/tofu" and cfg["command"] == command
        elif command != "config":
            subs[command].parse_args(rest)
        else:
            assert cli.main(argv[1:]) == 0, argv


def test_a_logged_finetune_is_quiet_plain_and_names_its_loss_honestly(tmp_path):
    """`bs-unlearn finetune` with stderr in a file (not a terminal), as a fresh process: no third-party start-up
    noise, progress as plain lines without escape codes, and the summary calls its one term train_nll, not
    "forget" (there is no forget set in fine-tuning)."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "ft"
    env = {k: v for k, v in os.environ.items() if k != "BS_UNLEARN_VERBOSE"}
    proc = subprocess.run([sys.executable, "-m", "bs_train.cli", "finetune", f"output_dir={run_dir}",
                           "train.max_steps=2", "train.batch_size=4", "train.grad_accum=1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "Failed to load" not in err and "register_constant" not in err and "assuming the intent" not in err
    assert "Writing model shards" not in err
    assert "\r" not in err and "\x1b" not in err
    assert "finetune finetune: 2/2 steps (100%)" in err  # the closing plain line of the one bar
    final = json.loads(proc.stdout.strip().splitlines()[-1])["final"]
    assert "train_nll" in final and "forget" not in final and "retain" not in final
    from bs_train.evaluation.report import TRAIN_COLUMNS, markdown_table

    assert "Train NLL" in markdown_table([{"name": "ft", **final}], TRAIN_COLUMNS)
