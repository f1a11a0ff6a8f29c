"""`make run` (the README's first command) trains the quickstart on 2 local processes; loss falls."""
from __future__ import annotations

import subprocess

import pytest

from launcher.metrics import read_metrics
from tests.helpers import REPO

pytestmark = pytest.mark.distributed


def test_make_run_trains_the_quickstart(tmp_path):
    result = subprocess.run(
        ["make", "-s", "run", f"RUN_ARGS=--set output.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "world size       2 = 1 node(s) x 2 process(es)" in result.stdout
    assert "done: 200/200 steps" in result.stdout
    metrics = read_metrics(tmp_path / "mlp-quickstart")
    assert metrics[-1]["step"] == 200
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    assert {"step", "loss", "penalty", "lr", "grad_norm", "samples_per_s", "step_time_s"} <= metrics[-1].keys()
