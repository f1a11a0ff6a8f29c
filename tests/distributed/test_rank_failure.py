"""A rank that raises makes the launch fail loudly, naming the rank, and leaves no process behind."""
from __future__ import annotations

import pytest

from launcher.procs import processes_with_marker
from tests.helpers import make_spec, meshyard, run_dir

pytestmark = pytest.mark.distributed


def test_exception_on_rank_1_is_reported_and_nothing_is_left(tmp_path):
    spec = make_spec(
        tmp_path, "crash",
        model={"target": "tests.fixtures.faulty:model_failing_on_rank",
               "kwargs": {"fail_rank": 1, "in_dim": 8, "hidden": 16, "out_dim": 1}},
        strategy={"name": "ddp"}, resources={"procs_per_node": 2},
    )
    result = meshyard("launch", str(spec))
    assert result.returncode == 1
    report = result.stderr[result.stderr.index("error: the job failed"):]
    first = report.splitlines()[1]
    assert first == "  rank 1 (first to fail): RuntimeError: injected failure in the model factory on rank 1"
    assert processes_with_marker(str(run_dir(spec) / "spec.json")) == []
