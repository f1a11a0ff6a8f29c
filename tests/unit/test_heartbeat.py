"""Heartbeats and the hang watch: what a beat says, who is blamed, when the watch decides."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from launcher.heartbeat import (
    FROZEN_AFTER_S,
    INTERVAL_S,
    HangWatch,
    Heartbeat,
    diagnose,
    frozen_ranks,
    read_heartbeats,
    watch_seconds,
)
from tests.helpers import REPO

WAITING = "/x/torch/distributed/distributed_c10d.py:4000 in all_reduce"
OWN_CODE = "/x/model.py:10 in forward"


def beat(rank: int, step: int = 3, phase: str = "step", at: float = 0.0, frame: str = WAITING,
         waiting_s: float = 0.0) -> dict:
    return {"rank": rank, "pid": 100 + rank, "step": step, "phase": phase, "time": time.time() + at,
            "stack": ["/x/trainer.py:1 in _train", frame], "waiting_s": waiting_s}


def write(directory, *beats: dict) -> None:
    directory.mkdir(exist_ok=True)
    for b in beats:
        (directory / f"rank{b['rank']}.json").write_text(json.dumps(b))


def test_the_watch_decides_a_margin_before_the_process_group_timeout():
    assert watch_seconds(300) == 240 and watch_seconds(20) == 15 and watch_seconds(10) == 5
    assert watch_seconds(4) == 2  # never more than the timeout, never zero


def test_a_rank_that_stopped_beating_is_blamed_not_the_peer_waiting_for_it():
    """The frozen rank's last beat may show it in a collective and at the same step as its peer:
    only the age of its beat tells them apart."""
    beats = {0: beat(0, waiting_s=6.0), 1: beat(1, at=-(FROZEN_AFTER_S + 2))}
    assert list(frozen_ranks(beats)) == [1]
    report = diagnose(beats)
    assert list(report) == [1, 0]
    assert report[1].startswith("stopped responding after step 3 (step): no heartbeat for 7 s")
    assert report[0].startswith("waiting for peers after step 3")


def test_a_rank_in_its_own_code_is_blamed_when_none_is_frozen():
    report = diagnose({0: beat(0, waiting_s=6.0), 1: beat(1, frame=OWN_CODE)})
    assert list(report) == [1, 0] and report[1].startswith("stuck after step 3 (step), in /x/model.py")


def test_a_long_wait_in_one_collective_is_a_hang_in_any_phase(tmp_path):
    directory = tmp_path / "heartbeats"
    watch = HangWatch(directory, world_size=2, timeout_s=10)
    write(directory, beat(0, phase="setup:process_group", waiting_s=4.0), beat(1, phase="setup", frame=OWN_CODE))
    assert not watch.stalled()
    write(directory, beat(0, phase="setup:process_group", waiting_s=5.5))
    assert watch.stalled()


def test_a_slow_start_up_without_waiting_is_not_a_hang_but_a_silent_loop_is(tmp_path):
    directory = tmp_path / "heartbeats"
    write(directory, beat(0, phase="setup", frame=OWN_CODE), beat(1, phase="setup", frame=OWN_CODE))
    watch = HangWatch(directory, world_size=2, timeout_s=0.2)
    time.sleep(0.3)
    assert not watch.stalled()  # start-up may take long; waits in it are watched by waiting_s
    write(directory, beat(0, frame=OWN_CODE), beat(1, frame=OWN_CODE))
    assert not watch.stalled()
    time.sleep(0.3)
    assert watch.stalled()  # no rank progressed for the timeout


def test_a_missing_rank_keeps_the_watch_waiting(tmp_path):
    directory = tmp_path / "heartbeats"
    write(directory, beat(0, waiting_s=100.0))
    assert not HangWatch(directory, world_size=2, timeout_s=10).stalled()


def test_waiting_s_counts_one_wait_and_restarts_with_the_next_step(tmp_path):
    heartbeat = Heartbeat(tmp_path, rank=0)
    heartbeat.update(3, "step")
    assert heartbeat._waited([WAITING], now=100.0) == 0.0
    assert heartbeat._waited([WAITING], now=104.0) == 4.0  # the same collective, still waiting
    heartbeat.update(4, "step")
    assert heartbeat._waited([WAITING], now=105.0) == 0.0  # the next step's wait starts anew
    assert heartbeat._waited([OWN_CODE], now=106.0) == 0.0
    assert heartbeat._waited([WAITING], now=107.0) == 0.0


def test_heartbeat_survives_write_errors(tmp_path, capsys):
    """A full disk for a few beats must not end the heartbeat (the launcher would kill the job as hung)."""
    heartbeat = Heartbeat(tmp_path, rank=0).start()
    try:
        beats = tmp_path / "heartbeats"
        beats.rename(tmp_path / "gone")
        beats.write_text("a file where the directory was: every write fails")
        heartbeat.update(5, "step")
        time.sleep(2.5 * INTERVAL_S)
        beats.unlink()
        heartbeat.update(6, "step")
        time.sleep(2.5 * INTERVAL_S)
        assert read_heartbeats(beats)[0]["step"] == 6
    finally:
        heartbeat.stop()
    assert capsys.readouterr().out.count("heartbeat write failed") == 1  # stdout: rank 0's reaches the console


def test_a_metrics_record_is_appended_whole_or_not_at_all(tmp_path):
    """A write cut short by a full disk is truncated away (here the disk is a file-size limit)."""
    probe = f"""
import resource, signal
from pathlib import Path
from launcher.metrics import append_whole
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = Path({str(tmp_path / "metrics.jsonl")!r})
append_whole(path, "a" * 60 + "\\n")
resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
try:
    append_whole(path, "b" * 60 + "\\n")
except OSError as exc:
    print("refused", exc.errno)
print(path.stat().st_size)
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["refused", "27", "61"]  # EFBIG; the first record only
