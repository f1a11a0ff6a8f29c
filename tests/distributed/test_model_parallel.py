"""Pipeline and tensor parallel (and both with data parallel: DDP, FSDP2 ZeRO-2/3, HSDP) against a
1-process run on the same global batch: loss, penalty, gradient norm and eval curves, and the
parameters their DCP checkpoints hold; tp=2 and interleaved pp=2 checkpoints resume in one process,
a ZeRO-3 dp_shard 2 x tp 2 checkpoint at pp 2 x dp_shard 2. Clipping is active in every run
(grad_clip below the gradient norm), so the global norm over mixed DTensor/plain parameters, over
several meshes and over pipeline stages is exercised. Activation checkpointing rides along in two
of these launches (zero 2 at data 2 x tensor 2; the ZeRO-3 tensor-2 leg that resumes without it)."""
from __future__ import annotations

from pathlib import Path

import pytest

from launcher.checkpoint import load_model_weights
from launcher.metrics import read_metrics
from launcher.models import mlp, transformer
from tests.helpers import (
    assert_resumed,
    assert_runs_match,
    final_params,
    launch_ok,
    launch_resumed,
    make_spec,
    max_param_diff,
    train_in_process,
)

pytestmark = pytest.mark.distributed

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "l1": 1.0e-3, "l2": 1.0e-3, "grad_clip": 0.1}
ADAM = {"name": "adam", "lr": 1.0e-3, "l1": 1.0e-4, "l2": 1.0e-3, "grad_clip": 0.5}
TOLERANCE = {"sgd": 1e-5, "adam": 1e-4}

# 4 blocks + head: 4 pipeline stages fit on 2 ranks.
MLP = {"model": {"target": "launcher.models:mlp", "kwargs": {"in_dim": 8, "hidden": 16, "out_dim": 1, "depth": 4}},
       "data": {"kwargs": {"n": 96, "in_dim": 8, "out_dim": 1}, "eval_kwargs": {"n": 20, "seed": 1},
                "micro_batch_size": 8},
       "optimizer": SGD, "training": {"max_steps": 5, "grad_accum_steps": 3, "log_every": 1, "checkpoint_every": 3}}
LM = {"model": {"target": "launcher.models:transformer",
                "kwargs": {"dim": 32, "n_heads": 4, "n_layers": 2, "max_len": 16}},
      "data": {"target": "launcher.data:char_corpus", "kwargs": {"n": 64, "seq_len": 16},
               "eval_kwargs": {"n": 12, "seed": 1}, "micro_batch_size": 4},
      "loss": "token_cross_entropy",
      "training": {"max_steps": 5, "grad_accum_steps": 2, "log_every": 1, "checkpoint_every": 3}}


def local_param_bytes_of_rank_0(run: Path) -> int:
    return read_metrics(run)[-1]["mem_params_bytes"]


def sharded_halves(dim: int, layers: int, attention: bool, feed_forward: bool) -> int:
    """Parameters a tp=2 rank does NOT hold: half of each colwise weight and bias, half of each
    rowwise weight (a rowwise bias is replicated)."""
    per_layer = (3 * (dim * dim + dim) + dim * dim) // 2 if attention else 0
    per_layer += ((4 * dim * dim + 4 * dim) + 4 * dim * dim) // 2 if feed_forward else 0
    return layers * per_layer


@pytest.fixture(scope="module")
def mlp_reference(tmp_path_factory):
    return train_in_process(make_spec(tmp_path_factory.mktemp("mlp"), "reference", **MLP))


def test_interleaved_pipeline_2_ranks_matches_one_process_and_resumes_in_one(tmp_path, mlp_reference):
    """(gpipe and 1f1b at pipeline=2 are in test_real_models.py's parity table.)"""
    spec = make_spec(tmp_path, "pp", **MLP, resources={"procs_per_node": 2},
                     parallel={"pipeline": 2, "schedule": "interleaved_1f1b", "stages_per_rank": 2, "microbatches": 4})
    # Interleaved: 2 stages per rank for steps 1-3, then the checkpoint (each rank wrote its two
    # stages' weights and momentum buffers) resumes in one process for steps 4-5.
    run = launch_ok(spec, "training.stop_at_step=3")
    at_3 = [load_model_weights(mlp(**MLP["model"]["kwargs"]), r / "checkpoints" / "step_00000003").state_dict()
            for r in (mlp_reference, run)]
    assert max_param_diff(*at_3) < TOLERANCE["sgd"]
    before = read_metrics(run)
    train_in_process(spec, "parallel.pipeline=1", "resources.procs_per_node=1")
    assert_resumed(run, before, 3)
    assert_runs_match(mlp_reference, run, TOLERANCE["sgd"])


ZERO3 = {"name": "zero", "stage": 3}
FOUR_RANKS = [  # (row id, strategy, parallel, micro-batch): 4 ranks, the reference's global batch of 24
    ("ddp_data2_pipeline2", {"name": "ddp"}, {"data": 2, "pipeline": 2, "schedule": "1f1b", "microbatches": 2}, 4),
    ("zero3_data2_pipeline2", ZERO3, {"data": 2, "pipeline": 2, "schedule": "1f1b", "microbatches": 2}, 4),
    ("hsdp_replicate2_shard2", ZERO3, {"data_replicate": 2, "data_shard": 2}, 2),
]


