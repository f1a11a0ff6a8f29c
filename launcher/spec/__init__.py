"""Job spec: YAML -> overrides -> frozen, typed JobSpec (see schema.py for every field)."""
from launcher.spec.load import load_spec, spec_from_json_file, validate_spec
from launcher.spec.schema import JobSpec

__all__ = ["JobSpec", "load_spec", "spec_from_json_file", "validate_spec"]
