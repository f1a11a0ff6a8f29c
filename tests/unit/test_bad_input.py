"""Malformed specs and arguments: exit 2, one line naming the field or file and what is allowed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from launcher.cli import main
from tests.helpers import BASE_SPEC, MESHYARD, REPO, make_spec, meshyard, train_in_process

PIPELINE_MLP = {"target": "launcher.models:mlp", "kwargs": {"in_dim": 8, "hidden": 16, "out_dim": 1, "depth": 4}}

# (case id, spec sections to merge or a raw file body, extra argv, text the one line must contain)
CASES = [
    ("unknown top-level key", {"epochs": 3}, [], "epochs: unknown key; allowed here: name, seed, model"),
    ("unknown nested key", {"optimizer": {"name": "sgd", "lr": 0.1, "mom": 0.9}}, [],
     "optimizer.mom: unknown key; allowed here: name, lr, momentum"),
    ("wrong type", {"optimizer": {"name": "sgd", "lr": "fast"}}, [], "optimizer.lr: Input should be a valid number"),
    ("negative lr", {"optimizer": {"name": "sgd", "lr": -0.1}}, [], "optimizer.lr: Input should be greater than 0"),
    ("zero micro-batch", {"data": {"micro_batch_size": 0}}, [],
     "data.micro_batch_size: Input should be greater than 0"),
    ("fractional steps", {"training": {"max_steps": 2.5}}, [], "training.max_steps: Input should be a valid integer"),
    ("unknown optimizer", {"optimizer": {"name": "lamb", "lr": 0.1}}, [],
     "optimizer.name: Input should be 'sgd', 'adam', 'adamw' or 'rmsprop'"),
    ("unknown precision", {"training": {"max_steps": 5, "precision": "fp16"}}, [],
     "training.precision: Input should be 'fp32' or 'bf16'"),
    ("missing section", {"model": None}, [], "model: Input should be a valid dictionary"),
    ("malformed target", {"model": {"target": "launcher.models.mlp"}}, [],
     'model.target: expected an import path "module:callable"'),
    ("unimportable module", {"model": {"target": "no_such_pkg.models:net"}}, [],
     "model.target: cannot import module 'no_such_pkg.models'"),
    ("missing attribute", {"data": {"target": "launcher.data:no_such_dataset"}}, [],
     "data.target: module 'launcher.data' has no attribute 'no_such_dataset'"),
    ("unimportable loss", {"loss": "no_such_pkg:loss"}, [], "loss: cannot import module 'no_such_pkg'"),
    ("memory budget not a size", {"resources": {"memory_per_rank": "lots"}}, [],
     "resources.memory_per_rank: expected a positive number of bytes or a size such as 4GiB or 512MiB (got 'lots')"),
    ("mesh does not factor", {"parallel": {"data": 3}, "resources": {"procs_per_node": 2}}, [],
     "parallel: data 3 x tensor 1 x pipeline 1 = 3 does not equal the world size 2"),
    ("mesh degrees vs world", {"parallel": {"data": 2, "tensor": 2, "pipeline": 2}, "resources": {"procs_per_node": 4}},
     [], "parallel: data 2 x tensor 2 x pipeline 2 = 8 does not equal the world size 4"),
    ("model degrees vs world", {"parallel": {"tensor": 3}, "resources": {"procs_per_node": 4}}, [],
     "parallel: tensor 3 x pipeline 1 does not divide the world size 4"),
    ("microbatches vs micro-batch",
     {"model": PIPELINE_MLP, "parallel": {"pipeline": 2, "microbatches": 5}, "resources": {"procs_per_node": 2}}, [],
     "parallel.microbatches=5 does not divide data.micro_batch_size=24"),
    ("more stages than blocks",
     {"model": PIPELINE_MLP,
      "parallel": {"pipeline": 2, "schedule": "interleaved_1f1b", "stages_per_rank": 3, "microbatches": 4},
      "resources": {"procs_per_node": 2}}, [],
     "parallel: pipeline x stages_per_rank = 6 stages, but the model has only 4 layers (blocks)"),
    ("tp does not divide heads",
     {"model": {"target": "launcher.models:transformer", "kwargs": {"dim": 48, "n_heads": 3}},
      "parallel": {"tensor": 2}, "resources": {"procs_per_node": 2}}, [],
     "parallel.tensor=2 does not divide the model's 3 attention heads"),
    ("tp without a plan", {"parallel": {"tensor": 2}, "resources": {"procs_per_node": 2}}, [],
     "parallel.tensor=2: the model (launcher.models:mlp) declares no tp_plan; give parallel.tp_plan"),
    ("tp plan matching nothing",
     {"parallel": {"tensor": 2, "tp_plan": {"layers.*.fc": "colwise"}}, "resources": {"procs_per_node": 2}}, [],
     "parallel.tensor=2: the tensor-parallel plan matches no nn.Linear of the model (launcher.models:mlp)"),
    ("1f1b with too few microbatches",
     {"model": PIPELINE_MLP, "parallel": {"pipeline": 2, "microbatches": 1}, "resources": {"procs_per_node": 2}}, [],
     "parallel.microbatches=1: schedule 1f1b needs at least parallel.pipeline=2"),
    ("split points vs stages",
     {"model": PIPELINE_MLP, "parallel": {"pipeline": 2, "split_points": ["blocks.1", "blocks.2"]},
      "resources": {"procs_per_node": 2}}, [],
     "parallel.split_points: 2 split points make 3 stages, but pipeline x stages_per_rank = 2"),
    ("interleaving without its schedule", {"parallel": {"stages_per_rank": 2}}, [],
     "parallel: stages_per_rank=2 needs schedule: interleaved_1f1b"),
    ("deepspeed with tensor parallel",
     {"model": {"target": "launcher.models:transformer"}, "strategy": {"name": "deepspeed", "stage": 1},
      "parallel": {"tensor": 2}, "resources": {"procs_per_node": 2}}, [],
     "strategy.name=deepspeed with parallel.tensor=2, parallel.pipeline=1: not supported; use ddp or auto"),
    ("zero 1 with a pipeline",
     {"model": PIPELINE_MLP, "strategy": {"name": "zero", "stage": 1}, "parallel": {"pipeline": 2},
      "resources": {"procs_per_node": 2}}, [],
     "strategy.name=zero stage 1 with parallel.tensor=1, parallel.pipeline=2: not supported; use ddp or auto"),
    ("shard over data with ddp", {"parallel": {"data_shard": 2}, "resources": {"procs_per_node": 2}}, [],
     "parallel.data_shard=2: strategy ddp replicates over every data-parallel rank; sharding over some of them"
     " (HSDP) needs strategy zero stage 2 or 3"),
    ("hsdp degrees vs data", {"strategy": {"name": "zero", "stage": 3}, "resources": {"procs_per_node": 4},
                              "parallel": {"data_replicate": 2, "data_shard": 3}}, [],
     "parallel.data_shard=3 does not divide parallel.data = 4"),
    ("hsdp sharding nothing", {"strategy": {"name": "zero", "stage": 2}, "resources": {"procs_per_node": 2},
                               "parallel": {"data_replicate": 2}}, [],
     "parallel.data_shard=1 with strategy zero stage 2: nothing would be sharded"),
    ("zero data_shard", {"parallel": {"data_shard": 0}}, [], "parallel.data_shard: Input should be greater than 0"),
    ("ddp options with tensor parallel",
     {"model": {"target": "launcher.models:transformer"}, "strategy": {"name": "ddp", "static_graph": True},
      "parallel": {"tensor": 2}, "resources": {"procs_per_node": 2}}, [],
     "strategy.find_unused_parameters/static_graph with parallel.tensor=2, parallel.pipeline=1: they configure DDP"),
    ("single with 2 procs", {"strategy": {"name": "single"}, "resources": {"procs_per_node": 2}}, [],
     "strategy.name=single runs one process, but the world size is 2"),
    ("zero data degree", {"parallel": {"data": 0}}, [],
     "parallel.data: must be -1 (the rest of the world) or a positive integer"),
    ("nesterov without momentum", {"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": True}}, [],
     "optimizer: nesterov: only for name sgd with momentum > 0"),
    ("stop after the end", {"training": {"max_steps": 5, "stop_at_step": 9}}, [],
     "training.stop_at_step=9 is past training.max_steps=5"),
    ("bad run name", {"name": "../escape"}, [], 'name: expected letters, digits'),
    ("bad --set syntax", {}, ["--set", "optimizer.lr"], "--set 'optimizer.lr': expected KEY=VALUE"),
    ("--set unknown field", {}, ["--set", "optimizer.learning_rate=0.1"], "optimizer.learning_rate: unknown key"),
    ("--set through a value", {}, ["--set", "loss.kind=x"], "loss: is a value, not a section"),
    # YAML needs a space after a colon: `{name:zero}` is the key "name:zero" with no value
    ("--set glued mapping", {}, ["--set", "strategy={name:zero,stage:2}"],
     "--set 'strategy={name:zero,stage:2}': YAML reads name:zero, stage:2 as keys with no value (a colon needs a"
     " space after it); write --set 'strategy={name: zero,stage: 2}'"),
    ("--set glued kwargs", {}, ["--set", "model.kwargs={in_dim:8}"],  # kwargs take any key: it would pass silently
     "YAML reads in_dim:8 as a key with no value (a colon needs a space after it);"
     " write --set 'model.kwargs={in_dim: 8}'"),
    ("--set a section as key:value", {}, ["--set", "strategy=name:zero"],
     "strategy: Input should be a valid dictionary or instance of StrategySpec (got 'name:zero'); for a section"
     " write {name: zero} (a space after the colon) or --set strategy.name=zero"),
    ("glued key in the file", {"model": {**BASE_SPEC["model"], "kwargs": {"in_dim:8": None}}}, [],
     "model.kwargs.in_dim:8: YAML reads this as one key with no value; a colon needs a space after it (in_dim: 8)"),
    ("prune amount above 1", {"compression": {"prune": {"amount": 1.5, "schedule": {"end_step": 5}}}}, [],
     "compression.prune.amount: Input should be less than or equal to 1"),
    ("structured global pruning",
     {"compression": {"prune": {"method": "l1_structured", "amount": 0.5, "schedule": {"end_step": 5}}}}, [],
     "compression.prune: method l1_structured prunes whole rows per layer; use scope: per_layer"),
    ("zero without a stage", {"strategy": {"name": "zero"}}, [],
     "strategy: stage: required with name zero (1, 2 or 3) or deepspeed (0-3), and only with them"),
    ("zero stage 4", {"strategy": {"name": "zero", "stage": 4}}, [],
     "strategy.stage: Input should be less than or equal to 3"),
    ("zero stage 0", {"strategy": {"name": "zero", "stage": 0}}, [],
     "strategy: stage: ZeRO stage 0 is plain data parallel; with name zero use 1, 2 or 3"),
    ("deepspeed stage 4", {"strategy": {"name": "deepspeed", "stage": 4}}, [],
     "strategy.stage: Input should be less than or equal to 3"),
    ("offload without deepspeed", {"strategy": {"name": "ddp", "offload_optimizer": "cpu"}}, [],
     "strategy: offload_optimizer and config apply to name deepspeed only"),
    ("offload below zero stage 3", {"strategy": {"name": "zero", "stage": 2, "offload": "cpu"}}, [],
     "strategy: offload applies to name zero stage 3 only (FSDP2 offloads parameters, gradients and optimizer"
     " state); with name deepspeed use offload_optimizer"),
    ("deepspeed config not found", {"strategy": {"name": "deepspeed", "stage": 1, "config": "no_such.json"}}, [],
     "strategy.config=no_such.json: no such file"),
    ("deepspeed cannot skip", {"strategy": {"name": "deepspeed", "stage": 2}, "training": {"on_nonfinite": "skip"}}, [],
     "training.on_nonfinite=skip with strategy deepspeed"),
    ("pruning sharded weights",
     {"strategy": {"name": "zero", "stage": 3}, "resources": {"procs_per_node": 2},
      "compression": {"prune": {"amount": 0.5, "schedule": {"end_step": 5}}}}, [],
     "compression.prune with strategy zero stage 3: pruning sharded weights is not supported yet"),
    ("unknown executor", {}, ["--executor", "slurm"],
     "--executor slurm: unknown executor; allowed: local, ray, accelerate"),
    # Bring your own model: everything the meta-built model can tell is refused before launch.
    ("meta init without a hook",
     {"model": {"target": "tests.fixtures.real_models:self_init_mlp", "init": "meta"},
      "strategy": {"name": "zero", "stage": 3}, "resources": {"procs_per_node": 2}}, [],
     "model.init=meta: SelfInitMLP (tests.fixtures.real_models:self_init_mlp) declares no _init_weights(module) hook"),
    ("meta init with deepspeed",
     {"model": {"target": "tests.fixtures.real_models:odd_layers_lm", "kwargs": {}, "init": "meta"},
      "strategy": {"name": "deepspeed", "stage": 3}, "resources": {"procs_per_node": 2}}, [],
     "model.init=meta with strategy deepspeed: deepspeed.zero.Init would partition"),
    ("tensor parallel over a Conv1D",
     {"model": {"target": "tests.fixtures.real_models:odd_layers_lm", "kwargs": {}},
      "parallel": {"tensor": 2, "tp_plan": {"stack.*.mix": "colwise"}}, "resources": {"procs_per_node": 2}}, [],
     "parallel.tensor=2: stack.0.mix is a Conv1D; tensor parallel shards nn.Linear layers only"),
    ("layer path that is not there",
     {"model": {**BASE_SPEC["model"], "layers": "layers"}, "strategy": {"name": "zero", "stage": 3},
      "resources": {"procs_per_node": 2}}, [], "model.layers=layers: MLP has no submodule 'layers'"),
    ("layer path that is not a list",
     {"model": {**BASE_SPEC["model"], "layers": "head"}, "strategy": {"name": "zero", "stage": 2},
      "resources": {"procs_per_node": 2}}, [], "model.layers=head: is a Linear, not an nn.ModuleList of layers"),
    ("pipeline with the model's own loss",
     {"model": {"target": "tests.fixtures.real_models:odd_layers_lm", "kwargs": {}}, "loss": "model",
      "parallel": {"pipeline": 2, "microbatches": 4}, "resources": {"procs_per_node": 2}}, [],
     "loss=model with parallel.pipeline=2: the last stage does not see the batch's labels"),
    ("init_from not there", {"model": {**BASE_SPEC["model"], "init_from": "no_such.safetensors"}}, [],
     "model.init_from=no_such.safetensors: no such file"),
    ("distillation with dict batches",
     {"data": {"feed": "kwargs"}, "compression": {"distill": {"teacher": {"target": "launcher.models:mlp"}}}}, [],
     "compression.distill needs (input, target) samples and a loss function"),
    ("dataset smaller than a global batch",
     {"data": {"kwargs": {"n": 40, "in_dim": 8, "out_dim": 1}}, "training": {"max_steps": 3, "grad_accum_steps": 2}},
     [], "data: the training set has 40 items, fewer than one global batch of 48"),
    ("dataset factory raises", {"data": {"kwargs": {"n": -1, "in_dim": 8, "out_dim": 1}}}, [],
     "data.target: launcher.data:synthetic_regression(**data.kwargs) failed: RuntimeError"),
    ("activation checkpointing every_0", {"training": {"activation_checkpointing": "every_0"}}, [],
     "training.activation_checkpointing: expected none, full or every_<k> with k a positive integer (e.g. every_2)"
     " (got 'every_0')"),
    ("activation checkpointing every_x", {"training": {"activation_checkpointing": "every_x"}}, [],
     "training.activation_checkpointing: expected none, full or every_<k>"),
    ("activation checkpointing partial", {"training": {"activation_checkpointing": "partial"}}, [],
     "training.activation_checkpointing: expected none, full or every_<k>"),
    ("compile not a bool", {"training": {"compile": "sometimes"}}, [],
     "training.compile: Input should be a valid boolean"),
    ("activation checkpointing without repeated layers",
     {"model": {**BASE_SPEC["model"], "kwargs": {"in_dim": 8, "hidden": 16, "out_dim": 1, "depth": 1}},
      "training": {"activation_checkpointing": "full"}}, [],
     "training.activation_checkpointing: applies to each repeated layer, but the model (launcher.models:mlp) has no"
     " list of repeated layers (an nn.ModuleList of one class); name it with model.layers"),
    ("activation checkpointing with deepspeed",
     {"strategy": {"name": "deepspeed", "stage": 3}, "training": {"activation_checkpointing": "every_2"}}, [],
     "training.activation_checkpointing=every_2 with strategy deepspeed: not applied to DeepSpeed's engine"),
    ("find_unused_parameters with zero 3", {"strategy": {"name": "zero", "stage": 3, "find_unused_parameters": True}},
     [], "strategy: find_unused_parameters and static_graph apply to name ddp"),
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


def test_a_few_problems_are_all_listed_and_more_are_counted(tmp_path, capsys):
    spec = make_spec(tmp_path)
    code, err = _run_main(capsys, ["validate", str(spec), "--set", "optimizer={nam: sgd, lr: -1}"])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == ("error: optimizer.name: required field is missing; also optimizer.lr: Input should be greater"
                   " than 0 (got -1); also optimizer.nam: unknown key; allowed here: name, lr, momentum, nesterov,"
                   " betas, eps, alpha, l1, l2, weight_decay, grad_clip\n")  # three problems: no "[+N more]"
    code, err = _run_main(capsys, ["validate", str(spec), "--set", "optimizer={nam: sgd, lr: -1}",
                                   "--set", "seed=x", "--set", "training.max_steps=0"])
    assert code == 2 and len(err.splitlines()) == 1 and err.count("; also ") == 2, err
    assert err.startswith("error: seed: Input should be a valid integer") and err.endswith(" [+2 more problem(s)]\n")


def test_missing_file(tmp_path, capsys):
    code, err = _run_main(capsys, ["plan", str(tmp_path / "nope.yaml")])
    assert code == 2 and err == f"error: {tmp_path / 'nope.yaml'}: spec file not found\n"


def test_resume_never_refuses_to_mix_with_existing_checkpoints(tmp_path, capsys):
    # A real checkpoint: a hand-written manifest is now verified (and skipped as damaged) before this check.
    checkpoints = train_in_process(make_spec(tmp_path, training={"max_steps": 1})) / "checkpoints"
    before = _tree(checkpoints)
    spec = make_spec(tmp_path, checkpoint={"resume": "never"})
    code, err = _run_main(capsys, ["launch", str(spec)])
    assert code == 2 and "checkpoint.resume=never but" in err and len(err.splitlines()) == 1, err
    assert _tree(checkpoints) == before  # nothing lost (the run's .lock is taken before this check)


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
     "strategy.config: zero_optimization.stage=3 conflicts with zero_optimization.stage=1 from the job spec"
     " (strategy.stage)"),
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
    line = next(out for out in capsys.readouterr().out.splitlines() if out.startswith("deepspeed config"))
    config = json.loads(line.removeprefix("deepspeed config"))
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert config["train_micro_batch_size_per_gpu"] == 24  # "auto" takes the spec's value


def test_deepspeed_not_installed_is_a_plan_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what importlib reports for a missing package
    spec = make_spec(tmp_path, strategy={"name": "deepspeed", "stage": 0})
    code, err = _run_main(capsys, ["plan", str(spec)])
    assert code == 2 and "strategy.name=deepspeed: the deepspeed package is not installed" in err, err


def test_compile_without_a_cpp_compiler_is_a_plan_error(tmp_path, capsys, monkeypatch):
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "cxx", (None, "no-such-g++"))  # what inductor searches: $CXX, else g++
    spec = make_spec(tmp_path, training={**BASE_SPEC["training"], "compile": True})
    code, err = _run_main(capsys, ["plan", str(spec)])
    assert code == 2 and err.startswith("error: training.compile=true: torch.compile (inductor) builds C++ kernels"
                                        " on CPU, but no-such-g++ is not on PATH"), err


# Hostile input (issue 17): each row is one `error:` line for validate, plan and launch alike, exit 2,
# no traceback, nothing written anywhere under tmp_path (so nothing under output.dir either).
# (case id, build the spec file in tmp_path, text the line must contain, wall-time bound in s or None)
KWARGS_ANYTHING = "tests.fixtures.faulty:model_failing_on_rank"  # takes **kwargs: no signature check to stop a bomb


def _sections(**sections):
    return lambda tmp: make_spec(tmp, **sections)


def _edited(edit, **sections):
    """The spec file of `sections`, its bytes then passed through `edit`."""
    def build(tmp):
        path = make_spec(tmp, **sections)
        path.write_bytes(edit(path.read_bytes()))
        return path
    return build


def _alias_bomb(levels: int = 9, width: int = 10) -> bytes:
    """A flow mapping of `levels` anchors, each naming the previous one `width` times: width**levels leaves."""
    anchors = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    anchors += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return ("bomb: {" + ", ".join(anchors) + "}").encode()


def _file_in_the_way(tmp):
    (tmp / "runs").write_text("a file where the run directories would go\n")
    return make_spec(tmp)


def _output_dir(relative):
    return lambda tmp: make_spec(tmp, output={"dir": str(tmp / relative)})


HOSTILE = [
    ("alias bomb",
     _edited(lambda b: b.replace(b"BOMB: 0", _alias_bomb()), model={"target": KWARGS_ANYTHING, "kwargs": {"BOMB": 0}}),
     "more than 100000 YAML nodes once aliases are expanded", 10),
    ("huge file", _edited(lambda b: b + b"#" * (8 << 20)), "larger than the 1 MiB limit for a spec file", 10),
    ("duplicate keys", _edited(lambda b: b + b"optimizer: {name: adam, lr: 0.1}\n"),
     "duplicate key 'optimizer' at line", None),
    ("non-UTF-8 bytes", _edited(lambda b: b + "# caf\xe9\n".encode("latin-1")), "not UTF-8 text (byte 0xe9 at offset",
     None),
    ("10000-deep nesting", _edited(lambda b: b + b"deep: " + b"{a: " * 10000 + b"1" + b"}" * 10000 + b"\n"),
     "nested deeper than 100 levels", None),
    ("NUL byte", _edited(lambda b: b + b"# \x00\n"), "character #x0000 at offset", None),
    ("bool for int", _sections(training={"max_steps": True}),
     "training.max_steps: Input should be a number, not true or false", None),
    ("bool for float", _sections(optimizer={"name": "sgd", "lr": True}),
     "optimizer.lr: Input should be a number, not true or false", None),
    (".inf timeout", _sections(training={"max_steps": 5, "collective_timeout_s": float("inf")}),
     "training.collective_timeout_s: Input should be a finite number", None),
    (".nan lr", _sections(optimizer={"name": "sgd", "lr": float("nan")}),
     "optimizer.lr: Input should be a finite number", None),
    # no bound but finiteness
    (".inf grad_clip", _sections(optimizer={"name": "sgd", "lr": 0.1, "grad_clip": float("inf")}),
     "optimizer.grad_clip: Input should be a finite number", None),
    ("timeout of a year", _sections(training={"max_steps": 5, "collective_timeout_s": 3e7}),
     "training.collective_timeout_s: Input should be less than or equal to 86400", None),
    ("seed 2**70", _sections(seed=2**70), "seed: Input should be less than 4294967296", None),
    ("negative seed", _sections(seed=-1), "seed: Input should be greater than or equal to 0", None),
    ("too many procs", _sections(resources={"procs_per_node": 100_000}),
     "resources.procs_per_node: 100000 is above the limit of 256 (a typo? if this machine really needs it, set"
     " MESHYARD_MAX_PROCS_PER_NODE=100000)", None),
    ("too many nodes", _sections(resources={"procs_per_node": 1, "nodes": 10**6}),
     "resources.nodes: 1000000 is above the limit of 1024", None),
    ("too many loader workers", _sections(data={"num_workers": 10_000}),
     "data.num_workers: 10000 is above the limit of 64", None),
    ("300-character name", _sections(name="a" * 300), "name: String should have at most 100 characters (got 'aaaa",
     None),
    ("module raising at import", _sections(model={"target": "tests.fixtures.raises_at_import:model"}),
     "model.target: importing module 'tests.fixtures.raises_at_import' raised ValueError: this module is broken on"
     " purpose and its", None),
    ("sys.exit(0) at import", _sections(model={"target": "tests.fixtures.exits_at_import:model"}),
     "model.target: importing module 'tests.fixtures.exits_at_import' called sys.exit(0)", None),
    ("misspelt model kwarg", _sections(model={"target": "launcher.models:mlp", "kwargs": {"in_dim": 8, "hiden": 16}}),
     "model.kwargs.hiden: not a parameter of launcher.models:mlp (allowed: in_dim, hidden, out_dim, depth)", None),
    ("misspelt eval kwarg", _sections(data={"eval_kwargs": {"samples": 64}}),
     "data.eval_kwargs.samples: not a parameter of launcher.data:synthetic_regression (allowed: n, in_dim", None),
    ("output.dir is a file", _file_in_the_way, "output.dir: ", None),
    ("output.dir component too long", _output_dir("x" * 300), "output.dir: a path component is longer than 255 bytes",
     None),
    ("output.dir path too long", _output_dir("/".join(["y" * 200] * 25)), "output.dir: the run directory's path is",
     None),
]


def _tree(root):
    """Every path under `root` with its size and mtime: a write anywhere changes it."""
    return {(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("command", ["validate", "plan", "launch"])
@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_spec(tmp_path, capsys, case, command):
    _, build, expected, max_seconds = case
    spec = build(tmp_path)
    before = _tree(tmp_path)
    started = time.monotonic()
    code, err = _run_main(capsys, [command, str(spec)])
    elapsed = time.monotonic() - started
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert expected in err, err
    assert _tree(tmp_path) == before  # nothing written: no run directory, no spec.json
    if max_seconds is not None:
        assert elapsed < max_seconds, f"{elapsed:.1f} s"


def test_hostile_spec_in_a_real_process_is_fast_small_and_one_line(tmp_path):
    """The console script on an alias bomb and a huge file: < 10 s, < 500 MB, one line, no traceback."""
    measure = ("import json, resource, subprocess, sys, time; t = time.monotonic();"
               " r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
               " print(json.dumps({'rc': r.returncode, 'out': r.stdout + r.stderr, 's': time.monotonic() - t,"
               " 'mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    for case in [c for c in HOSTILE if c[0] in ("alias bomb", "huge file", "sys.exit(0) at import")]:
        folder = tmp_path / case[0].replace(" ", "_")
        folder.mkdir()
        spec = case[1](folder)
        result = subprocess.run([sys.executable, "-c", measure, MESHYARD, "validate", str(spec)], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        report = json.loads(result.stdout)
        assert report["rc"] == 2 and case[2] in report["out"], report
        assert len(report["out"].splitlines()) == 1 and "Traceback" not in report["out"], report
        assert report["s"] < 10 and report["mb"] < 500, report


# Root writes into a read-only directory by its DAC-override capabilities: drop them for the run
# (util-linux's setpriv), so the test means the same as root as it does for a user.
WITHOUT_ROOTS_OVERRIDE = (["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                           "--inh-caps=-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])


def test_read_only_output_dir(tmp_path):
    (tmp_path / "runs").mkdir(mode=0o555)
    result = subprocess.run([*WITHOUT_ROOTS_OVERRIDE, MESHYARD, "validate", str(make_spec(tmp_path))], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"error: output.dir: {tmp_path / 'runs'} (where the run directory goes) is not writable\n"


def test_site_limit_can_be_raised_for_a_big_machine(tmp_path, capsys, monkeypatch):
    spec = make_spec(tmp_path, resources={"procs_per_node": 300}, data={"micro_batch_size": 1})  # 480 items >= 300
    assert main(["validate", str(spec)]) == 2
    monkeypatch.setenv("MESHYARD_MAX_PROCS_PER_NODE", "512")
    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err


def test_largest_accepted_seed_works_where_seeds_are_used():
    """seed < MAX_SEED must fit every consumer: torch's 64-bit seed per rank and the sampler's seed mix."""
    from launcher.rng import seed_all
    from launcher.sampler import BatchLayout
    from launcher.spec.schema import MAX_SEED

    seed_all(MAX_SEED - 1 + 4096)  # seed + rank
    layout = BatchLayout(dataset_size=8, micro_batch_size=2, grad_accum_steps=1, dp_rank=0, dp_size=1,
                         seed=MAX_SEED - 1, shuffle=True)
    assert sorted(layout.epoch_order(10**9)) == list(range(8))


def test_export_onto_a_directory_is_one_line(tmp_path, capsys):
    run = train_in_process(make_spec(tmp_path, training={"max_steps": 1}))
    target = tmp_path / "a_directory"
    target.mkdir()
    code, err = _run_main(capsys, ["export", str(run), "--out", str(target)])
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and str(target) in err, err
    assert list(target.iterdir()) == []


def test_site_limits_are_stated_in_the_schema():
    """The JSON Schema an editor shows names each cap and the variable that raises it."""
    from launcher.spec.load import SITE_LIMITS
    from launcher.spec.schema import JobSpec

    for field, (variable, limit) in SITE_LIMITS.items():
        section, key = field.split(".")
        description = JobSpec.model_fields[section].annotation.model_fields[key].description
        assert f"at most {limit} " in description and variable in description, (field, description)


def test_utf16_spec_with_a_byte_order_mark_is_read(tmp_path, capsys):
    spec = make_spec(tmp_path)
    spec.write_bytes(spec.read_text().encode("utf-16"))
    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err
