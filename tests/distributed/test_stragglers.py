"""Per-rank timing: a rank whose data loading turns slow is named the straggler, and no rank is
while the ranks are even (one launch: even, then rank 1 slow, then even again)."""
from __future__ import annotations

import pytest

from launcher.metrics import read_metrics
from launcher.stragglers import CONSECUTIVE
from tests.helpers import make_spec, meshyard, run_dir

pytestmark = pytest.mark.distributed

# 24 steps of 4 items, 25 ms each (long sleeps: a loaded machine's wake-up delays stay well under the
# 20% threshold), logged every 3 steps: records at steps 1 (not judged), 3, ..., 24. Rank 1's items
# take 50 ms during steps 13-21 (its item calls 49-84): the intervals ending at 15, 18 and 21.
SLOW_STEPS = (13, 21)
STRAGGLE_CALLS = (4 * (SLOW_STEPS[0] - 1) + 1, 4 * SLOW_STEPS[1])


def test_a_rank_whose_data_turns_slow_is_named_and_only_then(tmp_path):
    data = {"target": "tests.fixtures.faulty:SlowDataset", "micro_batch_size": 4,
            "kwargs": {"n": 96, "in_dim": 8, "out_dim": 1, "delay_s": 0.025,
                       "straggle_rank": 1, "straggle_calls": list(STRAGGLE_CALLS)}}
    spec = make_spec(tmp_path, "straggler", data=data, training={"max_steps": 24, "log_every": 3},
                     strategy={"name": "ddp"}, resources={"procs_per_node": 2})
    result = meshyard("launch", str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir(spec))

    assert [m["step"] for m in metrics] == [1, 3, 6, 9, 12, 15, 18, 21, 24]
    assert all(len(m[key]) == 2 for m in metrics for key in
               ("rank_step_s", "rank_data_wait_s", "rank_compute_s", "rank_collective_wait_s"))
    slow = [m for m in metrics if SLOW_STEPS[0] < m["step"] <= SLOW_STEPS[1]]
    assert len(slow) == CONSECUTIVE
    for m in slow:
        assert m["rank_data_wait_s"][1] > 1.5 * m["rank_data_wait_s"][0], m
        assert m["rank_collective_wait_s"][0] > m["rank_collective_wait_s"][1] + 0.05, m  # rank 0 waits for it
        assert m["slowest_rank"] == 1 and m["slowest_excess"] > 0.5, m
    # named once it stayed slow for CONSECUTIVE intervals, never while the ranks were even
    assert [m["straggler"] for m in metrics] == [None] * 7 + [1, None]

    console = result.stdout
    named = console.index(f"straggler: rank 1 for {CONSECUTIVE} logged intervals")
    assert console.index("step     21") < named < console.index("step     24")
    assert console.index("straggler: rank 1 caught up") > console.index("step     24")
    assert console.count("straggler:") == 2
