"""Read a YAML job spec, apply `--set a.b=c` overrides, validate into a frozen JobSpec.

Every failure becomes a SpecError with the dotted field path and what is allowed, so the CLI can
print one line and exit 2.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from launcher.errors import SpecError, UserError
from launcher.spec.reader import parse_yaml, read_text
from launcher.spec.schema import JobSpec

PATTERN_HINTS = {
    "target": 'expected an import path "module:callable", e.g. launcher.models:mlp',
    "loss": 'expected mse, cross_entropy, token_cross_entropy, model or an import path "module:callable"',
    "collate": 'expected an import path "module:callable"',
    "name": 'expected letters, digits, ".", "_" or "-" (it names the run directory)',
}

# Caps that catch a typo (procs_per_node: 80000) before the launcher starts that many processes. They
# are checked where a spec file is loaded, not in the schema, so ranks re-reading spec.json never
# trip on them. A machine that really needs more sets the variable, e.g. MESHYARD_MAX_PROCS_PER_NODE=512.
SITE_LIMITS = {
    "resources.nodes": ("MESHYARD_MAX_NODES", 1024),
    "resources.procs_per_node": ("MESHYARD_MAX_PROCS_PER_NODE", 256),
    "data.num_workers": ("MESHYARD_MAX_NUM_WORKERS", 64),
}


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Load `path`, apply overrides (`section.key=value`, value parsed as YAML), validate."""
    raw = read_yaml_mapping(Path(path))
    for override in overrides:
        apply_override(raw, override)
    spec = validate_spec(raw, source=str(path))
    check_site_limits(spec)
    return spec


def check_site_limits(spec: JobSpec) -> None:
    """Refuse values above SITE_LIMITS (each overridable by its environment variable)."""
    for field, (variable, default) in SITE_LIMITS.items():
        section, key = field.split(".")
        value, limit = getattr(getattr(spec, section), key), default
        if os.environ.get(variable):
            try:
                limit = int(os.environ[variable])
            except ValueError:
                raise UserError(f"{variable}={os.environ[variable]!r}: expected an integer") from None
        if value > limit:
            raise SpecError(field, f"{value} is above the limit of {limit} (a typo? if this machine really needs it,"
                                   f" set {variable}={value})")


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The file's top-level mapping, read within reader.py's limits (size, alias expansion, depth)."""
    if not path.is_file():
        raise UserError(f"{path}: spec file not found")
    raw = parse_yaml(read_text(path), source=str(path))
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
        node[parts[-1]] = parse_yaml(text, source=f"--set {key}") if text else ""
    except UserError:  # not YAML (or past the limits): the literal text, which the schema then judges
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
        message = f"{PATTERN_HINTS.get(loc[-1], 'malformed value')} (got {_shown(err['input'])})"
    else:
        message = _plain(err["msg"])
        if err["type"] not in ("value_error", "assertion_error") and "input" in err:
            message += f" (got {_shown(err['input'])})"
    if len(errors) > 1:
        message += f" [+{len(errors) - 1} more problem(s)]"
    return SpecError(".".join(loc) or "spec", message)


def _shown(value: Any, limit: int = 80) -> str:
    """The offending input for the one line: a 300-character name or a huge list must not become the line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


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
