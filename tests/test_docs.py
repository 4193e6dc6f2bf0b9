"""The documentation: the README as a landing page and the reference under ``docs/``, built and checked.

What a reader relies on: the strict build passes (no broken link or anchor, no page outside the nav, no undocumented
option, config field or public ``bs_kernels`` object: ``tools/docs_hooks.py`` fails the build on those); the
generated command-line and configuration pages hold every option and field of the code; every Python block of the
README and of ``docs/`` runs as written; every ``bs-unlearn`` line of their bash blocks parses and, for training
commands, validates; the README stays short and every measured table in it names its command and results file.

Time: about 15 s on the shared 2 cores under load 5 (the build 7 s, the API check's griffe load 3 s). Without mkdocs
(``pip install -e ".[docs]"``; the ``test`` extra has it) the build tests skip and say so; the rest runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools.doc_blocks import REPO, blocks, commands, example

README = REPO / "README.md"
README_MAX_LINES = 300
DOCS_TOOLS = ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing_docs_tools() -> list[str]:
    return [name for name in DOCS_TOOLS if importlib.util.find_spec(name.split(".")[0]) is None
            or (("." in name) and importlib.util.find_spec(name) is None)]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``mkdocs build --strict`` of this repository into a temporary folder (any warning fails it)."""
    missing = _missing_docs_tools()
    if missing:
        pytest.skip(f"the docs build needs {', '.join(missing)}: pip install -e \".[docs]\"")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    problems = [ln for ln in proc.stderr.splitlines() if not ln.startswith("INFO")]
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems[-40:])
    return out


def _text(page: Path) -> str:
    """A built page's text, tags stripped and entities decoded, whitespace collapsed."""
    raw = page.read_text(encoding="utf-8")
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", raw)).split())


def _words(text: str) -> str:
    """Letters and digits only, single-spaced: text compared across Markdown and HTML."""
    return " ".join(re.sub(r"[^0-9A-Za-z]+", " ", text).split())


def test_the_docs_build_strictly(site):
    for page in ("index.html", "reference/cli.html", "reference/config.html", "reference/api/primitives.html",
                 "performance/gpu-jobs.html", "development/tools.html"):
        assert (site / page).is_file(), page


def test_cli_page_holds_every_command_option_and_help_text(site):
    from bs_train import cli

    page = _text(site / "reference" / "cli.html")
    _, subs = cli.build_parser()
    for name, sub in subs.items():
        assert f"bs-unlearn {name}" in page
        shown = sub.formatter_class(prog=sub.prog)  # what --help prints for each argument
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert shown._format_action_invocation(action) in page, (name, action.dest)
            assert " ".join(action.help.split()[:6]) in page, (name, action.help)


def test_config_page_holds_every_field_with_its_default_and_docstring(site):
    from bs_train import config
    from bs_train.attacks.config import AttackConfig
    from tools.docs_hooks import field_docs

    raw = (site / "reference" / "config.html").read_text(encoding="utf-8")
    page = _text(site / "reference" / "config.html")
    sections = [("", config.RunConfig), *((f"{s}.", c) for s, c in config.SECTIONS.items()),
                ("attack.", AttackConfig)]
    for prefix, cls in sections:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in config.SECTIONS and cls is config.RunConfig:
                continue
            assert f'id="{prefix}{f.name}"' in raw, f"{prefix}{f.name}"
            first_words = _words(docs[f.name])[:40]
            assert first_words in _words(page), (f"{prefix}{f.name}", first_words)


def test_api_pages_render_every_public_object(site):
    import bs_kernels
    from bs_kernels import open_unlearning

    pages = "".join((site / "reference" / "api" / p).read_text(encoding="utf-8")
                    for p in ("primitives.html", "losses.html", "open-unlearning.html"))
    for name in bs_kernels.__all__:
        assert f'id="bs_kernels.{name}"' in pages, name
    for name in open_unlearning.__all__:
        assert f'id="bs_kernels.open_unlearning.{name}"' in pages, name


def test_the_build_fails_on_an_undocumented_option_or_field(monkeypatch):
    """The hooks refuse what would leave the reference incomplete, whether or not mkdocs is installed."""
    from bs_train import cli
    from bs_train.config import TrainConfig
    from tools import docs_hooks

    real = cli.build_parser

    def without_help():
        parser, subs = real()
        subs["demo"].add_argument("--undocumented")
        return parser, subs

    monkeypatch.setattr(cli, "build_parser", without_help)
    with pytest.raises(Exception, match="bs-unlearn demo --undocumented: no help text"):
        docs_hooks.cli_reference()
    monkeypatch.setattr(cli, "build_parser", real)

    @dataclasses.dataclass
    class Section:
        """A section."""

        documented: int = 1
        """What it sets."""
        bare: int = 2

    with pytest.raises(Exception, match="field 'bare' has no docstring"):
        docs_hooks._field_entries(Section, "x.", "Section")
    assert "train.lr" in docs_hooks.config_reference() and TrainConfig.lr == 1e-5
    with pytest.raises(Exception, match="unknown marker bs-docs:nope"):
        docs_hooks.render_markers("<!-- bs-docs:nope -->\n", "x.md")
    with pytest.raises(Exception, match="no such file"):
        docs_hooks.render_markers("<!-- bs-docs:include no/such.md -->\n", "x.md")


