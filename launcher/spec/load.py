"""Read a YAML job spec, apply `--set a.b=c` overrides, validate into a frozen JobSpec.

Every failure becomes a SpecError with the dotted field path and what is allowed, so the CLI can
print one line and exit 2.
"""
from __future__ import annotations

import json
import os
import re
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
    "activation_checkpointing": "expected none, full or every_<k> with k a positive integer (e.g. every_2)",
}

# `name:zero` read as a key: YAML separates a key from its value only by a colon AND a space, so
# `{name:zero,stage:2}` is {"name:zero": null, "stage:2": null}. (Not `http://...`: a colon then a slash.)
GLUED_KEY = re.compile(r"[A-Za-z_][\w.-]*:[^\s/:]\S*")
SHOWN_PROBLEMS = 3

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
    glued = glued_keys(raw)
    if glued:
        where, key = glued[0]
        raise SpecError(f"{where}.{key}" if where else key, "YAML reads this as one key with no value; a colon"
                                                             f" needs a space after it ({_unglued(key)})")
    return raw


def glued_keys(value: Any, path: str = "") -> list[tuple[str, str]]:
    """(dotted path of the mapping, key) for each key YAML read from `key:value` with no space after the colon."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if item is None and isinstance(key, str) and GLUED_KEY.match(key):
                found.append((path, key))
            found += glued_keys(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for item in value:
            found += glued_keys(item, path)
    return found


def _unglued(key: str) -> str:
    return key.replace(":", ": ", 1)


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
        value = parse_yaml(text, source=f"--set {key}") if text else ""
    except UserError:  # not YAML (or past the limits): the literal text, which the schema then judges
        value = text
    glued = [bad for _, bad in glued_keys(value)]
    if glued:
        for bad in glued:
            text = text.replace(bad, _unglued(bad))
        raise UserError(f"--set {override!r}: YAML reads {', '.join(glued)} as {'a key' if len(glued) == 1 else 'keys'}"
                        f" with no value (a colon needs a space after it); write --set '{key}={text}'")
    node[parts[-1]] = value


def validate_spec(raw: dict[str, Any], source: str = "spec") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise first_error(exc) from None


def spec_from_json_file(path: str | Path) -> JobSpec:
    """The resolved spec that executors hand to every rank."""
    return validate_spec(json.loads(Path(path).read_text()), source=str(path))


def first_error(exc: ValidationError) -> SpecError:
    """Turn pydantic's report into one line: up to SHOWN_PROBLEMS problems, then how many more there are."""
    problems = [_problem(err) for err in exc.errors(include_url=False)]
    (path, message), others = problems[0], problems[1:SHOWN_PROBLEMS]
    message += "".join(f"; also {where or 'spec'}: {what}" for where, what in others)
    if len(problems) > SHOWN_PROBLEMS:
        message += f" [+{len(problems) - SHOWN_PROBLEMS} more problem(s)]"
    return SpecError(path or "spec", message)


def _problem(err: Any) -> tuple[str, str]:
    """(dotted field path, what is wrong and what is allowed) for one of pydantic's errors."""
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
        text = err.get("input")
        if err["type"] in ("model_type", "dict_type") and isinstance(text, str) and GLUED_KEY.fullmatch(text):
            field = ".".join(loc) + "." + text.replace(":", "=", 1)
            message += f"; for a section write {{{_unglued(text)}}} (a space after the colon) or --set {field}"
    return ".".join(loc), message


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
