"""Mesh planning (dp x tp x pp), stage boundaries and the pipeline split, without processes."""
from __future__ import annotations

import pytest
import torch

from launcher.models import mlp, transformer
from launcher.plan import make_plan
from strategies.layout import MeshLayout, stage_block_ranges
from strategies.pipeline import pipeline_split
from strategies.tensor_parallel import resolve_tp_plan, tp_targets
from tests.unit.test_plan import spec_with

ZERO3 = {"name": "zero", "stage": 3}


@pytest.mark.parametrize(
    "procs,parallel,strategy,expect,data_parallel",
    [
        (4, {"tensor": 2}, {}, (2, 1, 2, 1, 1), "FSDP2 replicating over 2 ranks (dp_shard 1"),
        (4, {"pipeline": 2, "microbatches": 4}, {}, (2, 1, 1, 2, 4), "FSDP2 replicating over 2 ranks"),
        (8, {"tensor": 2, "pipeline": 2}, {}, (2, 1, 2, 2, 2), "FSDP2 replicating"),  # microbatches: the pp degree
        (4, {"data": 1, "tensor": 2, "pipeline": 2, "schedule": "interleaved_1f1b", "stages_per_rank": 2}, {},
         (1, 1, 2, 2, 2), "none (one data-parallel rank)"),
        (4, {"tensor": 2}, ZERO3, (2, 2, 2, 1, 1), "FSDP2 fully_shard (ZeRO-3)"),
        (4, {"pipeline": 2}, ZERO3, (2, 2, 1, 2, 2), "FSDP2 fully_shard (ZeRO-3)"),
        (4, {"data_replicate": 2}, ZERO3, (4, 2, 1, 1, 1), "FSDP2 fully_shard (ZeRO-3, HSDP: replicate 2 x shard 2)"),
        (8, {"data_shard": 2, "tensor": 2}, {"name": "zero", "stage": 2}, (4, 2, 2, 1, 1),
         "FSDP2 fully_shard (ZeRO-2, HSDP: replicate 2 x shard 2)"),
    ],
)
def test_mesh_degrees_and_batch_identity(procs, parallel, strategy, expect, data_parallel):
    plan = make_plan(spec_with(resources={"procs_per_node": procs}, parallel=parallel,
                               strategy=strategy or {"name": "auto"}))
    dp, shard, tp, pp, microbatches = expect
    assert (plan.strategy, plan.dp_degree, plan.tp_degree, plan.pp_degree) == (strategy.get("name", "ddp"), dp, tp, pp)
    assert plan.layout.microbatches == microbatches and plan.layout.dp_degree == dp
    assert plan.layout.dp_shard_degree == plan.dp_shard_degree == shard
    assert plan.global_batch_size == 24 * 1 * dp  # the data is sharded over dp only
    assert f"mesh             data {dp} x tensor {tp} x pipeline {pp}" in plan.describe()
    assert f"data parallel    {data_parallel}" in plan.describe()


def test_one_data_axis_needs_no_layout():
    plan = make_plan(spec_with(resources={"procs_per_node": 2}))
    assert plan.strategy == "ddp" and plan.layout is None and plan.dp_shard_degree == 1
    plan = make_plan(spec_with(resources={"procs_per_node": 2}, strategy=ZERO3))
    assert plan.layout is None and plan.dp_shard_degree == 2
    assert "inferred         parallel.data_shard = 2 (zero stage 3" in plan.describe()


@pytest.mark.parametrize(
    "blocks,stages,splits,expect",
    [
        (4, 2, (), [range(0, 2), range(2, 4)]),
        (5, 2, (), [range(0, 3), range(3, 5)]),
        (4, 4, (), [range(i, i + 1) for i in range(4)]),
        (6, 2, ("blocks.1",), [range(0, 1), range(1, 6)]),
        (6, 3, ("blocks.2", "blocks.5"), [range(0, 2), range(2, 5), range(5, 6)]),
    ],
)
def test_stage_block_ranges(blocks, stages, splits, expect):
    assert stage_block_ranges(blocks, stages, splits) == expect


@pytest.mark.parametrize("splits", [("blocks.0",), ("blocks.4",), ("head",), ("blocks.3", "blocks.2", "blocks.1")])
def test_bad_split_points(splits):
    with pytest.raises(ValueError, match="parallel.split_points"):
        stage_block_ranges(4, len(splits) + 1, splits)


def test_pipeline_split_keeps_whole_model_names_and_shares_parameters():
    torch.manual_seed(0)
    model = mlp(in_dim=4, hidden=8, out_dim=1, depth=4)
    whole = {name: p.detach().clone() for name, p in model.named_parameters()}
    layout = MeshLayout(dp_degree=1, pp_degree=2, schedule="interleaved_1f1b", microbatches=2, stages_per_rank=2)
    owner, stages = pipeline_split(model, layout, pp_rank=1)  # stages 1 and 3 of 4: blocks 1 and 3 + head
    assert sorted({n.split(".")[1] for n in dict(owner.named_parameters()) if n.startswith("blocks")}) == ["1", "3"]
    assert "head.weight" in dict(owner.named_parameters())
    for name, p in owner.named_parameters():
        assert torch.equal(p, whole[name])
    assert [len(s.blocks) for s in stages] == [1, 1] and stages[0].head is None and stages[1].head is not None
    owned = {id(p) for p in owner.parameters()}
    assert all(id(p) in owned for s in stages for p in s.parameters())
    x = torch.randn(3, 8)
    assert torch.allclose(stages[1](x), model.head(model.blocks[3](x)))


def test_transformer_first_and_last_stage_ends():
    model = transformer(dim=16, n_heads=2, n_layers=2, max_len=8)
    first, last = (pipeline_split(model, MeshLayout(dp_degree=1, pp_degree=2), r)[0] for r in (0, 1))
    assert first.tok_emb is not None and first.head is None and first.ln_f is None
    assert last.tok_emb is None and last.pos_emb is None and last.head is not None
    ids = torch.randint(0, 32, (2, 8))
    assert torch.allclose(last(first(ids)), model(ids))


def test_tensor_parallel_plan_from_the_spec_wins_over_the_models():
    model = transformer(dim=16, n_heads=2, n_layers=2, max_len=8)
    own = tp_targets(model, resolve_tp_plan(model, None))
    assert own["blocks.1.attn.q"] == "colwise" and own["blocks.0.fc2"] == "rowwise" and len(own) == 12
    user = tp_targets(mlp(depth=2), resolve_tp_plan(mlp(), {"blocks.0.0": "colwise", "blocks.1.0": "rowwise"}))
    assert user == {"blocks.0.0": "colwise", "blocks.1.0": "rowwise"}
    with pytest.raises(ValueError, match="declares no tp_plan"):
        resolve_tp_plan(mlp(), None)