@pytest.mark.parametrize("row_id,strategy,parallel,micro", FOUR_RANKS, ids=[r[0] for r in FOUR_RANKS])
def test_data_parallel_on_a_4_rank_mesh_matches_one_process(tmp_path, mlp_reference, row_id, strategy, parallel,
                                                             micro):
    spec = make_spec(tmp_path, row_id, **{**MLP, "data": {**MLP["data"], "micro_batch_size": micro}},
                     strategy=strategy, resources={"procs_per_node": 4}, parallel=parallel)
    run = launch_ok(spec)
    assert_runs_match(mlp_reference, run, TOLERANCE["sgd"])
    if row_id.startswith("zero3"):  # each stage's half of the model, sharded over 2 data-parallel ranks
        assert local_param_bytes_of_rank_0(run) < 0.3 * 4 * sum(t.numel() for t in final_params(run).values())


@pytest.fixture(scope="module")
def lm_reference(tmp_path_factory):
    """optimizer name -> the 1-process transformer run."""
    root = tmp_path_factory.mktemp("lm")
    return {name: train_in_process(make_spec(root, f"reference_{name}", **LM, optimizer=opt))
            for name, opt in (("sgd", SGD), ("adam", ADAM))}


FULL_AC = ("training.activation_checkpointing=full",)


@pytest.mark.parametrize("strategy,overrides", [({"name": "ddp"}, ()), ({"name": "zero", "stage": 2}, FULL_AC)],
                         ids=["ddp", "zero2_activation_checkpointing"])
def test_data_2_x_tensor_2_matches_one_process(tmp_path, lm_reference, strategy, overrides):
    """With a plan from the spec instead of the model's: attention only (fc1/fc2 stay plain). DDP
    replicates; ZeRO-2 also shards every (tensor-parallel or plain) parameter over the 2 data ranks,
    and recomputes every block's activations in backward (dp_shard 2 x tp 2 with activation
    checkpointing; that it recomputes is tests/unit/test_activation_checkpointing.py's)."""
    attention_only = {"blocks.*.attn.[qkv]": "colwise", "blocks.*.attn.o": "rowwise"}
    spec = make_spec(tmp_path, "dp_tp", **{**LM, "data": {**LM["data"], "micro_batch_size": 2}}, optimizer=SGD,
                     strategy=strategy, resources={"procs_per_node": 4},
                     parallel={"data": 2, "tensor": 2, "tp_plan": attention_only})
    run = launch_ok(spec, *overrides)
    assert_runs_match(lm_reference["sgd"], run, TOLERANCE["sgd"])
    whole = sum(t.numel() for t in final_params(run).values())
    per_tp_rank = 4 * (whole - sharded_halves(32, 2, attention=True, feed_forward=False))
    assert local_param_bytes_of_rank_0(run) == per_tp_rank // (2 if strategy["name"] == "zero" else 1)


def tp2_bytes_at_step_3_matching(reference: Path, run: Path) -> int:
    """Asserts the run's step-3 parameters match the 1-process run's; the fp32 bytes one tensor-parallel
    rank of 2 holds (attention and feed-forward halved)."""
    at_3 = [load_model_weights(transformer(**LM["model"]["kwargs"]), r / "checkpoints" / "step_00000003").state_dict()
            for r in (reference, run)]
    assert max_param_diff(*at_3) < TOLERANCE["adam"]
    whole = sum(t.numel() for t in at_3[1].values())
    return 4 * (whole - sharded_halves(32, 2, attention=True, feed_forward=True))


def test_tensor_2_matches_one_process_and_resumes_with_tensor_1(tmp_path, lm_reference):
    """Adam, tp=2 for steps 1-3 (its sharded checkpoint holds DTensor weights and moments; its
    parameters match the 1-process run's step-3 checkpoint), then tp=1 in one process for steps
    4-5: the whole run reads as the uninterrupted 1-process run."""
    spec = make_spec(tmp_path, "tp_resume", **LM, optimizer=ADAM, resources={"procs_per_node": 2},
                     parallel={"tensor": 2})
    run = launch_ok(spec, "training.stop_at_step=3")
    reference = lm_reference["adam"]
    assert local_param_bytes_of_rank_0(run) == tp2_bytes_at_step_3_matching(reference, run)
    before = read_metrics(run)
    train_in_process(spec, "parallel.tensor=1", "resources.procs_per_node=1")
    assert_resumed(run, before, 3)
    assert_runs_match(reference, run, TOLERANCE["adam"])


def test_zero3_tensor_2_resumes_on_another_mesh_as_the_uninterrupted_run(tmp_path, lm_reference):
    """Adam, ZeRO-3 over dp_shard 2 x tp 2 for steps 1-3 (parameters 2-D DTensors: each rank holds a
    quarter of every tensor-parallel weight) with every 2nd block's activations recomputed, then that
    DCP checkpoint resumes at pipeline 2 x dp_shard 2 (1f1b, FSDP2 inside each stage) without
    activation checkpointing for steps 4-5: the whole run reads as the uninterrupted 1-process run,
    and the checkpoint and export hold the plain run's names."""
    spec = make_spec(tmp_path, "zero3_tp", **{**LM, "data": {**LM["data"], "micro_batch_size": 2}}, optimizer=ADAM,
                     strategy=ZERO3, resources={"procs_per_node": 4}, parallel={"tensor": 2})
    run = launch_ok(spec, "training.stop_at_step=3", "training.activation_checkpointing=every_2")
    reference = lm_reference["adam"]
    assert local_param_bytes_of_rank_0(run) == tp2_bytes_at_step_3_matching(reference, run) // 2
    launch_resumed(spec, 3, "parallel.tensor=1", "parallel.pipeline=2")
    assert_runs_match(reference, run, TOLERANCE["adam"])
