"""The paced preemption vote: two real gloo ranks stepping at different speeds vote at the same
steps, see a request made on one rank at the same step, and vote far less often than every step."""
from __future__ import annotations

import multiprocessing
import socket
import time

import torch
import torch.distributed as dist

from launcher.guards import StepAgreement
from launcher.interrupts import PreemptionFlag

STEPS, REQUEST_AT, PERIOD_S = 60, 25, 0.05
STEP_S = (0.002, 0.006)  # rank 1 is the slow one: its step time sets the pace


def _rank(rank: int, port: int, results: multiprocessing.Queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    votes: list[int] = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        votes.append(step)
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    flag = PreemptionFlag()
    agreement = StepAgreement(flag, period_s=PERIOD_S)
    preempted_at = None
    for step in range(1, STEPS + 1):
        time.sleep(STEP_S[rank])
        flag.requested = rank == 1 and step >= REQUEST_AT
        if agreement.verdict(step, torch.tensor(1.0), torch.tensor(1.0)).preempt:
            preempted_at = step
            break
    agreement.finish()
    dist.destroy_process_group()
    results.put((rank, votes, preempted_at))


def test_ranks_vote_at_the_same_paced_steps_and_agree_on_preemption():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [context.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for process in ranks:
        process.start()
    outcome = dict((rank, (votes, stopped)) for rank, votes, stopped in (results.get(timeout=60) for _ in ranks))
    for process in ranks:
        process.join(timeout=10)
        assert process.exitcode == 0

    (votes_0, stopped_0), (votes_1, stopped_1) = outcome[0], outcome[1]
    assert votes_0 == votes_1  # the same steps on both ranks, or the collectives would pair wrongly
    assert stopped_0 == stopped_1 is not None
    # Rank 1 steps in >= 6 ms, so votes are >= ~8 steps apart once paced; the first two come at once.
    assert votes_0[:2] == [1, 2] and len(votes_0) < 12
    # Seen within one period (in slow-rank steps) plus two steps of the request.
    assert REQUEST_AT < stopped_0 <= REQUEST_AT + PERIOD_S / STEP_S[1] + 2
