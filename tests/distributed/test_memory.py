"""What a rank's memory really is: CPU ranks start with the allocator settings that return freed
buffers (a variable the user set wins), and every logged step carries the process's peak RSS beside
the model-state accounting, with every rank's peak in the summary."""
from __future__ import annotations

import json

import pytest

from launcher.allocator import CPU_ALLOCATOR_ENV
from launcher.metrics import read_metrics
from tests.fixtures.allocator_probe import BUFFER_MIB, reports
from tests.helpers import launch_ok, make_spec

pytestmark = pytest.mark.distributed

USERS_TRIM = "2097152"


def test_ranks_return_freed_buffers_and_log_their_peak_rss(tmp_path, monkeypatch):
    for name in CPU_ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    model = {"target": "tests.fixtures.allocator_probe:mlp_reporting_allocator",
             "kwargs": {"report_dir": str(tmp_path), "in_dim": 8, "hidden": 16, "out_dim": 1, "depth": 2}}
    run = launch_ok(make_spec(tmp_path, model=model, strategy={"name": "zero", "stage": 3},
                              training={"max_steps": 3}, resources={"procs_per_node": 2}),
                    env={"MALLOC_TRIM_THRESHOLD_": USERS_TRIM})

    ranks = [r for r in reports(tmp_path) if r["rank"] is not None]
    assert sorted(r["rank"] for r in ranks) == ["0", "1"]
    for rank in ranks:
        # Started with ours where the user set nothing, the user's where they did ...
        assert rank["malloc_env"] == {**CPU_ALLOCATOR_ENV, "MALLOC_TRIM_THRESHOLD_": USERS_TRIM}
        # ... and glibc acts on them: every freed buffer leaves resident memory (by default only the first).
        assert all(mib > BUFFER_MIB - 1 for mib in rank["returned_mib"]), rank

    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["peak_rss_bytes"] > record["rss_before_model_bytes"] > 50 * 2**20  # torch alone is more
        assert record["mem_params_bytes"] > 0 and "cuda_max_allocated_bytes" not in record
    summary = json.loads((run / "summary.json").read_text())
    peaks, baselines = summary["peak_rss_bytes_by_rank"], summary["rss_before_model_bytes_by_rank"]
    assert len(peaks) == len(baselines) == 2 and all(p > b for p, b in zip(peaks, baselines))
    assert peaks[0] >= records[-1]["peak_rss_bytes"]  # rank 0: its last logged peak, or more after the final save