def test_included_repository_files_keep_their_links_and_render_as_on_github():
    """An included README's link into the repository points at the page that shows it, its GitHub-style ``\\|`` in a
    table's code span becomes a plain pipe, and a list or table straight after a paragraph line gets the blank line
    Python-Markdown needs."""
    from tools import docs_hooks

    text = docs_hooks.include("kernels/README.md", "guides/bs-kernels-alone.md")
    assert "[bs-unlearn](../index.md)" in text and "../README.md" not in text
    assert "included when the documentation is built" in text.splitlines()[2]
    row = next(ln for ln in docs_hooks.include("tools/README.md", "development/tools.md").splitlines()
               if ln.startswith("| `readme_commands.py`"))
    assert "`python3 tools/readme_commands.py 1|2" in row
    assert docs_hooks.lists_need_blank_lines("Text:\n* a\n* b\n\nMore:\n| x |\n") == "Text:\n\n* a\n* b\n\nMore:\n\n| x |\n"


def test_the_api_check_names_an_undocumented_or_unlisted_object(monkeypatch):
    pytest.importorskip("griffe")
    from tools import docs_hooks

    with pytest.raises(Exception, match="public but on no API page.*bs_kernels.bst_loss"):
        docs_hooks.check_api({"bs_kernels.open_unlearning", "bs_kernels.linear_token_scores"})

    class Doc:
        value = ""

    class Bare:
        is_alias = False
        is_class = False
        docstring = Doc()
        path = "bs_kernels.bare"

    monkeypatch.setattr(docs_hooks, "public_api", lambda: {"bs_kernels.bare": Bare()})
    with pytest.raises(Exception, match="no docstring: bs_kernels.bare"):
        docs_hooks.check_api({"bs_kernels.bare"})


# ---- code blocks --------------------------------------------------------------------------------------------------

PYTHON = [b for b in blocks() if b.lang == "python" and b.runner is None]


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_blocks_run_as_written(block):
    namespace = {"__name__": "__docs__"}
    exec(compile(block.code, block.where, "exec"), namespace)


def test_named_blocks_are_run_by_the_test_they_name_and_their_copies_agree():
    named = [b for b in blocks() if b.name]
    assert {"trainer", "drop-in", "drop-in-diff", "tofu-quick-start"} <= {b.name for b in named}
    for b in named:
        example(b.name)  # every copy identical
        if b.runner:
            runner = REPO / b.runner
            assert runner.is_file(), f"{b.where}: {b.runner} does not exist"
            assert f'"{b.name}"' in runner.read_text(), f"{b.where}: {b.runner} never asks for example {b.name!r}"
    assert all(b.name or b.lang != "python" or b.runner is None for b in blocks())


def test_every_bs_unlearn_line_parses_and_training_lines_validate(monkeypatch, capsys):
    from bs_train import cli
    from bs_train.config import load_config

    monkeypatch.chdir(REPO)  # the configs/ paths of the examples
    _, subs = cli.build_parser()
    seen = set()
    for block in blocks():
        if block.lang != "bash":
            continue
        for argv in commands(block):
            where = f"{block.where}: bs-unlearn {' '.join(argv)}"
            assert argv and argv[0] in subs, where
            command, rest = argv[0], argv[1:]
            seen.add(command)
            try:
                if command in cli.WITH_OVERRIDES:
                    args = subs[command].parse_intermixed_args(rest)
                    run = args.run_command if command == "config" else command
                    load_config(args.config, args.overrides, command=run, preset=args.preset)
                else:
                    subs[command].parse_args(rest)
            except SystemExit:
                pytest.fail(f"{where}: does not parse ({capsys.readouterr().err.strip().splitlines()[-1]})")
            except ValueError as e:
                pytest.fail(f"{where}: {e}")
    assert {"finetune", "unlearn", "config", "eval", "compare", "demo", "recipe", "attack"} <= seen


def test_no_text_outside_code_reads_as_an_html_tag():
    """``<t_i, log p_i>`` outside a code span is an HTML tag to Markdown, and its text vanishes from the page: every
    such formula sits in backticks (the README, docs/, and the repository files the docs include)."""
    from tools.docs_hooks import INCLUDED

    paths = [README, *sorted((REPO / "docs").rglob("*.md")), *(REPO / p for p in INCLUDED)]
    found = []
    for path in paths:
        fence = False
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("```"):
                fence = not fence
            elif not fence and not line.startswith("<!--"):
                if re.search(r"<[A-Za-z/]", re.sub(r"(`+).+?\1", "", line)):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:80]}")
    assert not found, "\n".join(found)


# ---- the README ---------------------------------------------------------------------------------------------------

def test_readme_is_a_landing_page_whose_measured_tables_name_command_and_results_file():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    measured = lines[lines.index("## Measured"):]
    tables, i = 0, 0
    while i < len(measured):
        if measured[i].startswith("|"):
            start = i
            while i < len(measured) and measured[i].startswith("|"):
                i += 1
            before = next(j for j in range(start - 1, -1, -1) if measured[j].startswith("#"))
            context = "\n".join(measured[before:i])
            assert "benchmarks/results/" in context, measured[start]
            assert re.search(r"python -m benchmarks\.|bs-unlearn \w", context), measured[start]
            tables += 1
        i += 1
    assert tables >= 4


def test_readme_links_into_the_docs_resolve():
    for target in re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8")):
        assert (REPO / target).is_file(), target


def test_getting_started_repeats_the_readme_commands_unchanged():
    def first_bash(path: Path) -> str:
        return next(b.code for b in blocks([path]) if b.lang == "bash")

    assert first_bash(REPO / "docs" / "getting-started.md") == first_bash(README)


def test_methods_page_gives_every_method_a_formula():
    from bs_train.methods import METHODS

    text = (REPO / "docs" / "reference" / "methods.md").read_text(encoding="utf-8")
    table = text.split("## Forget losses", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    assert sorted(rows) == sorted(name for name, m in METHODS.items() if m.command == "unlearn")
