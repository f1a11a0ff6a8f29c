"""Hang triage end to end: rank 1 sleeps in its forward while rank 0 enters the gradient all-reduce;
the report names rank 1 as the rank that had not entered that collective, from torch's Flight
Recorder, whose dumps it leaves in the run directory."""
from __future__ import annotations

import json
import re
import time

import pytest

from launcher.flight_recorder import DUMP_DIR, entered
from launcher.procs import processes_with_marker
from tests.faults import SLOW
from tests.helpers import make_spec, meshyard, run_dir

pytestmark = pytest.mark.distributed

TIMEOUT_S = 10


def test_the_report_names_the_rank_that_never_entered_the_collective(tmp_path):
    model = {"target": "tests.fixtures.faulty:HangingMLP",  # call 13: the first micro-batch of step 5
             "kwargs": {"hang_rank": 1, "hang_call": 13, "in_dim": 8, "hidden": 16, "out_dim": 1}}
    spec = make_spec(tmp_path, "hung", **{**SLOW, "model": model})
    started = time.monotonic()
    result = meshyard("launch", str(spec), "--set", f"training.collective_timeout_s={TIMEOUT_S}")
    assert time.monotonic() - started < TIMEOUT_S + 30 + 15  # + 15: starting torch and the ranks
    assert result.returncode == 1
    report = result.stderr[result.stderr.index("error: the job hung"):].splitlines()
    assert report[1].startswith("  rank 1 (first to fail): stuck after step 4 (step), in "), report
    missing = next(line for line in report if "had not entered" in line)
    seq = int(re.fullmatch(r"\s+had not entered collective #(\d+) of group 0 \(gloo:all_reduce \[\[\d+\]\]\),"
                           r" which rank\(s\) 0 entered", missing).group(1))
    waiting = next(line for line in report if line.startswith("  rank 0 "))
    assert waiting.startswith(f"  rank 0 (failed after it): waiting for peers after step 4 (step), in collective"
                              f" #{seq} of group 0 (gloo:all_reduce"), waiting
    assert "/torch/" in waiting.rsplit(", in ", 1)[1], waiting  # its stack is in torch's code, waiting

    folder = run_dir(spec) / "heartbeats" / DUMP_DIR
    assert f"Flight Recorder dumps of rank(s) 0, 1: {folder}/rank<r>.json" in [line.strip() for line in report]
    dumps = {rank: json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert entered(dumps[0])["0"] == seq and entered(dumps[1])["0"] == seq - 1
    assert [e["profiling_name"] for e in dumps[0]["entries"] if e["collective_seq_id"] == seq] == ["gloo:all_reduce"]
    assert processes_with_marker(str(run_dir(spec) / "spec.json")) == []
