"""The documentation's build hooks (``mkdocs.yml``: ``hooks:``): the pages made from the code, and the checks that
fail ``mkdocs build --strict`` when the reference and the code part.

A page asks for generated text with a marker on a line of its own, replaced when the page is built:

    <!-- bs-docs:cli -->                  every `bs-unlearn` command and option, from ``bs_train.cli.build_parser()``
    <!-- bs-docs:config -->               every config field with its type, default and docstring (``bs_train.config``)
    <!-- bs-docs:attack-config -->        the same for ``bs-unlearn attack`` (``bs_train.attacks.config.AttackConfig``)
    <!-- bs-docs:defaults -->             what ``bs-unlearn config unlearn`` prints with no file and no override
    <!-- bs-docs:memory-plans -->         the settings each ``train.memory_plan`` fills in (``bs_train.memory.PLANS``)
    <!-- bs-docs:presets -->              each preset's overrides, per command and per method (``bs_train.methods``)
    <!-- bs-docs:method-table -->         what each method of ``bs_train.methods.METHODS`` needs
    <!-- bs-docs:include PATH -->         a Markdown file of the repository (``benchmarks/GPU.md``, ...), its links
                                          into the repository rewritten

so those pages match ``--help`` and the config classes by construction. The build fails (a ``PluginError``) on an
unknown marker, a CLI option without help text, a config field without a docstring, a public object of
``bs_kernels`` (``PUBLIC``) without a docstring or missing from the API pages' ``::: identifier`` blocks, and, under
``--strict``, on any warning: a broken link or anchor, a page outside the nav, an unresolved cross-reference.

Only the standard library, PyYAML and mkdocs' own packages are imported at module level; ``bs_train`` and griffe
load when a hook runs, from this repository's folder (put first on ``sys.path``), not from an installed copy.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import html
import inspect
import re
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- bs-docs:([a-z-]+)(?: (\S+))? -->$", re.M)
API_BLOCK = re.compile(r"^::: ([\w.]+)", re.M)
PUBLIC = ("bs_kernels", "bs_kernels.open_unlearning", "bs_kernels.hf")
"""The modules whose public objects must each have a docstring and an API entry: their ``__all__``, or, without one,
the functions and classes they define whose names do not start with ``_``."""
INCLUDED = {
    "README.md": "index.md",
    "benchmarks/README.md": "performance/benchmarks.md",
    "benchmarks/GPU.md": "performance/gpu-jobs.md",
    "benchmarks/results/README.md": "performance/results.md",
    "tools/README.md": "development/tools.md",
    "kernels/README.md": "guides/bs-kernels-alone.md",
}
"""Repository files and the docs page that shows each (an include, or, for ``README.md``, its docs counterpart):
a link to one of them in an included file becomes a link to that page."""


class DocsError(Exception):
    """What the hooks raise when the code and the documentation disagree (a ``PluginError`` under mkdocs)."""


def _error(message: str) -> Exception:
    try:
        from mkdocs.exceptions import PluginError
    except ImportError:  # the generators also run without mkdocs (tests)
        return DocsError(message)
    return PluginError(message)


def _on_path() -> None:
    """Import ``bs_train`` / ``bs_kernels`` from this repository, whatever is installed."""
    if sys.path[:1] != [str(REPO)]:
        sys.path.insert(0, str(REPO))


# ---- text helpers -------------------------------------------------------------------------------------------------

_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def md_text(text: str, *, table: bool = False) -> str:
    """Plain text (a help string, a docstring) as Markdown: ``<``, ``>``, ``&`` and ``*`` escaped outside code spans
    (so ``<metric>`` shows instead of being read as HTML); in a table cell also ``|`` and the line breaks."""
    out, last = [], 0
    for m in _CODE_SPAN.finditer(text):
        out.append(_escape(text[last:m.start()], table))
        out.append(m.group(0))
        last = m.end()
    out.append(_escape(text[last:], table))
    s = "".join(out)
    return " ".join(s.split()) if table else s


def _escape(s: str, table: bool) -> str:
    s = html.escape(s, quote=False).replace("*", r"\*")
    return s.replace("|", r"\|") if table else s


def _yaml_value(value) -> str:
    """A default as ``bs-unlearn config`` prints it (YAML), tuples as lists."""
    import yaml

    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def lists_need_blank_lines(markdown: str) -> str:
    """Python-Markdown starts a list, a table or a fenced block only after a blank line; GitHub does not need one.
    Insert it where a paragraph line runs straight into ``* item``, ``- item``, ``1. item``, a table row or a
    ```` ``` ```` fence, so the repository's Markdown renders the same in both."""
    out: list[str] = []
    fence = False
    in_list = False
    item = re.compile(r"^(\s*)([*-]|\d+\.) \S")
    for line in markdown.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if not fence and out and out[-1].strip() and not in_list:
                out.append("")
            fence = not fence
            out.append(line)
            continue
        if not fence:
            if line.startswith("|") and out and out[-1].strip() and not out[-1].startswith("|"):
                out.append("")
            if item.match(line):
                if out and out[-1].strip() and not in_list and not out[-1].lstrip().startswith("|"):
                    out.append("")
                in_list = True
            elif not stripped:
                in_list = False
            elif not line[:1].isspace():
                in_list = False
        out.append(line)
    return "\n".join(out) + ("\n" if markdown.endswith("\n") else "")


# ---- the CLI ------------------------------------------------------------------------------------------------------

def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    return parser.formatter_class(prog=parser.prog, width=100)


def _help_text(parser: argparse.ArgumentParser) -> str:
    """``parser.format_help()`` at a fixed width of 100 columns (argparse otherwise reads the terminal's)."""
    parser = _with_width(parser)
    return parser.format_help().rstrip()


def _with_width(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.formatter_class = functools.partial(parser.formatter_class, width=100)
    return parser


def cli_reference() -> str:
    """Every ``bs-unlearn`` command: its ``--help`` description and usage, and a table of its arguments (each
    one's invocation, default and help text, as ``--help`` prints them), built from ``bs_train.cli.build_parser()``."""
    _on_path()
    from bs_train import cli

    parser, subs = cli.build_parser()
    if set(subs) != set(cli.COMMANDS):
        raise _error(f"bs_train.cli: COMMANDS {cli.COMMANDS} and the parser's subcommands {sorted(subs)} differ")
    lines = ["## `bs-unlearn --help` {#bs-unlearn}", "", "```text", _help_text(parser), "```", ""]
    for name in cli.COMMANDS:
        sub = _with_width(subs[name])
        fmt = _formatter(sub)
        fmt.add_usage(sub.usage, sub._actions, sub._mutually_exclusive_groups)
        lines += [f"## `bs-unlearn {name}` {{#{name}}}", "", md_text(sub.description or ""), "", "```text",
                  fmt.format_help().strip(), "```", ""]
        for group in sub._action_groups:
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            lines += [f"**{md_text(group.title)}**", "", "| argument | default | what it sets |", "| --- | --- | --- |"]
            for action in actions:
                where = f"bs-unlearn {name} {'/'.join(action.option_strings) or action.dest}"
                if not action.help:
                    raise _error(f"{where}: no help text (bs_train/cli.py); every option is documented")
                text = fmt._expand_help(action)  # the invocation shows the choices, as --help does
                invocation = fmt._format_action_invocation(action)
                lines.append(f"| `{invocation}` | {_cli_default(action)} | {md_text(text, table=True)} |")
            lines.append("")
    return "\n".join(lines)


