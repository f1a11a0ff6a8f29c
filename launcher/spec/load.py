"""Read a YAML job spec, apply `--set a.b=c` overrides, validate into a frozen JobSpec.

Every failure becomes a SpecError with the dotted field path and what is allowed, so the CLI can
print one line and exit 2.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from launcher.errors import SpecError, UserError
from launcher.spec.schema import JobSpec

PATTERN_HINTS = {
    "target": 'expected an import path "module:callable", e.g. launcher.models:mlp',
    "loss": 'expected mse, cross_entropy, token_cross_entropy or an import path "module:callable"',
    "name": 'expected letters, digits, ".", "_" or "-" (it names the run directory)',
}


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Load `path`, apply overrides (`section.key=value`, value parsed as YAML), validate."""
    raw = read_yaml_mapping(Path(path))
    for override in overrides:
        apply_override(raw, override)
    return validate_spec(raw, source=str(path))


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: spec file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: YAML syntax error{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: YAML syntax error: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a job spec must be a YAML mapping of sections (name, model, data, ...)")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in the raw mapping; the value is typed later by the schema."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise UserError(f"--set {override!r}: expected KEY=VALUE, e.g. --set optimizer.lr=0.01")
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(".".join(parts[: depth + 1]), f"is a value, not a section; cannot set {key}")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        node[parts[-1]] = text


def validate_spec(raw: dict[str, Any], source: str = "spec") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise first_error(exc) from None


def spec_from_json_file(path: str | Path) -> JobSpec:
    """The resolved spec that executors hand to every rank."""
    return validate_spec(json.loads(Path(path).read_text()), source=str(path))


def first_error(exc: ValidationError) -> SpecError:
    """Turn pydantic's report into one line: the first problem, plus how many more there are."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_fields_at(JobSpec, loc[:-1]))
        message = f"unknown key; allowed here: {allowed}"
    elif err["type"] == "missing":
        message = "required field is missing"
    elif err["type"] == "string_pattern_mismatch":
        message = f"{PATTERN_HINTS.get(loc[-1], 'malformed value')} (got {err['input']!r})"
    else:
        message = _plain(err["msg"])
        if err["type"] not in ("value_error", "assertion_error") and "input" in err:
            message += f" (got {err['input']!r})"
    if len(errors) > 1:
        message += f" [+{len(errors) - 1} more problem(s)]"
    return SpecError(".".join(loc) or "spec", message)


def _plain(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the section at `loc`, for 'allowed here' hints."""
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
