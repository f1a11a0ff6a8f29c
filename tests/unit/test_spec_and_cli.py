"""Spec loading, typed overrides, schema export, and the pure dry run of the local executor."""
from __future__ import annotations

import json
import subprocess

import pytest
from pydantic import ValidationError

from launcher.cli import main
from launcher.plan import make_plan
from launcher.spec import load_spec
from tests.helpers import MESHYARD, REPO, make_spec


def test_overrides_are_typed_by_the_schema(tmp_path):
    spec = load_spec(make_spec(tmp_path), ["optimizer.lr=1e-3", "training.max_steps=7", "data.shuffle=false",
                                           "optimizer.betas=[0.8, 0.9]"])
    assert spec.optimizer.lr == 1e-3 and spec.training.max_steps == 7 and spec.data.shuffle is False
    assert spec.optimizer.betas == (0.8, 0.9)


def test_spec_is_frozen(tmp_path):
    spec = load_spec(make_spec(tmp_path))
    with pytest.raises(ValidationError, match="frozen"):
        spec.optimizer.lr = 1.0


def test_schema_command_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["required"]) == {"name", "model", "data", "optimizer", "training"}
    assert schema["$defs"]["OptimizerSpec"]["properties"]["name"]["enum"] == ["sgd", "adam", "adamw", "rmsprop"]


def test_every_example_validates(capsys):
    examples = sorted((REPO / "examples").glob("*.yaml"))
    assert len(examples) >= 5
    for example in examples:
        assert main(["validate", str(example)]) == 0, example


def test_plan_prints_the_exact_torchrun_command(tmp_path, capsys):
    spec = make_spec(tmp_path, resources={"procs_per_node": 2, "max_restarts": 3})
    assert main(["plan", str(spec)]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "test"
    assert ("-m torch.distributed.run --nnodes=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:0 --rdzv-id=test"
            " --local-addr=127.0.0.1 --nproc-per-node=2 --max-restarts=3") in out
    assert f"-m launcher.worker {run_dir / 'spec.json'}" in out
    assert not run_dir.exists()  # plan starts and writes nothing


def test_dry_run_is_data(tmp_path):
    from launcher.executors.local import LocalExecutor
    from launcher.executors.request import Job, LaunchOptions

    spec = load_spec(make_spec(tmp_path, resources={"procs_per_node": 2}))
    job = Job(name="test", spec_path=tmp_path / "spec.json", plan=make_plan(spec), max_restarts=0, hang_timeout_s=60,
              checkpoints_kept=3)
    request = LocalExecutor().dry_run(job, LaunchOptions())
    assert request.argv[1:3] == ("-m", "torch.distributed.run")
    assert request.env["OMP_NUM_THREADS"] and request.marker == str(tmp_path / "spec.json")


def test_a_closed_output_pipe_ends_quietly(tmp_path):
    """`meshyard plan SPEC | head` when head has already exited: no traceback, SIGPIPE's exit status."""
    proc = subprocess.Popen([MESHYARD, "plan", str(make_spec(tmp_path))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line is printed
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert err == ""