def _cli_default(action: argparse.Action) -> str:
    default = action.default
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or default in (None, [], False) \
            or default is argparse.SUPPRESS:
        return "–"
    return f"`{default}`"


# ---- the config ---------------------------------------------------------------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring: the string literal right after its annotated assignment in the class body
    (read from the source with ``ast``; what griffe and IDEs read too)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == cls.__name__).body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _field_entries(cls: type, prefix: str, where: str, skip: tuple[str, ...] = ()) -> list[str]:
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        doc = docs.get(f.name)
        if not doc:
            raise _error(f"{where}: field {f.name!r} has no docstring; every setting says what it does and where "
                         "its default comes from")
        key = f"{prefix}{f.name}"
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines += [f"### `{key}` {{#{key}}}", "", f"`{annotation}`, default `{_yaml_value(_default(f))}`", "",
                  md_text(doc), ""]
    return lines


def config_reference() -> str:
    """One entry per setting of ``bs_train.config.RunConfig`` (``section.key``): type, default as YAML, docstring."""
    _on_path()
    from bs_train import config

    sections = [f.name for f in dataclasses.fields(config.RunConfig) if f.name in config.SECTIONS]
    if sections != list(config.SECTIONS):
        raise _error(f"bs_train.config: RunConfig's sections {sections} and SECTIONS {list(config.SECTIONS)} differ")
    lines = ["## Top level {#top-level}", "",
             *_field_entries(config.RunConfig, "", "bs_train/config/sections.py RunConfig", skip=tuple(sections))]
    for section, cls in config.SECTIONS.items():
        doc = cls.__doc__ or ""
        if not doc or doc.startswith(f"{cls.__name__}("):  # a dataclass without one gets its signature
            raise _error(f"bs_train/config/sections.py {cls.__name__}: no class docstring")
        lines += [f"## `{section}` ({cls.__name__}) {{#{section}}}", "", md_text(inspect.cleandoc(doc)), ""]
        lines += _field_entries(cls, f"{section}.", f"bs_train/config/sections.py {cls.__name__}")
    return "\n".join(lines)


