"""Rows of a named split, from a local folder of JSON Lines or a Hugging Face Hub dataset, checked at the boundary.

Every benchmark's data comes through ``load_rows``: TOFU's question/answer splits (``qa.py``), MUSE's subsets and
MUSE's and WMDP's raw text (``text.py``), WMDP's and MMLU's questions (``evaluation/wmdp``). A split is named the way
the benchmark's Hub dataset names it:

* ``"forget10"``: a plain name, ``<folder>/forget10.jsonl`` or the Hub config ``forget10`` (split ``train``), as
  ``locuslab/TOFU`` and ``cais/wmdp-corpora`` are laid out;
* ``"raw/forget"``: ``subset/split``, ``<folder>/raw/forget.jsonl`` or the Hub config ``raw``, split ``forget``, as
  ``muse-bench/MUSE-News`` is laid out.

``check(row, where)`` validates (and may normalise) each row; the first bad one raises ``ValueError`` naming the file
and line (or the Hub id and row), so a malformed file fails before anything heavy runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

Check = Callable[[Any, str], dict[str, Any]]


def check_split_name(split: str, who: str = "load_rows") -> tuple[str | None, str]:
    """``(subset or None, name)`` of a split name ``name`` or ``subset/name``; anything else is refused."""
    parts = split.split("/") if isinstance(split, str) else []
    if not 1 <= len(parts) <= 2 or not all(parts) or any(p in (".", "..") or "\\" in p for p in parts):
        raise ValueError(f"{who}: split must be a name like 'forget10' or 'raw/forget', got {split!r}")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def is_local(source: str | os.PathLike[str]) -> bool:
    """Does ``source`` name a local path (rather than a Hub id ``owner/name``)?"""
    text = str(source)
    return isinstance(source, Path) or Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or \
        text.count("/") > 1 or "\\" in text


def load_rows(source: str | os.PathLike[str], split: str, check: Check, *, who: str = "load_rows",
              required: bool = True) -> list[dict[str, Any]] | None:
    """The checked rows of ``split`` (see the module docstring for the names); None for a missing split when not
    ``required``. An empty split is an error."""
    subset, name = check_split_name(split, who)
    path = Path(source).expanduser()
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            if not required:
                return None
            folder = file.parent
            have = sorted(p.relative_to(path).with_suffix("").as_posix() for p in folder.glob("*.jsonl")) \
                if folder.is_dir() else []
            raise ValueError(f"{who}: split {split!r} not found: no file {file}; splits in {folder}: "
                             f"{', '.join(have) if have else '(none: no .jsonl files there)'}")
        return read_jsonl(file, check, who=who, split=split)
    if path.exists():
        raise ValueError(f"{who}: {str(source)!r} is a file, expected a folder of {{split}}.jsonl files or a Hub id")
    if is_local(source):
        raise ValueError(f"{who}: no such data folder: {str(source)!r}")
    return _hub_rows(str(source), subset, name, check, who=who, required=required)


def read_jsonl(file: Path, check: Check, *, who: str = "load_rows", split: str | None = None) -> list[dict[str, Any]]:
    """Every row of a JSON Lines file, checked; bytes decoded line by line, so a bad byte is named with its line."""
    rows: list[dict[str, Any]] = []
    with file.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{file}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{who}: {where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); JSON Lines files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{who}: {where}: invalid JSON ({e.msg} at column {e.colno})") from None
            rows.append(check(row, where))
    if not rows:
        raise ValueError(f"{who}: {'split ' + repr(split) + ' is empty: ' if split else ''}{file} has no rows")
    return rows


def _hub_rows(hub_id: str, subset: str | None, name: str, check: Check, *, who: str,
              required: bool) -> list[dict[str, Any]] | None:
    try:
        import datasets  # optional: only Hub ids need it
    except ImportError:
        raise ValueError(f"{who}: {hub_id!r} is not a local folder, and loading it as a Hub dataset needs the "
                         "`datasets` package (pip install -e '.[hub]'); or pass a folder of {split}.jsonl files") \
            from None
    config, split = (subset, name) if subset is not None else (name, "train")
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # the Hub's own errors: no such config, offline, gated
        if not required:
            return None
        raise ValueError(f"{who}: cannot load {hub_id} (config {config!r}, split {split!r}): "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    rows = [check(dict(row), f"{hub_id} (config {config!r}, split {split!r}) row {i}") for i, row in enumerate(ds)]
    if not rows:
        raise ValueError(f"{who}: {hub_id} (config {config!r}, split {split!r}) is empty")
    return rows


def check_fields(row: Any, where: str, fields: tuple[str, ...], *, who: str) -> dict[str, Any]:
    """``row`` must be a JSON object whose ``fields`` are non-empty strings."""
    if not isinstance(row, dict):
        raise ValueError(f"{who}: {where}: expected a JSON object, got {type(row).__name__}")
    for key in fields:
        if key not in row:
            raise ValueError(f"{who}: {where}: missing field {key!r} (fields: {sorted(row)})")
        if not isinstance(row[key], str):
            raise ValueError(f"{who}: {where}: field {key!r} must be a string, got {type(row[key]).__name__}")
        if not row[key].strip():
            raise ValueError(f"{who}: {where}: field {key!r} is empty")
    return row
