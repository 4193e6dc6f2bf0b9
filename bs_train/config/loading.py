"""From YAML and ``section.key=value`` overrides to a validated ``RunConfig``, and back.

YAML is read with YAML 1.2's booleans (``yes`` / ``no`` stay strings, refused by name by a boolean field); every
value is coerced to its field's declared type or refused naming the field; unknown keys are refused naming the known
ones; a syntax error names file:line:column. ``load_config`` applies a preset's overrides (``methods.PRESETS``) before
the user's, which win. A run writes its resolved config beside its outputs under ``RESOLVED_HEADER``, which is how a
run tells its own ``config.yaml`` from a user's (``is_resolved_config``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from .. import memory, methods
from .sections import SECTIONS, MethodConfig, RunConfig


RESOLVED_HEADER = "# bs-unlearn: the resolved config of this run, written by the run itself (edit a copy, not this)\n"
"""First line of the ``config.yaml`` a run writes beside its outputs: how a run tells its own file from a user's."""


def is_resolved_config(text: str) -> bool:
    """Was ``text`` written by a run as its resolved config (``RESOLVED_HEADER``; before the header existed: a plain
    ``yaml.safe_dump`` of every section, which holds no comment)? A user's own config file is anything else."""
    if text.startswith(RESOLVED_HEADER):
        return True
    if any(line.lstrip().startswith("#") for line in text.splitlines()):
        return False
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    full = RunConfig().to_dict()  # a file from before a setting existed lacks only that setting
    return isinstance(raw, dict) and set(raw) == set(full) and all(
        isinstance(raw[k], dict) and set(raw[k]) <= set(v) and len(raw[k]) >= len(v) - 3 for k, v in full.items()
        if isinstance(v, dict))


class _StrictLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true / false (any case PyYAML's 1.1 rules allow) are booleans, so
    ``yes`` / ``no`` / ``on`` / ``off`` / ``y`` / ``n`` stay strings and a boolean field refuses them by name."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _yaml(text: str):
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def _coerce(where: str, annotation: str, value: Any) -> Any:
    """Convert a YAML value to a field's declared type (YAML 1.1 reads ``1e-5`` as a string), or say why not."""
    optional = annotation.endswith("| None")
    base = annotation.removesuffix("| None").strip()
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where} must not be empty")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError(f"{where} must be true or false, got {value!r}")
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base == "str":
            return str(value)
    except (TypeError, ValueError):
        if base == "bool":
            raise
        raise ValueError(f"{where} must be {annotation}, got {value!r}") from None
    return value


def _with_plan(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill in the settings of ``train.memory_plan`` that ``raw`` does not set itself (what is set wins)."""
    plan = (raw.get("train") or {}).get("memory_plan", "none") if isinstance(raw.get("train"), dict) else "none"
    if plan in (None, "none") or plan not in memory.PLANS:
        return raw  # an unknown name is refused by TrainConfig's validation
    for section, values in memory.PLANS[plan]["settings"].items():
        raw[section] = {**values, **(raw.get(section) or {})}
    return raw


def build_config(raw: dict[str, Any]) -> RunConfig:
    """A ``RunConfig`` from a nested dict, rejecting unknown keys by name."""
    raw = _with_plan(dict(raw))
    kwargs: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values = raw.pop(section, None) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a mapping, got {values!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in section {section!r}; known: {sorted(known)}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs[section] = cls(**{k: _coerce(f"{section}.{k}", types[k], v) for k, v in values.items()})
    known_top = {"command", "output_dir"}
    unknown = sorted(set(raw) - known_top)
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown}; known: {sorted(known_top | set(SECTIONS))}")
    top = {k: _coerce(k, "str", v) for k, v in raw.items()}
    return RunConfig(**top, **kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars) to a nested config dict."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        try:
            parsed = _yaml(value) if value != "" else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"override {item!r}: {value!r} is not a YAML value ({problem}); quote a string "
                             f"value, e.g. {key}='\"{value}\"'") from None
        parts = key.split(".")
        if len(parts) == 1:
            raw[parts[0]] = parsed
        elif len(parts) == 2:
            raw.setdefault(parts[0], {})
            if not isinstance(raw[parts[0]], dict):
                raise ValueError(f"override {item!r}: {parts[0]!r} is not a section")
            raw[parts[0]][parts[1]] = parsed
        else:
            raise ValueError(f"override {item!r}: keys nest at most two levels (section.key)")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, preset: str | None = None,
                **top) -> RunConfig:
    """Read a YAML config (optional), apply a preset's overrides (``methods.PRESETS``, for the method the file and
    ``overrides`` name), then ``overrides``, validate. The user's overrides win over the preset's."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        try:
            raw = _yaml(text) or {}
        except yaml.MarkedYAMLError as e:  # file:line:column, as a compiler would say it
            mark = e.problem_mark or e.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            raise ValueError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: YAML error: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config file must hold a mapping, got {type(raw).__name__}")
    raw.update({k: v for k, v in top.items() if v is not None})
    if preset is not None:
        named = apply_overrides(raw, overrides or [])
        name = (named.get("method") or {}).get("name", MethodConfig.name)
        rows = [n for n, m in methods.METHODS.items() if m.command == named.get("command", RunConfig.command)]
        if name not in rows and len(rows) == 1:  # a command with one method (finetune) runs that one
            name = rows[0]
        raw = apply_overrides(raw, methods.preset_overrides(preset, str(name)))
    return build_config(apply_overrides(raw, overrides or []))
