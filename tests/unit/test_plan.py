"""Plan: world size, mesh degrees, strategy, device and the batch identity, as a table."""
from __future__ import annotations

import pytest

from launcher.errors import PlanError
from launcher.plan import make_plan, plan_from_json, plan_to_json
from launcher.spec import validate_spec
from tests.helpers import BASE_SPEC


def spec_with(**sections):
    raw = {**BASE_SPEC, **{k: {**BASE_SPEC.get(k, {}), **v} for k, v in sections.items()}}
    return validate_spec(raw)


@pytest.mark.parametrize(
    "nodes,procs,data,micro,accum,strategy,expect_dp,expect_strategy",
    [
        (1, 1, -1, 24, 1, "auto", 1, "single"),
        (1, 2, -1, 4, 3, "auto", 2, "ddp"),
        (2, 2, -1, 4, 3, "ddp", 4, "ddp"),
        (1, 4, 4, 2, 2, "ddp", 4, "ddp"),
        (1, 1, 1, 8, 3, "ddp", 1, "ddp"),
    ],
)
def test_degrees_and_batch_identity(nodes, procs, data, micro, accum, strategy, expect_dp, expect_strategy):
    plan = make_plan(spec_with(resources={"nodes": nodes, "procs_per_node": procs}, parallel={"data": data},
                               data={"micro_batch_size": micro}, training={"grad_accum_steps": accum},
                               strategy={"name": strategy}))
    assert plan.world_size == nodes * procs
    assert (plan.dp_degree, plan.strategy) == (expect_dp, expect_strategy)
    assert plan.global_batch_size == micro * accum * expect_dp
    assert f"global batch     {plan.global_batch_size} = micro-batch {micro}" in plan.describe()


def test_inferred_values_are_reported():
    plan = make_plan(spec_with(resources={"procs_per_node": 2}))
    text = plan.describe()
    assert "inferred         parallel.data = 2" in text
    assert "inferred         strategy.name = ddp (auto, world size 2)" in text
    assert "inferred         resources.device = cpu (auto: CUDA not found)" in text
    assert (plan.device, plan.backend) == ("cpu", "gloo")


def test_cuda_when_present_uses_nccl():
    plan = make_plan(spec_with(resources={"procs_per_node": 2}), cuda_available=True)
    assert (plan.device, plan.backend) == ("cuda", "nccl")


def test_cuda_requested_without_cuda_is_a_plan_error():
    with pytest.raises(PlanError, match="resources.device=cuda but no CUDA device is visible"):
        make_plan(spec_with(resources={"device": "cuda"}))


@pytest.mark.parametrize("sections", [
    {},
    {"resources": {"procs_per_node": 4}, "parallel": {"pipeline": 2, "tensor": 2, "microbatches": 4},
     "model": {"target": "launcher.models:transformer"}},
    {"resources": {"procs_per_node": 2}, "strategy": {"name": "deepspeed", "stage": 2}},
], ids=["single", "mesh", "deepspeed"])
def test_the_plan_ranks_read_is_the_plan_the_launcher_made(sections):
    """Ranks run plan.json (launcher/rank.py), not a plan of their own: it must round-trip whole."""
    plan = make_plan(spec_with(**sections))
    assert plan_from_json(plan_to_json(plan)) == plan


ZERO3 = {"strategy": {"name": "zero", "stage": 3}, "resources": {"procs_per_node": 2}}


def test_offload_is_fsdp2_cpu_offload_on_cuda_and_a_said_no_op_on_cpu():
    offload = {**ZERO3, "strategy": {**ZERO3["strategy"], "offload": "cpu"}}
    on_gpu = make_plan(spec_with(**offload), cuda_available=True)
    assert on_gpu.layout is not None and on_gpu.layout.offload
    assert plan_from_json(plan_to_json(on_gpu)) == on_gpu  # the ranks' copy (plan.json) carries it
    assert "FSDP2 fully_shard (ZeRO-3, CPU offload of parameters, gradients and optimizer state)" in on_gpu.describe()
    on_cpu = make_plan(spec_with(**offload))
    assert on_cpu.layout is None and "CPU offload" not in on_cpu.describe()
    assert ("strategy.offload = cpu is a no-op on device cpu: parameters, gradients and optimizer state live in host"
            " memory already") in on_cpu.inferred
    assert not make_plan(spec_with(**ZERO3), cuda_available=True).layout  # off unless asked
    with pytest.raises(PlanError, match="strategy.offload=cpu with one data-parallel rank: ZeRO-3 shards nothing"):
        make_plan(spec_with(**{**offload, "resources": {"procs_per_node": 1}}), cuda_available=True)


TENSOR2 = {"parallel": {"tensor": 2}, "model": {"target": "launcher.models:transformer"}}


@pytest.mark.parametrize("sections,policy", [
    (ZERO3, True),
    ({**TENSOR2, "resources": {"procs_per_node": 4}}, True),  # data parallel on a tensor-parallel mesh is FSDP2 too
    ({"resources": {"procs_per_node": 2}}, False),  # ddp: autocast
    ({**TENSOR2, "resources": {"procs_per_node": 2}}, False),  # one data-parallel rank: nothing wraps the model
], ids=["zero3", "dp2_tp2", "ddp", "tp2"])
def test_bf16_under_fsdp2_is_its_mixed_precision_policy(sections, policy):
    plan = make_plan(spec_with(**sections, training={"precision": "bf16"}))
    assert any(note.startswith("training.precision = bf16 under FSDP2: MixedPrecisionPolicy") for note in
               plan.inferred) == policy
