"""The code blocks of the README and of ``docs/``, read the way the tests run them.

A block may be named by an HTML comment on the line before its fence, ``<!-- example:NAME -->``, and say which test
runs it, ``<!-- example:NAME (run by tests/test_x.py) -->``: that test asks for it by name (``example(NAME)``) and
checks what it computes. ``tests/test_docs.py`` runs every other Python block as it stands, checks that the copies
of one name are identical and that the test a block names exists and asks for it, and parses every ``bs-unlearn``
line of the bash blocks. Standard library only.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^<!-- example:([\w-]+)(?: \(run by (\S+)\))? -->$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its text, and its name and runner if it has them."""

    path: Path
    line: int
    lang: str
    code: str
    name: str | None = None
    runner: str | None = None

    @property
    def where(self) -> str:
        """``path:line`` of the opening fence, relative to the repository."""
        return f"{self.path.relative_to(REPO).as_posix()}:{self.line}"


def doc_files() -> list[Path]:
    """The README and every page under ``docs/``."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def blocks(paths: list[Path] | None = None) -> list[Block]:
    """Every fenced block of ``paths`` (default: ``doc_files()``), in order."""
    found = []
    for path in paths or doc_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if lines[i].startswith("```"):
                lang = lines[i][3:].strip()
                end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
                if end is None:
                    raise ValueError(f"{path}:{i + 1}: a ``` fence that is never closed")
                before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                m = NAME.match(before.strip())
                found.append(Block(path, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n",
                                   m.group(1) if m else None, m.group(2) if m else None))
                i = end
            i += 1
    return found


def example(name: str) -> str:
    """The code of the block(s) named ``name``; every copy (the README's and a page's) must be the same."""
    copies = [b for b in blocks() if b.name == name]
    if not copies:
        raise LookupError(f"no block named example:{name} in the README or docs/")
    if len({b.code for b in copies}) > 1:
        raise ValueError(f"the copies of example:{name} differ: {', '.join(b.where for b in copies)}")
    return copies[0].code


def commands(block: Block) -> list[list[str]]:
    """The ``bs-unlearn`` command lines of a bash block as argument lists (after ``bs-unlearn`` or ``-m bs_train.cli``):
    continuations joined, comments dropped, ``$NAME`` replaced by the block's own ``NAME=value`` (else ``x``)."""
    text = re.sub(r"\\\n\s*", " ", block.code)
    variables: dict[str, str] = {}
    found = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 1 and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
            key, _, value = words[0].partition("=")
            variables[key] = value
            continue
        words = [re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), "x"), w) for w in words]
        if words[:1] == ["bs-unlearn"]:
            found.append(words[1:])
        elif "bs_train.cli" in words and words[words.index("bs_train.cli") - 1] == "-m":
            found.append(words[words.index("bs_train.cli") + 1:])
    return found
