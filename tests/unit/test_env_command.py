"""`meshyard env`: the versions, devices and settings a bug report needs; secrets never printed."""
from __future__ import annotations

import json
import os
import subprocess

import torch

from tests.helpers import MESHYARD, REPO

PLANTED = {"OMP_NUM_THREADS": "3", "MESHYARD_SECRET_TOKEN": "do-not-print-me", "UNRELATED_VARIABLE": "x"}


def _env(*args: str) -> str:
    result = subprocess.run([MESHYARD, "env", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **PLANTED})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_env_block_names_versions_backends_and_run_settings_without_secrets():
    out = _env()
    assert f"- torch: {torch.__version__}" in out.splitlines()
    assert "gloo" in next(line for line in out.splitlines() if line.startswith("- distributed backends:"))
    environment = next(line for line in out.splitlines() if line.startswith("- environment:"))
    assert "OMP_NUM_THREADS=3" in environment and "MESHYARD_SECRET_TOKEN=<hidden>" in environment
    assert "do-not-print-me" not in out and "UNRELATED_VARIABLE" not in out


def test_env_json_is_for_scripts():
    info = json.loads(_env("--json"))
    assert info["packages"]["torch"] == torch.__version__
    assert info["cpu_cores"]["usable"] >= 1 and info["memory_bytes"]["total"] > 0
    assert info["environment"]["MESHYARD_SECRET_TOKEN"] == "<hidden>"
