"""Per-rank timing: what counts as data wait, compute and collective wait, and who is the straggler."""
from __future__ import annotations

import time

import pytest
import torch

from launcher.cli import main
from launcher.stragglers import CONSECUTIVE, FIELDS, RankTimer, StragglerWatch, excess


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_sleeping_outside_the_data_wait_is_collective_wait_and_running_is_compute():
    """A blocked main thread (as in a gloo collective) is not this rank's compute; running is."""
    timer = RankTimer()
    timer.start()
    time.sleep(0.05)  # the dataset
    timer.data_ready()
    busy(0.05)  # forward/backward
    time.sleep(0.1)  # waiting in a collective
    step_s = timer.stop()
    (mean_step, data_s, compute_s) = timer.take()
    assert mean_step == step_s and 0.05 <= data_s < 0.08
    assert 0.04 < compute_s < 0.09
    assert step_s - data_s - compute_s > 0.09
    assert timer.take() == (0.0, 0.0, 0.0)  # a new interval


def test_the_excess_is_the_slowest_rank_over_the_others_median():
    rank, over = excess([1.0, 1.1, 1.0, 1.3])
    assert rank == 3 and over == pytest.approx(0.3)
    assert excess([5.0, 1.0]) == (0, 4.0)
    assert excess([1.0]) is None and excess([1.0, 0.0, 0.0]) is None


def test_a_rank_is_named_after_consecutive_slow_intervals_past_the_threshold_and_then_caught_up():
    watch = StragglerWatch(threshold=0.2, device=torch.device("cpu"))
    even, slow, within = _table(0.10, 0.10), _table(0.10, 0.13), _table(0.10, 0.115)
    judged = [watch.judge(t) for t in [slow, within, slow, slow, within, slow, slow, slow, even]]
    # the first interval is not judged; 15% is within the threshold and breaks the streak
    assert [fields["straggler"] for fields, _ in judged] == [None] * (5 + CONSECUTIVE - 1) + [1, None]
    assert [fields["slowest_rank"] for fields, _ in judged] == [1] * 8 + [0]  # a tie: the first rank, by 0%
    assert judged[2][0]["slowest_excess"] == 0.3
    assert judged[3][0]["rank_collective_wait_s"] == [0.03, 0.0]  # rank 0 waits for rank 1 in collectives
    news = [line for _, line in judged if line is not None]
    assert len(news) == 2
    assert news[0].startswith(f"straggler: rank 1 for {CONSECUTIVE} logged intervals: its own time 130.0 ms/step")
    assert news[1] == "straggler: rank 1 caught up with the others"


def test_one_process_gathers_its_own_timing_and_has_nobody_to_compare_with():
    timer = RankTimer()
    timer.start()
    timer.data_ready()
    timer.stop()
    fields, news = StragglerWatch(threshold=0.2, device=torch.device("cpu")).check(timer)
    assert len(fields["rank_step_s"]) == 1 and fields["slowest_rank"] is None and news is None
    assert tuple(fields) == FIELDS  # what the tests' run comparisons leave out


def _table(rank0_own_s: float, rank1_own_s: float) -> list[list[float]]:
    """(step, data wait, compute) per rank: both finish the step together, at the slower one's pace."""
    step_s = max(rank0_own_s, rank1_own_s)
    return [[step_s, own_s / 2, own_s / 2] for own_s in (rank0_own_s, rank1_own_s)]


def test_a_threshold_that_is_not_a_positive_number_is_one_line_naming_the_field(capsys):
    for bad, said in (("0", "Input should be greater than 0"), ("fast", "Input should be a valid number")):
        assert main(["validate", "examples/quickstart.yaml", "--set", f"observe.straggler_threshold={bad}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: observe.straggler_threshold: {said}") and err.count("\n") == 1, err
