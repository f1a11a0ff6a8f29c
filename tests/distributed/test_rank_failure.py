"""A rank that raises makes the launch fail loudly, naming the rank, and leaves no process behind.

The console reads like meshyard, not like torchrun: the launcher's summary (each failing rank, the
first one first) and where the logs are, in a few lines; the tracebacks are in the ranks' log files.
"""
from __future__ import annotations

import re
from pathlib import Path

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

    # after the plan and the command line: the report only, with no traceback of any rank or of torch elastic
    after_launching = (result.stdout + result.stderr).split("launching (local): ", 1)[1].splitlines()[1:]
    assert report.splitlines() == after_launching and len(after_launching) <= 10, after_launching
    assert "Traceback" not in result.stdout + result.stderr and "torch.distributed.elastic" not in result.stderr
    logs = re.fullmatch(r"  rank 1's full output: (\S+); every rank's: (\S+)/<local rank>/stderr.log, stdout.log",
                        report.splitlines()[-1])
    assert logs, report
    full = Path(logs[1]).read_text()  # the rank's whole traceback, down to the user's line
    assert "Traceback (most recent call last)" in full and 'raise RuntimeError(f"injected failure' in full, full
    assert logs[1] == f"{logs[2]}/1/stderr.log"
    assert Path(logs[2], "0", "stderr.log").is_file()
