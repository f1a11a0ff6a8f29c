"""Malformed specs and arguments: exit 2, one line naming the field or file and what is allowed."""
from __future__ import annotations

import json
import sys

import pytest

from launcher.cli import main
from tests.helpers import make_spec, meshyard

PIPELINE_MLP = {"target": "launcher.models:mlp", "kwargs": {"in_dim": 8, "hidden": 16, "out_dim": 1, "depth": 4}}

# (case id, spec sections to merge or a raw file body, extra argv, text the one line must contain)
CASES = [
    ("unknown top-level key", {"epochs": 3}, [], "epochs: unknown key; allowed here: name, seed, model"),
    ("unknown nested key", {"optimizer": {"name": "sgd", "lr": 0.1, "mom": 0.9}}, [], "optimizer.mom: unknown key; allowed here: name, lr, momentum"),
    ("wrong type", {"optimizer": {"name": "sgd", "lr": "fast"}}, [], "optimizer.lr: Input should be a valid number"),
    ("negative lr", {"optimizer": {"name": "sgd", "lr": -0.1}}, [], "optimizer.lr: Input should be greater than 0"),
    ("zero micro-batch", {"data": {"micro_batch_size": 0}}, [], "data.micro_batch_size: Input should be greater than 0"),
    ("fractional steps", {"training": {"max_steps": 2.5}}, [], "training.max_steps: Input should be a valid integer"),
    ("unknown optimizer", {"optimizer": {"name": "lamb", "lr": 0.1}}, [], "optimizer.name: Input should be 'sgd', 'adam', 'adamw' or 'rmsprop'"),
    ("unknown precision", {"training": {"max_steps": 5, "precision": "fp16"}}, [], "training.precision: Input should be 'fp32' or 'bf16'"),
    ("missing section", {"model": None}, [], "model: Input should be a valid dictionary"),
    ("malformed target", {"model": {"target": "launcher.models.mlp"}}, [], 'model.target: expected an import path "module:callable"'),
    ("unimportable module", {"model": {"target": "no_such_pkg.models:net"}}, [], "model.target: cannot import module 'no_such_pkg.models'"),
    ("missing attribute", {"data": {"target": "launcher.data:no_such_dataset"}}, [], "data.target: module 'launcher.data' has no attribute 'no_such_dataset'"),
    ("unimportable loss", {"loss": "no_such_pkg:loss"}, [], "loss: cannot import module 'no_such_pkg'"),
    ("mesh does not factor", {"parallel": {"data": 3}, "resources": {"procs_per_node": 2}}, [], "parallel: data 3 x tensor 1 x pipeline 1 = 3 does not equal the world size 2"),
    ("mesh degrees vs world", {"parallel": {"data": 2, "tensor": 2, "pipeline": 2}, "resources": {"procs_per_node": 4}}, [], "parallel: data 2 x tensor 2 x pipeline 2 = 8 does not equal the world size 4"),
    ("model degrees vs world", {"parallel": {"tensor": 3}, "resources": {"procs_per_node": 4}}, [], "parallel: tensor 3 x pipeline 1 does not divide the world size 4"),
    ("microbatches vs micro-batch", {"model": PIPELINE_MLP, "parallel": {"pipeline": 2, "microbatches": 5}, "resources": {"procs_per_node": 2}}, [], "parallel.microbatches=5 does not divide data.micro_batch_size=24"),
    ("more stages than blocks", {"model": PIPELINE_MLP, "parallel": {"pipeline": 2, "schedule": "interleaved_1f1b", "stages_per_rank": 3, "microbatches": 4}, "resources": {"procs_per_node": 2}}, [], "parallel: pipeline x stages_per_rank = 6 stages, but the model has only 4 blocks"),
    ("tp does not divide heads", {"model": {"target": "launcher.models:transformer", "kwargs": {"dim": 48, "n_heads": 3}}, "parallel": {"tensor": 2}, "resources": {"procs_per_node": 2}}, [], "parallel.tensor=2 does not divide the model's 3 attention heads"),
    ("tp without a plan", {"parallel": {"tensor": 2}, "resources": {"procs_per_node": 2}}, [], "parallel.tensor=2: the model (launcher.models:mlp) declares no tp_plan; give parallel.tp_plan"),
    ("tp plan matching nothing", {"parallel": {"tensor": 2, "tp_plan": {"layers.*.fc": "colwise"}}, "resources": {"procs_per_node": 2}}, [], "parallel.tensor=2: the tensor-parallel plan matches no nn.Linear of the model (launcher.models:mlp)"),
    ("1f1b with too few microbatches", {"model": PIPELINE_MLP, "parallel": {"pipeline": 2, "microbatches": 1}, "resources": {"procs_per_node": 2}}, [], "parallel.microbatches=1: schedule 1f1b needs at least parallel.pipeline=2"),
    ("split points vs stages", {"model": PIPELINE_MLP, "parallel": {"pipeline": 2, "split_points": ["blocks.1", "blocks.2"]}, "resources": {"procs_per_node": 2}}, [], "parallel.split_points: 2 split points make 3 stages, but pipeline x stages_per_rank = 2"),
    ("interleaving without its schedule", {"parallel": {"stages_per_rank": 2}}, [], "parallel: stages_per_rank=2 needs schedule: interleaved_1f1b"),
    ("deepspeed with tensor parallel", {"model": {"target": "launcher.models:transformer"}, "strategy": {"name": "deepspeed", "stage": 1}, "parallel": {"tensor": 2}, "resources": {"procs_per_node": 2}}, [], "strategy.name=deepspeed with parallel.tensor=2, parallel.pipeline=1: not supported; use ddp or auto"),
    ("zero with a pipeline", {"model": PIPELINE_MLP, "strategy": {"name": "zero", "stage": 1}, "parallel": {"pipeline": 2}, "resources": {"procs_per_node": 2}}, [], "strategy.name=zero with parallel.tensor=1, parallel.pipeline=2: not supported; use ddp or auto"),
    ("single with 2 procs", {"strategy": {"name": "single"}, "resources": {"procs_per_node": 2}}, [], "strategy.name=single runs one process, but the world size is 2"),
    ("zero data degree", {"parallel": {"data": 0}}, [], "parallel.data: must be -1 (the rest of the world) or a positive integer"),
    ("nesterov without momentum", {"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": True}}, [], "optimizer: nesterov: only for name sgd with momentum > 0"),
    ("stop after the end", {"training": {"max_steps": 5, "stop_at_step": 9}}, [], "training.stop_at_step=9 is past training.max_steps=5"),
    ("bad run name", {"name": "../escape"}, [], 'name: expected letters, digits'),
    ("bad --set syntax", {}, ["--set", "optimizer.lr"], "--set 'optimizer.lr': expected KEY=VALUE"),
    ("--set unknown field", {}, ["--set", "optimizer.learning_rate=0.1"], "optimizer.learning_rate: unknown key"),
    ("--set through a value", {}, ["--set", "loss.kind=x"], "loss: is a value, not a section"),
    ("prune amount above 1", {"compression": {"prune": {"amount": 1.5, "schedule": {"end_step": 5}}}}, [], "compression.prune.amount: Input should be less than or equal to 1"),
    ("structured global pruning", {"compression": {"prune": {"method": "l1_structured", "amount": 0.5, "schedule": {"end_step": 5}}}}, [], "compression.prune: method l1_structured prunes whole rows per layer; use scope: per_layer"),
    ("zero without a stage", {"strategy": {"name": "zero"}}, [], "strategy: stage: required with name zero (1, 2 or 3) or deepspeed (0-3), and only with them"),
    ("zero stage 4", {"strategy": {"name": "zero", "stage": 4}}, [], "strategy.stage: Input should be less than or equal to 3"),
    ("zero stage 0", {"strategy": {"name": "zero", "stage": 0}}, [], "strategy: stage: ZeRO stage 0 is plain data parallel; with name zero use 1, 2 or 3"),
    ("deepspeed stage 4", {"strategy": {"name": "deepspeed", "stage": 4}}, [], "strategy.stage: Input should be less than or equal to 3"),
    ("offload without deepspeed", {"strategy": {"name": "ddp", "offload_optimizer": "cpu"}}, [], "strategy: offload_optimizer and config apply to name deepspeed only"),
    ("deepspeed config not found", {"strategy": {"name": "deepspeed", "stage": 1, "config": "no_such.json"}}, [], "strategy.config=no_such.json: no such file"),
    ("deepspeed cannot skip", {"strategy": {"name": "deepspeed", "stage": 2}, "training": {"on_nonfinite": "skip"}}, [], "training.on_nonfinite=skip with strategy deepspeed"),
    ("pruning sharded weights", {"strategy": {"name": "zero", "stage": 3}, "resources": {"procs_per_node": 2}, "compression": {"prune": {"amount": 0.5, "schedule": {"end_step": 5}}}}, [], "compression.prune with strategy zero stage 3: pruning sharded weights is not supported yet"),
    ("unknown executor", {}, ["--executor", "slurm"], "--executor slurm: unknown executor; allowed: local, ray, accelerate"),
]
RAW_FILES = [
    ("YAML syntax error", "name: x\nmodel: {target: a:b\n", "YAML syntax error at line 3"),
    ("not a mapping", "- name: x\n", "a job spec must be a YAML mapping"),
]


