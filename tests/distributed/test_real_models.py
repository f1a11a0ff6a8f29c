"""Models that set their own weights, layers without reset_parameters() and dict batches: every
strategy starts from the constructor's weights and matches one process on the same global batch.

The models are in tests/fixtures/real_models.py. Each row trains 2 (or 4) ranks and compares the
loss, penalty and gradient-norm curves and the consolidated final weights with the 1-process run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from launcher.metrics import read_metrics
from tests.helpers import assert_runs_match, launch_ok, make_spec, meshyard, train_in_process

pytestmark = pytest.mark.distributed

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "l1": 1.0e-4, "l2": 1.0e-3, "grad_clip": 1.0}
ADAM = {"name": "adam", "lr": 3.0e-3, "l2": 1.0e-4, "grad_clip": 1.0}

SELF_INIT: dict[str, Any] = {
    "model": {"target": "tests.fixtures.real_models:self_init_mlp", "kwargs": {"in_dim": 8, "hidden": 16, "depth": 4}},
    "data": {"kwargs": {"n": 96, "in_dim": 8, "out_dim": 1}, "micro_batch_size": 8},
    "optimizer": SGD, "training": {"max_steps": 6, "grad_accum_steps": 3, "log_every": 1},
}
ODD_LAYERS: dict[str, Any] = {
    "model": {"target": "tests.fixtures.real_models:odd_layers_lm", "kwargs": {"dim": 16, "n_layers": 4}},
    "data": {"target": "launcher.data:char_corpus", "kwargs": {"n": 96, "seq_len": 16}, "micro_batch_size": 8},
    "loss": "token_cross_entropy",
    "optimizer": ADAM, "training": {"max_steps": 6, "grad_accum_steps": 3, "log_every": 1},
}
MODELS = {"self_init_mlp": (SELF_INIT, 1e-5), "odd_layers_lm": (ODD_LAYERS, 1e-4)}
SELF_INIT_TP = {"layers.0.0": "colwise", "layers.1.0": "rowwise", "layers.2.0": "colwise", "layers.3.0": "rowwise"}

# (row id, sections merged over the model's, processes, data-parallel degree): micro-batch 8 / dp x
# accumulation 3 x dp = the reference's global batch of 24 in every row.
ROWS = [
    ("ddp", {"strategy": {"name": "ddp"}}, 2, 2),
    ("zero1", {"strategy": {"name": "zero", "stage": 1}}, 2, 2),
    ("zero2", {"strategy": {"name": "zero", "stage": 2}}, 2, 2),
    ("zero3", {"strategy": {"name": "zero", "stage": 3}}, 2, 2),
    ("deepspeed0", {"strategy": {"name": "deepspeed", "stage": 0}}, 2, 2),
    ("deepspeed1", {"strategy": {"name": "deepspeed", "stage": 1}}, 2, 2),
    ("deepspeed2", {"strategy": {"name": "deepspeed", "stage": 2}}, 2, 2),
    ("deepspeed3", {"strategy": {"name": "deepspeed", "stage": 3}}, 2, 2),
    ("tensor2", {"parallel": {"tensor": 2}}, 2, 1),
    ("pipeline2_gpipe", {"parallel": {"pipeline": 2, "schedule": "gpipe", "microbatches": 4}}, 2, 1),
    ("pipeline2_1f1b", {"parallel": {"pipeline": 2, "schedule": "1f1b", "microbatches": 4}}, 2, 1),
    ("data2_tensor2", {"parallel": {"data": 2, "tensor": 2}}, 4, 2),
]


def _spec(tmp: Path, name: str, model: str, row: dict[str, Any], procs: int, dp: int) -> Path:
    base, _ = MODELS[model]
    sections = {**base, "data": {**base["data"], "micro_batch_size": 8 // dp}, **row}
    if "tensor" in row.get("parallel", {}) and model == "self_init_mlp":
        sections["parallel"] = {**row["parallel"], "tp_plan": SELF_INIT_TP}
    return make_spec(tmp, name, **sections, resources={"procs_per_node": procs})


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """model -> the 1-process run (micro-batch 8 x accumulation 3 = 24)."""
    return {model: train_in_process(_spec(tmp_path_factory.mktemp(model), "reference", model, {}, 1, 1))
            for model in MODELS}


@pytest.mark.parametrize("row_id,row,procs,dp", ROWS, ids=[r[0] for r in ROWS])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_strategy_starts_from_the_constructor_and_matches_one_process(tmp_path, references, model, row_id, row, procs,
                                                                     dp):
    run = launch_ok(_spec(tmp_path, row_id, model, row, procs, dp))
    assert_runs_match(references[model], run, MODELS[model][1])


def test_zero1_with_adamw_matches_one_process(tmp_path):
    """ZeroRedundancyOptimizer rebuilds the optimizer from its defaults, and torch 2.13's AdamW
    records one (decoupled_weight_decay) its constructor refuses: decoupled weight decay included."""
    sections = {**ODD_LAYERS, "optimizer": {**ADAM, "name": "adamw", "weight_decay": 0.1}}
    reference = train_in_process(make_spec(tmp_path, "reference", **sections))
    run = launch_ok(make_spec(tmp_path, "zero1", **{**sections, "data": {**ODD_LAYERS["data"], "micro_batch_size": 4}},
                              strategy={"name": "zero", "stage": 1}, resources={"procs_per_node": 2}))
    assert_runs_match(reference, run, 1e-4)


META = {"model": {**ODD_LAYERS["model"], "init": "meta"}}


@pytest.fixture(scope="module")
def meta_reference(tmp_path_factory):
    spec = make_spec(tmp_path_factory.mktemp("meta"), "reference", **{**ODD_LAYERS, **META})
    return train_in_process(spec)


@pytest.mark.parametrize("row_id,row,procs", [
    ("zero3", {"strategy": {"name": "zero", "stage": 3}, "data": {**ODD_LAYERS["data"], "micro_batch_size": 4}}, 2),
    ("pipeline2", {"parallel": {"pipeline": 2, "schedule": "gpipe", "microbatches": 4}}, 2),
], ids=["zero3", "pipeline2"])
def test_meta_init_with_the_models_hook_matches_one_process(tmp_path, meta_reference, row_id, row, procs):
    spec = make_spec(tmp_path, row_id, **{**ODD_LAYERS, **META, **row}, resources={"procs_per_node": procs})
    assert_runs_match(meta_reference, launch_ok(spec), 1e-4)


DICT_BATCHES: dict[str, Any] = {
    "model": {"target": "tests.fixtures.real_models:masked_pool_classifier", "kwargs": {"dim": 16}},
    "data": {"target": "tests.fixtures.real_models:masked_tokens", "kwargs": {"n": 96}, "micro_batch_size": 24,
             "feed": "kwargs", "target_key": "labels", "eval_kwargs": {"n": 40, "seed": 1}},
    "loss": "cross_entropy", "optimizer": SGD, "training": {"max_steps": 6, "log_every": 1},
}


def test_dict_batches_with_masks_split_into_pipeline_micro_batches(tmp_path):
    """Every tensor leaf (ids, mask) is split along dim 0 into the same pipeline micro-batches: a
    mask that were split differently from its ids would pool the wrong tokens and change the loss."""
    reference = train_in_process(make_spec(tmp_path, "reference", **DICT_BATCHES))
    spec = make_spec(tmp_path, "pp", **DICT_BATCHES, resources={"procs_per_node": 2},
                     parallel={"pipeline": 2, "schedule": "gpipe", "microbatches": 4})
    run = launch_ok(spec)
    assert_runs_match(reference, run, 1e-5)
    ref_eval, run_eval = read_metrics(reference)[-1], read_metrics(run)[-1]
    assert abs(ref_eval["eval_accuracy"] - run_eval["eval_accuracy"]) < 1e-9


def test_ddp_with_an_unused_layer_needs_and_takes_find_unused_parameters(tmp_path):
    """A layer that forward never calls: DDP fails at step 2 unless told; told, it matches one process."""
    model = {**SELF_INIT["model"], "kwargs": {**SELF_INIT["model"]["kwargs"], "unused_layer": True}}
    sections = {**SELF_INIT, "model": model}
    reference = train_in_process(make_spec(tmp_path, "reference", **sections))
    ddp = make_spec(tmp_path, "ddp", **{**sections, "data": {**SELF_INIT["data"], "micro_batch_size": 4}},
                    strategy={"name": "ddp"}, resources={"procs_per_node": 2})
    refused = meshyard("launch", str(ddp))
    assert refused.returncode == 1 and "find_unused_parameters" in refused.stdout + refused.stderr
    run = launch_ok(ddp, "strategy.find_unused_parameters=true", "checkpoint.resume=auto")
    assert_runs_match(reference, run, 1e-5)
