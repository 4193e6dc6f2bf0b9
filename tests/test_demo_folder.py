"""The demo's output folder is the user's: a rerun removes only the files the demo recorded writing, a folder it
did not write is refused before anything happens, and a file it wrote that a user changed since is refused too."""

from __future__ import annotations

import json

import pytest

from bs_train import cli
from bs_train.demo import MANIFEST, DemoFolderError, _record, clear_previous


def _fake_demo(out):
    """What an earlier demo leaves: its files and its manifest."""
    (out / "original" / "final").mkdir(parents=True)
    (out / "original" / "final" / "model.safetensors").write_bytes(b"weights")
    (out / "results.md").write_text("| model |\n")
    _record(out, set())


def test_a_rerun_removes_only_what_the_demo_wrote(tmp_path):
    out = tmp_path / "demo"
    _fake_demo(out)
    mine = out / "original" / "notes.txt"  # a user's file beside the demo's, in one of its run folders
    mine.write_bytes(b"\x00my notes\xff")
    (out / "paper.pdf").write_bytes(b"%PDF")
    keep = clear_previous(out, overwrite=False)
    assert mine.read_bytes() == b"\x00my notes\xff" and (out / "paper.pdf").read_bytes() == b"%PDF"
    assert not (out / "original" / "final").exists() and not (out / "results.md").exists()
    assert not (out / MANIFEST).exists()
    assert keep == {"original/notes.txt", "paper.pdf"}
    (out / "results.md").write_text("new\n")  # the new demo writes; the new manifest never claims the user's files
    _record(out, keep)
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == {"results.md"}


def test_a_folder_the_demo_did_not_write_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_bytes(b"\\begin{document}")
    assert cli.main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_bytes() == b"\\begin{document}"
    assert clear_previous(out, overwrite=True) == {"thesis.tex"}  # allowed, and still nothing deleted
    assert (out / "thesis.tex").read_bytes() == b"\\begin{document}"


def test_a_demo_file_the_user_changed_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "demo"
    _fake_demo(out)
    (out / "results.md").write_text("| model | my edits |\n")
    with pytest.raises(DemoFolderError, match="results.md"):
        clear_previous(out, overwrite=False)
    assert (out / "results.md").read_text() == "| model | my edits |\n"
    assert (out / "original" / "final" / "model.safetensors").exists()  # refused before removing anything
    clear_previous(out, overwrite=True)
    assert not (out / "results.md").exists()
