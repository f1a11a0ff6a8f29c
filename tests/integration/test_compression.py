"""Compression in the job spec: pruning under DDP, distillation, post-training int8 quantization."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launcher.cli import main
from tests.helpers import REPO, assert_runs_match, final_params, launch_ok, make_spec, train_in_process

LINEAR_HEAVY = {"target": "launcher.models:classifier",
                "kwargs": {"in_dim": 16, "hidden": 256, "num_classes": 4, "depth": 3}}
CLASSIFIER = {
    "model": {"target": "launcher.models:classifier", "kwargs": {"in_dim": 16, "hidden": 64, "num_classes": 4}},
    "data": {"target": "launcher.data:synthetic_classification", "micro_batch_size": 32,
             "kwargs": {"n": 2048, "in_dim": 16, "num_classes": 4}, "eval_kwargs": {"n": 512, "seed": 1}},
    "loss": "cross_entropy",
    # explicit zeros: make_spec merges into BASE_SPEC's SGD section, whose L1/L2 kept this model at chance
    "optimizer": {"name": "adam", "lr": 3.0e-3, "momentum": 0.0, "l1": 0.0, "l2": 0.0},
    "schedule": {"warmup_steps": 0, "decay": "constant"},
}


@pytest.mark.distributed
def test_pruning_to_half_under_ddp_hits_the_target_with_identical_masks(tmp_path):
    prune = {"method": "magnitude", "scope": "global", "amount": 0.5,
             "schedule": {"start_step": 20, "end_step": 80, "every": 10}}
    spec = make_spec(tmp_path, "pruned", **CLASSIFIER, training={"max_steps": 120, "log_every": 20, "eval_every": 60},
                     strategy={"name": "ddp"}, resources={"procs_per_node": 2}, compression={"prune": prune})
    run = launch_ok(spec)
    ranks = [json.loads((run / f"prune_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["mask_digest"] == ranks[1]["mask_digest"]  # every rank holds the same masks
    assert abs(ranks[0]["sparsity"]["overall"] - 0.5) <= 0.01
    summary = json.loads((run / "summary.json").read_text())
    dense, final = summary["pruning"]["dense_eval"]["eval_accuracy"], summary["eval_accuracy"]
    assert dense > 0.5 and final > 0.5  # the accuracy drop is reported, and pruning did not wreck the model
    # counted independently, in the weights the final checkpoint holds (what export hands users)
    weights = [t for name, t in final_params(run).items() if name.endswith("weight")]
    zeros = sum(int((t == 0).sum()) for t in weights) / sum(t.numel() for t in weights)
    assert zeros == pytest.approx(summary["pruning"]["sparsity"]["overall"], abs=1e-6)


def test_distillation_beats_the_same_student_without_a_teacher(tmp_path):
    teacher = train_in_process(make_spec(tmp_path, "teacher", **{
        **CLASSIFIER, "data": {**CLASSIFIER["data"], "kwargs": {"n": 8192, "in_dim": 16, "num_classes": 4}},
        "model": {"target": "launcher.models:classifier", "kwargs": {"in_dim": 16, "hidden": 128, "num_classes": 4}},
        "training": {"max_steps": 300, "log_every": 100}}))
    # The student sees only 256 examples: the teacher's soft labels carry what the data lacks.
    student = {**CLASSIFIER, "data": {**CLASSIFIER["data"], "kwargs": {"n": 256, "in_dim": 16, "num_classes": 4}},
               "model": {"target": "launcher.models:classifier",
                         "kwargs": {"in_dim": 16, "hidden": 16, "num_classes": 4}},
               "training": {"max_steps": 300, "log_every": 100}}
    alone = train_in_process(make_spec(tmp_path, "alone", **student))
    taught = train_in_process(make_spec(tmp_path, "taught", **student, compression={
        "distill": {"teacher": {"checkpoint": str(teacher)}, "temperature": 2.0, "alpha": 0.7}}))
    loss = {run.name: json.loads((run / "summary.json").read_text())["eval_loss"] for run in (alone, taught)}
    assert loss["taught"] < loss["alone"], loss


@pytest.mark.distributed
def test_distillation_runs_under_zero_3(tmp_path):
    teacher = train_in_process(make_spec(tmp_path, "teacher", **CLASSIFIER, training={"max_steps": 30}))
    spec = make_spec(tmp_path, "student", **CLASSIFIER, training={"max_steps": 30, "log_every": 10},
                     strategy={"name": "zero", "stage": 3}, resources={"procs_per_node": 2},
                     compression={"distill": {"teacher": {"checkpoint": str(teacher)}, "alpha": 0.5}})
    sharded = launch_ok(spec)
    # the same distillation in one process, on the same global batch (2 ranks x micro-batch)
    micro = CLASSIFIER["data"]["micro_batch_size"]
    one = train_in_process(spec, "strategy.name=single", "strategy.stage=null", "resources.procs_per_node=1",
                           f"data.micro_batch_size={2 * micro}", "output.dir=" + str(tmp_path / "one"))
    assert_runs_match(one, sharded, 1e-5)


@pytest.mark.parametrize("method", ["dynamic_int8", "weight_only_int8"])
def test_torchao_int8_is_small_accurate_and_loads_in_a_fresh_process(tmp_path, capsys, method):
    spec = make_spec(tmp_path, "dense", **{
        **CLASSIFIER, "training": {"max_steps": 60, "log_every": 20},
        "model": LINEAR_HEAVY})
    run = train_in_process(spec)
    assert main(["quantize", str(run), "--method", method]) == 0
    report = json.loads((run / "quantized" / "report.json").read_text())
    assert report["size_ratio"] < 0.35
    assert report["eval"]["fp32"]["accuracy"] > 0.5  # a model that learned
    assert abs(report["eval"]["int8"]["accuracy"] - report["eval"]["fp32"]["accuracy"]) <= 0.02  # stated tolerance
    fresh = subprocess.run(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from torch.utils.data import DataLoader;"
         "from launcher.compression.quantize import load_quantized, evaluate; import torch.nn.functional as F;"
         "from launcher.components import build_datasets; from launcher.spec import spec_from_json_file;"
         "run = Path(sys.argv[1]); spec = spec_from_json_file(run / 'spec.json');"
         "_, ev = build_datasets(spec.data);"
         "print(evaluate(load_quantized(run), DataLoader(ev, batch_size=32), F.cross_entropy)['accuracy'])",
         str(run)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert float(fresh.stdout.strip()) == pytest.approx(report["eval"]["int8"]["accuracy"])


def test_static_int8_with_calibration_writes_a_report(tmp_path, capsys):
    run = train_in_process(make_spec(tmp_path, "dense",
                                     **{**CLASSIFIER, "model": LINEAR_HEAVY, "training": {"max_steps": 60}}))
    assert main(["quantize", str(run), "--method", "static_int8", "--calibrate", "4"]) == 0
    report = json.loads((run / "quantized" / "report.json").read_text())
    assert report["calibration_batches"] == 4 and report["size_ratio"] < 0.35
    fp32, int8 = report["eval"]["fp32"]["accuracy"], report["eval"]["int8"]["accuracy"]
    assert fp32 > 0.5 and abs(int8 - fp32) <= 0.03, (fp32, int8)  # calibrated activations keep the accuracy


def test_bad_compression_input_is_refused_and_nothing_is_written(tmp_path, capsys):
    spec = make_spec(tmp_path, "student", **CLASSIFIER, training={"max_steps": 5},
                     compression={"distill": {"teacher": {"checkpoint": str(tmp_path / "no-teacher")}}})
    assert main(["launch", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: compression.distill.teacher.checkpoint=") and "no complete checkpoint" in err
    assert not (tmp_path / "runs" / "student").exists()

    untrained = tmp_path / "runs" / "untrained"
    untrained.mkdir(parents=True)
    (untrained / "spec.json").write_text("{}")
    assert main(["quantize", str(untrained)]) == 2
    assert "has no complete checkpoint; train it first" in capsys.readouterr().err
    assert sorted(p.name for p in untrained.iterdir()) == ["spec.json"]