def attack_config_reference() -> str:
    """Every setting of ``bs-unlearn attack`` (``bs_train.attacks.config.AttackConfig``)."""
    _on_path()
    from bs_train.attacks.config import AttackConfig

    return "\n".join(_field_entries(AttackConfig, "attack.", "bs_train/attacks/config.py AttackConfig"))


def defaults_block() -> str:
    """The resolved default config, exactly as ``bs-unlearn config unlearn`` prints it."""
    _on_path()
    from bs_train.config import load_config

    return "```yaml\n" + load_config(None, [], command="unlearn").to_yaml() + "```"


def memory_plans_table() -> str:
    """The settings each memory plan fills in (``bs_train.memory.PLANS``; what the config sets itself wins)."""
    _on_path()
    from bs_train.memory import PLANS

    rows = ["| `train.memory_plan` | sized for | settings it fills in |", "| --- | --- | --- |"]
    for name, plan in PLANS.items():
        settings = " ".join(f"`{section}.{key}={_yaml_value(value)}`" for section, values in plan["settings"].items()
                            for key, value in values.items())
        rows.append(f"| `{name}` | {plan['gpu_gib'] * 2**30 / 1e9:.0f} GB | {settings} |")
    return "\n".join(rows)


def presets_table() -> str:
    """Each preset's overrides: those common to a command, then each method's own (``bs_train.methods``)."""
    _on_path()
    from bs_train.methods import METHODS, PRESETS

    lines = []
    for preset, per_command in PRESETS.items():
        lines += [f"**`--preset {preset}`**", "", "| applies to | overrides (in this order; yours come after) |",
                  "| --- | --- |"]
        for command, overrides in per_command.items():
            lines.append(f"| every `{command}` run | {' '.join(f'`{o}`' for o in overrides)} |")
        for name, method in METHODS.items():
            if method.open_unlearning:
                lines.append(f"| `method.name={name}` | {' '.join(f'`{o}`' for o in method.open_unlearning)} |")
        lines.append("")
    return "\n".join(lines)


