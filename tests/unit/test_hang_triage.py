"""Hang triage: torch's Flight Recorder counts say which ranks had not entered the collective the
others are in; without them the stacks decide. The recorder itself is torch's, read for real."""
from __future__ import annotations

import json
import threading
import time

import torch
import torch.distributed as dist

from launcher.flight_recorder import DUMP_DIR, REQUEST, DumpOnRequest, entered, not_entered, request_dumps
from launcher.heartbeat import FROZEN_AFTER_S, Heartbeat, diagnose
from tests.unit.test_heartbeat import OWN_CODE, beat

ALL_REDUCE = {"process_group": ["0", "default_pg"], "collective_seq_id": 57, "is_p2p": False,
              "profiling_name": "gloo:all_reduce", "input_sizes": [[33]]}


def counted(rank: int, entered_by_group: dict[str, int], **kwargs) -> dict:
    return {**beat(rank, **kwargs), "collectives": entered_by_group}


def test_the_first_collective_not_every_member_entered_is_named_per_group():
    counts = {0: {"0": 57, "1": 9}, 1: {"0": 56, "1": 9}, 2: {"0": 56}, 3: {"0": 58, "2": 4}}
    (default,) = not_entered(counts, dumps={})
    assert (default.group, default.seq, default.inside, default.missing) == ("0", 57, (0, 3), (1, 2))
    assert default.describe() == "collective #57 of group 0"
    assert not_entered({0: {"0": 5}, 1: {"0": 5}}, {}) == []  # every rank entered it: no one to blame
    assert not_entered({0: {}, 1: {}}, {}) == []  # no recorder


def test_a_dump_names_the_operation_and_its_status_is_fresher_than_the_beat():
    dump = {"pg_status": {"0": {"last_enqueued_collective": "57"}}, "entries": [ALL_REDUCE]}
    (found,) = not_entered({0: {"0": 56}, 1: {"0": 56}}, dumps={0: dump})
    assert found.inside == (0,) and found.missing == (1,)
    assert found.describe() == "collective #57 of group 0 (gloo:all_reduce [[33]])"


def test_the_rank_that_had_not_entered_is_blamed_even_when_its_stack_is_in_communication():
    """Rank 1 waits in another group's collective: the stacks alone would blame both (same step)."""
    report = diagnose({0: counted(0, {"0": 57}, waiting_s=6.0), 1: counted(1, {"0": 56}, waiting_s=6.0)})
    assert list(report) == [1, 0]
    assert report[1].startswith("stuck after step 3 (step), in /x/torch/distributed")
    assert "  had not entered collective #57 of group 0, which rank(s) 0 entered" in report[1].splitlines()
    assert report[0].startswith("waiting for peers after step 3 (step), in collective #57 of group 0,"
                                " which rank(s) 1 had not entered, in ")


def test_a_frozen_rank_is_not_said_to_have_missed_a_collective_by_its_stale_last_beat():
    """SIGSTOP at step 5: its last beat (up to a second earlier) counted fewer collectives than it entered."""
    beats = {0: counted(0, {"0": 35}, waiting_s=6.0),
             1: counted(1, {"0": 30}, at=-(FROZEN_AFTER_S + 2), frame=OWN_CODE)}
    report = diagnose(beats)
    assert report[1].startswith("stopped responding after step 3") and "had not entered" not in report[1]
    assert "had not entered" not in report[0]


def test_without_recorder_counts_the_stacks_say_who_had_not_entered():
    report = diagnose({0: beat(0, waiting_s=6.0), 1: beat(1, frame=OWN_CODE)})
    assert report[1].splitlines()[-1] == ("  had not entered the collective rank(s) 0 wait in"
                                          " (judged from the stacks: no Flight Recorder counts)")
    assert "had not entered" not in report[0]


def test_the_recorder_of_a_real_gloo_group_is_counted_in_beats_and_dumped_on_request(tmp_path):
    heartbeats = tmp_path / "heartbeats"
    (heartbeats / DUMP_DIR).mkdir(parents=True)
    (heartbeats / DUMP_DIR / REQUEST).write_text("an earlier launch's")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for _ in range(3):
            dist.all_reduce(torch.ones(4))
        assert entered() == {"0": 3}
        answering = DumpOnRequest(heartbeats, rank=0)
        answering.poll()
        assert not (heartbeats / DUMP_DIR / "rank0.json").exists()  # the stale request is not answered
        heartbeat = Heartbeat(tmp_path, rank=0).start()
        heartbeat.stop()
        assert json.loads((heartbeats / "rank0.json").read_text())["collectives"] == {"0": 3}

        stop = threading.Event()

        def heartbeat_thread() -> None:  # as the rank's heartbeat polls, more often
            while not stop.wait(0.05):
                answering.poll()

        poller = threading.Thread(target=heartbeat_thread)
        poller.start()
        started = time.monotonic()
        dumps = request_dumps(heartbeats, [0], wait_s=10)
        stop.set()
        poller.join()
    finally:
        dist.destroy_process_group()
    assert time.monotonic() - started < 5 and list(dumps) == [0]
    assert [(e["collective_seq_id"], e["profiling_name"]) for e in dumps[0]["entries"]] == [
        (1, "gloo:all_reduce"), (2, "gloo:all_reduce"), (3, "gloo:all_reduce")]
    assert not (heartbeats / DUMP_DIR / REQUEST).exists()


def test_a_status_in_an_unknown_format_counts_nothing_instead_of_ending_the_heartbeat_thread():
    assert entered({"pg_status": {"0": {"renamed": "5"}}}) == {}
    assert entered({"version": "9"}) == {} and entered({}) == {}