def _run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_field(tmp_path, capsys, case):
    _, sections, extra, expected = case
    spec = make_spec(tmp_path, **sections)
    code, err = _run_main(capsys, ["launch", str(spec), *extra])
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err


@pytest.mark.parametrize("case", RAW_FILES, ids=[c[0] for c in RAW_FILES])
def test_bad_yaml_file(tmp_path, capsys, case):
    _, body, expected = case
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    code, err = _run_main(capsys, ["validate", str(path)])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {path}: ") and expected in err, err


def test_missing_file(tmp_path, capsys):
    code, err = _run_main(capsys, ["plan", str(tmp_path / "nope.yaml")])
    assert code == 2 and err == f"error: {tmp_path / 'nope.yaml'}: spec file not found\n"


def test_resume_never_refuses_to_mix_with_existing_checkpoints(tmp_path, capsys):
    spec = make_spec(tmp_path, checkpoint={"resume": "never"})
    existing = tmp_path / "runs" / "test" / "checkpoints" / "step_00000003"
    existing.mkdir(parents=True)
    (existing / "manifest.json").write_text("{}")
    code, err = _run_main(capsys, ["launch", str(spec)])
    assert code == 2 and "checkpoint.resume=never but" in err and len(err.splitlines()) == 1
    assert (existing / "manifest.json").is_file()  # nothing lost


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    spec = make_spec(tmp_path, optimizer={"name": "sgd", "lr": -1})
    result = meshyard("launch", str(spec))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: optimizer.lr: Input should be greater than 0 (got -1)"
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists()  # nothing was written