def method_table() -> str:
    """What each method of the table needs, read from its ``Method`` row (``bs_train.methods.METHODS``)."""
    _on_path()
    from bs_train.methods import CONFIGURED, METHODS

    rows = ["| `method.name` | command | retain term | needs | BS-S base | recipe | demo |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in METHODS.items():
        retain = ("`method.retain`" if m.retain == CONFIGURED else "none" if m.retain is None
                  else f"its own (`{m.retain.__name__}`)")
        if m.dual:
            retain += ", as a constraint (dual variable)"
        needs = [text for flag, text in ((m.ref_logp, "reference log-probs, computed once"),
                                         (m.reference, "the frozen initial model"),
                                         (m.beliefs, "beliefs, sampled by the model"),
                                         (m.alternates and not m.sample_alternates, "alternate answers"),
                                         (m.sample_alternates, "alternates, sampled once by the initial model"),
                                         (m.setup is not None, f"a setup hook (`{getattr(m.setup, '__name__', '')}`)"),
                                         (m.after_step is not None, "a step after every optimizer step")) if flag]
        tick = {True: "✓", False: ""}
        rows.append(f"| `{name}` | {m.command} | {retain} | {'; '.join(needs) or '–'} | {tick[m.bss_base]} | "
                    f"{tick[m.recipe]} | {tick[m.demo]} |")
    return "\n".join(rows)


# ---- included repository files ------------------------------------------------------------------------------------

_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")


def include(path: str, page_path: str) -> str:
    """The repository file ``path`` as Markdown for the page at ``page_path`` (relative to docs/): a relative link
    to a file ``INCLUDED`` shows becomes a link to its page, any other relative link its target's repository path in
    code; a note under the title names the file."""
    source = REPO / path
    if not source.is_file():
        raise _error(f"bs-docs:include {path}: no such file in the repository")
    text = source.read_text(encoding="utf-8")
    page_dir = Path(page_path).parent

    def relink(m: re.Match) -> str:
        label, target = m.groups()
        if re.match(r"^[a-z]+:|^#", target):
            return m.group(0)
        target_path, _, anchor = target.partition("#")
        resolved = (source.parent / target_path).resolve()
        try:
            repo_path = resolved.relative_to(REPO).as_posix()
        except ValueError:
            return f"{label} (`{target}`)"
        if repo_path in INCLUDED:
            rel = Path(_relpath(INCLUDED[repo_path], page_dir))
            return f"[{label}]({rel.as_posix()}{'#' + anchor if anchor else ''})"
        return f"{label} (`{repo_path}`)"

    text = _LINK.sub(relink, text)
    lines = [_table_pipes(line) if line.startswith("|") else line for line in text.splitlines()]
    note = f"*This page is the repository's `{path}`, included when the documentation is built.*"
    at = 1 if lines and lines[0].startswith("# ") else 0
    return "\n".join([*lines[:at], "", note, "", *lines[at:]]) + "\n"


def _table_pipes(row: str) -> str:
    """A table row with GitHub's ``\\|`` inside code spans made a plain ``|``: Python-Markdown already keeps a pipe
    inside backticks in its cell, and would show the backslash."""
    return _CODE_SPAN.sub(lambda m: m.group(0).replace("\\|", "|"), row)


def _relpath(target: str, page_dir: Path) -> str:
    import os

    return os.path.relpath(target, page_dir.as_posix() or ".")


# ---- the API's coverage -------------------------------------------------------------------------------------------

def public_api() -> dict[str, object]:
    """Every public object of ``PUBLIC``, by its path (``bs_kernels.bst_loss``), as griffe loads it from the
    source (the view mkdocstrings renders)."""
    import griffe

    package = griffe.load("bs_kernels", search_paths=[str(REPO)], allow_inspection=False)
    found: dict[str, object] = {}
    for dotted in PUBLIC:
        module = package
        for part in dotted.split(".")[1:]:
            module = module[part]
        names = list(module.exports) if module.exports is not None else [
            name for name, member in module.members.items()
            if not name.startswith("_") and not member.is_alias and (member.is_function or member.is_class)]
        for name in names:
            found[f"{dotted}.{name}"] = module[str(name)]
    return found


def _undocumented(path: str, obj) -> list[str]:
    target = obj.final_target if getattr(obj, "is_alias", False) else obj
    missing = [] if target.docstring and target.docstring.value.strip() else [path]
    if target.is_class:
        for name, member in target.members.items():
            if name.startswith("_") or getattr(member, "is_alias", False):
                continue
            if not (member.docstring and member.docstring.value.strip()):
                missing.append(f"{path}.{name}")
    return missing


def check_api(documented: set[str]) -> None:
    """Every public object has a docstring (a class: its public members too) and an entry among ``documented`` (the
    ``::: identifier`` blocks of the pages), named by its public path, the path it is defined at, or its module's
    (a submodule's block renders all its public members; the package's own is too broad to count)."""
    api = public_api()
    missing_doc = [name for path, obj in api.items() for name in _undocumented(path, obj)]
    if missing_doc:
        raise _error(f"no docstring: {', '.join(missing_doc)} (every public object of {', '.join(PUBLIC)} says what "
                     "it computes)")
    absent = [path for path, obj in api.items()
              if path not in documented and getattr(obj, "final_target", obj).path not in documented
              and path.rsplit(".", 1)[0] not in documented - {"bs_kernels"}]  # a module's block renders its members
    if absent:
        raise _error(f"public but on no API page (add a `::: name` block to docs/reference/api/): {', '.join(absent)}")


# ---- mkdocs hooks -------------------------------------------------------------------------------------------------

GENERATORS = {"cli": cli_reference, "config": config_reference, "attack-config": attack_config_reference,
              "defaults": defaults_block, "memory-plans": memory_plans_table, "presets": presets_table,
              "method-table": method_table}


def on_config(config, **kwargs):
    _on_path()
    return config


def on_files(files, config, **kwargs):
    """Before any page is rendered: the public API is documented, on the API pages, every object of it."""
    documented = set()
    for file in files.documentation_pages():
        documented.update(API_BLOCK.findall(Path(file.abs_src_path).read_text(encoding="utf-8")))
    check_api(documented)
    return files


def render_markers(markdown: str, page_path: str) -> str:
    """``markdown`` with every ``<!-- bs-docs:... -->`` marker replaced by its text; an unknown one is an error."""
    def expand(m: re.Match) -> str:
        kind, arg = m.groups()
        if kind == "include":
            if not arg:
                raise _error(f"{page_path}: bs-docs:include needs a repository path")
            return include(arg, page_path)
        if kind not in GENERATORS or arg:
            raise _error(f"{page_path}: unknown marker bs-docs:{kind}{' ' + arg if arg else ''} (known: include, "
                         f"{', '.join(GENERATORS)})")
        return GENERATORS[kind]()

    return lists_need_blank_lines(MARKER.sub(expand, markdown))


def on_page_markdown(markdown, page, config, files, **kwargs):
    return render_markers(markdown, page.file.src_uri)
