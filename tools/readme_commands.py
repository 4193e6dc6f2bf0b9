"""The README's two fresh-machine commands, read from the README itself, so that CI runs exactly what a user runs.

    python3 tools/readme_commands.py 1                          # command 1: install and run the main job (the demo)
    python3 tools/readme_commands.py 1 --demo-args "--quick"    # the same with arguments after `bs-unlearn demo`
    python3 tools/readme_commands.py 2                          # command 2: install and run the tests

The commands are the non-comment lines of the README's first ``bash`` block, in order. ``.ci/run`` takes both from
here (command 1 in a fresh virtual environment, command 2 in CI's own), and ``tests/test_repo.py`` checks the block's
shape. Standard library only: CI calls it before anything is installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
DEMO = "bs-unlearn demo"


def commands(readme: Path = README) -> list[str]:
    """The command lines of the README's first ```bash block (comments and blank lines left out)."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index("```bash") + 1
        end = lines.index("```", start)
    except ValueError:
        raise SystemExit(f"{readme}: no ```bash block with the fresh-machine commands") from None
    return [ln.strip() for ln in lines[start:end] if ln.strip() and not ln.lstrip().startswith("#")]


def command(n: int, demo_args: str = "", readme: Path = README) -> str:
    """Command ``n`` (1 or 2); ``demo_args`` are appended to command 1's final ``bs-unlearn demo``."""
    found = commands(readme)
    if len(found) != 2:
        raise SystemExit(f"{readme}: expected 2 commands in its first bash block, found {len(found)}")
    line = found[n - 1]
    if demo_args:
        if not line.endswith(DEMO):
            raise SystemExit(f"{readme}: command {n} does not end with `{DEMO}`: {line}")
        line = f"{line} {demo_args}"
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=int, choices=(1, 2))
    p.add_argument("--demo-args", default="", help="appended to command 1's `bs-unlearn demo`")
    args = p.parse_args(argv)
    print(command(args.n, args.demo_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
