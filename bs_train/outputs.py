"""How every command writes what it produces: one rule for all of them (docs/reference/files.md).

1. **Nothing of yours is replaced or deleted without ``--overwrite``.** A one-shot command (``eval``, ``compare``,
   ``attack``) refuses any output path that already exists. A resumable command (a training run, ``recipe``,
   ``demo``) rewrites only the files it wrote itself and that are unchanged since: it keeps a ledger of them (path,
   size, modification time), so a file it did not write, or one a user edited, is refused by name. Even with
   ``--overwrite`` a command only writes its own named outputs; it deletes nothing else (a training run started over
   sets the old run aside under ``replaced/``, and an export it must redo sets a ``final/`` you changed aside there
   too).
2. **Checked before any work**: a refused path is one line on stderr and exit code 2, before a model loads.
3. **Written atomically**: a temporary file beside the target, then a rename; missing parent folders are created. A
   kill leaves the old file or the new one, never half of one.
4. **A damaged results file is treated as absent**: read back with ``read_json``, an empty or cut-off file is reported
   in one line and the work that makes it is redone.

This module imports nothing of ``bs_train``: every layer that writes (the trainer, the evaluation, the recipe, the
demo, the CLI) sits above it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class OutputExists(ValueError):
    """An output path is taken by a file the command may not replace; nothing was written."""


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through ``<path>.tmp`` and a rename (parents created); returns the path."""
    path = Path(path)
    if path.is_dir():
        raise OutputExists(f"{path} is a folder; give a file path (e.g. {path / 'results.json'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_figure(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """``fig.savefig`` through a temporary file and a rename, like ``atomic_write`` (the format from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """``atomic_write`` of ``obj`` as indented JSON with a final newline."""
    return atomic_write(path, json.dumps(obj, indent=1) + "\n")


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_json(path: str | os.PathLike[str], *, say: Callable[[str], None] | None = _warn,
              expect: type = dict) -> Any:
    """The JSON in ``path``, or None when it is missing or damaged (empty, cut off, not JSON, not a ``expect``):
    a damaged file is named through ``say`` and treated as absent, so the work that writes it is redone."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(obj, expect):
            raise ValueError(f"holds a {type(obj).__name__}, not a {expect.__name__}")
    except (ValueError, UnicodeDecodeError) as e:
        if say is not None:
            why = "empty" if path.stat().st_size == 0 else f"unreadable: {str(e).splitlines()[0][:120]}"
            say(f"bs-unlearn: {path} is damaged ({why}); treating it as absent")
        return None
    return obj


def refuse_existing(paths: Iterable[str | os.PathLike[str]], *, overwrite: bool, what: str = "output") -> None:
    """Before any work: an output path that is a folder is always refused; one that exists is refused unless
    ``overwrite``. Raises ``OutputExists`` naming every such path in one line."""
    paths = [Path(p) for p in paths]
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise OutputExists(f"{', '.join(map(str, folders))} is a folder; the {what} is a file (give a file path, "
                           f"e.g. {folders[0] / 'results.json'})")
    taken = [p for p in paths if p.exists()]
    if taken and not overwrite:
        raise OutputExists(f"{', '.join(map(str, taken))} already exist(s); pass --overwrite to replace "
                           f"{'it' if len(taken) == 1 else 'them'}, or choose another path")


class Ledger:
    """The files a resumable command wrote in ``folder``, with the size and sha256 each had then, kept in
    ``folder/<name>`` (JSON, written atomically). ``check`` refuses a path the command did not write or that was
    changed since; ``record`` notes a path after writing it. Content, not modification time: a folder copied or
    packed and unpacked elsewhere (the GPU job's results) is still recognised. For small result files only (JSON,
    tables): each check reads the file."""

    def __init__(self, folder: str | os.PathLike[str], name: str, *, command: str):
        self.folder, self.name, self.command = Path(folder), name, command
        self.path = self.folder / name
        self.files: dict[str, list] = {}
        doc = read_json(self.path, say=None)
        if self.path.exists() and (doc is None or not isinstance(doc.get("files"), dict)):
            raise OutputExists(f"{self.path} is not a bs-unlearn ledger (damaged, or another program's file); "
                               f"move it away or choose another folder")
        if doc is not None:
            self.files = {k: list(v) for k, v in doc["files"].items()}

    def _rel(self, path: str | os.PathLike[str]) -> str:
        return Path(path).resolve().relative_to(self.folder.resolve()).as_posix()

    @staticmethod
    def _stamp(path: Path) -> list:
        data = path.read_bytes()
        return [len(data), hashlib.sha256(data).hexdigest()]

    def owns(self, path: str | os.PathLike[str]) -> bool:
        """Written by this command and unchanged since, or not there at all, or a damaged JSON results file (rule 4:
        treated as absent; nobody's work is in an empty or cut-off JSON file)."""
        p = Path(path)
        if not p.exists():
            return True
        if not p.is_file():
            return False
        if p.suffix == ".json" and read_json(p, say=None) is None:
            return True
        return self.files.get(self._rel(p)) == self._stamp(p)

    def check(self, paths: Iterable[str | os.PathLike[str]], *, overwrite: bool) -> None:
        """Refuse (``OutputExists``, one line) the existing ``paths`` this command did not write or that changed
        since, unless ``overwrite``."""
        foreign = [Path(p) for p in paths if not self.owns(p)]
        if foreign and not overwrite:
            raise OutputExists(
                f"{', '.join(map(str, foreign))} {'was' if len(foreign) == 1 else 'were'} not written by "
                f"`bs-unlearn {self.command}` into {self.folder}, or changed since: move "
                f"{'it' if len(foreign) == 1 else 'them'} away, or pass --overwrite to let {self.command} replace "
                f"{'it' if len(foreign) == 1 else 'them'}")

    def record(self, *paths: str | os.PathLike[str]) -> None:
        for p in paths:
            p = Path(p)
            if p.is_file():
                self.files[self._rel(p)] = self._stamp(p)
        write_json(self.path, {"written_by": f"bs-unlearn {self.command}", "files": self.files})

    def write(self, path: str | os.PathLike[str], data: str | bytes, *, overwrite: bool = False) -> Path:
        """``check`` then ``atomic_write`` then ``record``: a file this command owns, replaced safely."""
        self.check([path], overwrite=overwrite)
        atomic_write(path, data)
        self.record(path)
        return Path(path)
