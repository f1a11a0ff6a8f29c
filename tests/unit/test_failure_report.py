"""The failure report, from what ranks leave in torch elastic's log directory: error files written by
torch's own ErrorHandler (what @record does in a rank), a real process killed by SIGSEGV, and the
agent's note for it (launcher/executors/agent.py). Also the launcher's start time (time to first step)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, ProcessFailure

from launcher.errors import LaunchError
from launcher.executors.agent import note_deaths
from launcher.executors.failures import read_failures, where_logs_are
from tests.helpers import REPO

CRASH = """
import ctypes, faulthandler
faulthandler.enable(all_threads=True)  # as torch's @record does in every rank
def crash():
    ctypes.string_at(0)
crash()
"""


def test_a_rank_killed_by_a_signal_is_named_first_with_where_it_crashed(tmp_path, monkeypatch):
    attempt = tmp_path / "job_abc" / "attempt_0"
    error_files = {rank: attempt / str(rank) / "error.json" for rank in (0, 1)}
    for error_file in error_files.values():
        error_file.parent.mkdir(parents=True)
    # rank 0 raises first (in time): its peer is gone
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_files[0]))
    try:
        raise RuntimeError("Connection closed by peer")
    except RuntimeError as exc:
        ErrorHandler().record_exception(exc)
    # rank 1 segfaulted; its stderr is its log file (--redirects), where faulthandler dumps its stack
    with (attempt / "1" / "stderr.log").open("w") as log:
        crashed = subprocess.Popen([sys.executable, "-c", CRASH], stderr=log)
        assert crashed.wait(timeout=60) == -signal.SIGSEGV
    time.sleep(0.01)  # the agent notices later than the peer raised, by one monitor interval
    failures = {0: ProcessFailure(0, pid=1, exitcode=1, error_file=str(error_files[0])),
                1: ProcessFailure(1, pid=crashed.pid, exitcode=-signal.SIGSEGV, error_file=str(error_files[1]))}
    note_deaths(failures, {rank: str(path) for rank, path in error_files.items()})

    report = read_failures(attempt)
    assert [failure.rank for failure in report] == [1, 0]  # the root cause, although noted last
    lines = report[0].text.splitlines()
    assert lines[0] == f"killed by signal SIGSEGV (PID {crashed.pid})"
    assert lines[-2].endswith("in crash") and lines[-1].endswith("in string_at"), lines  # innermost last
    assert report[1].text.splitlines()[0] == "RuntimeError: Connection closed by peer"
    assert where_logs_are(attempt, report) == (
        f"rank 1's full output: {attempt}/1/stderr.log; every rank's: {attempt}/<local rank>/stderr.log, stdout.log")


def test_the_console_report_stays_short_whatever_the_world_size():
    first = "ValueError: bad shape\n  File \"model.py\", line 3, in forward\n    return x @ w"
    later = {rank: f"RuntimeError: Connection closed by peer ({rank})" for rank in range(8) if rank != 5}
    failures = {5: first, **later}
    report = LaunchError("the job failed (local exit code 1)", failures, "rank 5's full output: LOG").report()
    assert report == [
        "  rank 5 (first to fail): ValueError: bad shape",
        "      File \"model.py\", line 3, in forward",
        "        return x @ w",
        "  rank 0 (failed after it): RuntimeError: Connection closed by peer (0)",
        "  rank 1 (failed after it): RuntimeError: Connection closed by peer (1)",
        "  rank 2 (failed after it): RuntimeError: Connection closed by peer (2)",
        "  and 4 more rank(s) after it: 3, 4, 6, 7",
        "  rank 5's full output: LOG",
    ]


def test_a_rank_that_only_lost_its_peer_is_never_called_the_first_to_fail(tmp_path, monkeypatch):
    """On a two-node job the node without the failing rank sees only its ranks losing their peer;
    with the failing rank's error present, that error leads although it was filed later."""
    attempt = tmp_path / "job_abc" / "attempt_0"
    for rank, error in ((0, RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1")),
                        (1, ValueError("bad shape"))):
        error_file = attempt / str(rank) / "error.json"
        error_file.parent.mkdir(parents=True)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        try:
            raise error
        except Exception as exc:
            ErrorHandler().record_exception(exc)
        time.sleep(0.01)
    report = read_failures(attempt)
    assert [failure.rank for failure in report] == [1, 0]
    alone = LaunchError("the job failed", {0: report[1].text}).report()
    assert alone[0].startswith("  rank 0 (lost its peer; the rank that failed first is not among these): "), alone


def test_the_launchers_start_is_its_process_start():
    """What the time to first step counts from: no later than the process started (the test's clock
    before starting it) and no earlier than that (the process's own first line reads the clock)."""
    probe = ("import time; now = time.time()\n"
             "from launcher.startup import process_started_at; print(process_started_at(), now)")
    before = time.time()
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    started, first_line = map(float, result.stdout.split())
    assert before - 0.02 <= started <= first_line  # 0.02: the kernel counts in 10 ms ticks
