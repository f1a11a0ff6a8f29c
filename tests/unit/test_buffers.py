"""The strategies' buffer copies and allocations around collectives (launcher/buffers.py) against hand
counts on a two-layer MLP, and FSDP2's gathered bytes under the bf16 policy. No processes."""
from __future__ import annotations

from launcher.estimate import build_estimate
from launcher.session import prepare
from tests.helpers import make_spec

F32, BF16 = 4, 2


def rank0(tmp_path, *overrides):
    session = prepare(str(make_spec(tmp_path, resources={"procs_per_node": 2})), list(overrides))
    estimate = build_estimate(session.spec, session.plan, session.train_set, trace=False)
    return estimate.total_params, estimate.ranks[0]


def test_ddp_copies_its_buckets_three_times_and_allocates_nothing(tmp_path):
    _, rank = rank0(tmp_path)
    payload = rank.collective_bytes["all_reduce"]
    assert rank.buffer_work.elementwise_bytes == {"fp32/light": 6 * payload}
    assert rank.buffer_work.allocated_bytes == {}


def test_fsdp2_allocates_each_units_gathered_and_reduced_buffers(tmp_path):
    params, zero3 = rank0(tmp_path, "strategy.name=zero", "strategy.stage=3")
    _, zero2 = rank0(tmp_path, "strategy.name=zero", "strategy.stage=2")
    _, bf16 = rank0(tmp_path, "strategy.name=zero", "strategy.stage=3", "training.precision=bf16")
    # ZeRO-3 gathers each layer twice (forward, backward) and the root once: the flat output and each
    # parameter anew; reduce-scatters each unit once: its flat input and the shard (rounded up per unit)
    allocated = sum(zero3.buffer_work.allocated_bytes.values())
    assert allocated - 2 * zero3.collective_bytes["all_gather"] - 1.5 * params * F32 in range(0, 3 * F32)
    assert zero2.collective_bytes["all_gather"] == params * F32  # once per step
    assert sum(zero2.buffer_work.allocated_bytes.values()) - 3.5 * params * F32 in range(0, 3 * F32)
    # copy-in of the shard and copy-out of the whole, read and written, for every gather; the same for gradients
    assert zero2.buffer_work.elementwise_bytes == {"fp32/light": 2 * 2 * (params + params / 2) * F32}
    # bf16 policy: parameters gathered in bf16 (2 bytes), gradients reduced in fp32
    assert bf16.collective_bytes["all_gather"] * 2 == zero3.collective_bytes["all_gather"]
    assert bf16.collective_bytes["reduce_scatter"] == zero3.collective_bytes["reduce_scatter"] == params * F32
    assert bf16.buffer_bytes < zero3.buffer_bytes
    assert set(bf16.buffer_work.elementwise_bytes) == {"bf16/light", "fp32/light"}