@pytest.mark.parametrize("user,expected", [
    ({"gradient_accumulation_steps": 4},
     "strategy.config: gradient_accumulation_steps=4 conflicts with gradient_accumulation_steps=1 from the job spec"
     " (training.grad_accum_steps)"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}},
     "strategy.config: zero_optimization.stage=3 conflicts with zero_optimization.stage=1 from the job spec (strategy.stage)"),
    ({"optimizer": {"type": "Adam"}}, "strategy.config: 'optimizer' is set by the job spec (optimizer)"),
    ({"checkpoint": {"load_universal": True}}, "strategy.config: 'checkpoint' is set by the job spec (checkpoint)"),
])
def test_conflicting_deepspeed_json_names_both_sources(tmp_path, capsys, user, expected):
    (tmp_path / "ds.json").write_text(json.dumps(user))
    spec = make_spec(tmp_path, strategy={"name": "deepspeed", "stage": 1, "config": str(tmp_path / "ds.json")})
    code, err = _run_main(capsys, ["plan", str(spec)])
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_deepspeed_json_adds_settings_and_accepts_auto(tmp_path, capsys):
    user = {"zero_optimization": {"reduce_bucket_size": 1000}, "train_micro_batch_size_per_gpu": "auto"}
    (tmp_path / "ds.json").write_text(json.dumps(user))
    spec = make_spec(tmp_path, strategy={"name": "deepspeed", "stage": 2, "config": str(tmp_path / "ds.json")})
    assert main(["plan", str(spec)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("deepspeed config"))
    config = json.loads(line.removeprefix("deepspeed config"))
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert config["train_micro_batch_size_per_gpu"] == 24  # "auto" takes the spec's value


def test_deepspeed_not_installed_is_a_plan_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what importlib reports for a missing package
    spec = make_spec(tmp_path, strategy={"name": "deepspeed", "stage": 0})
    code, err = _run_main(capsys, ["plan", str(spec)])
    assert code == 2 and "strategy.name=deepspeed: the deepspeed package is not installed" in err, err
