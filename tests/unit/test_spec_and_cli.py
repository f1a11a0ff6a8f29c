"""Spec loading, typed overrides, schema export, and the pure dry run of the local executor."""
from __future__ import annotations

import json
import subprocess
import sys

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


# The console script runs launcher.entry:main; this stands in for it with a real signal sent to itself
# while Python imports launcher.cli (an import hook sends it at that moment, as a user's Ctrl-C could).
SIGNAL_DURING_IMPORT = """
import os, signal, sys

class SignalWhileImportingTheCli:
    def find_spec(self, name, path=None, target=None):
        if name == "launcher.cli":
            os.kill(os.getpid(), signal.{signal})
            sum(range(10**5))  # Python runs the handler between bytecodes: here, still inside the import
        return None

sys.meta_path.insert(0, SignalWhileImportingTheCli())
sys.argv = ["meshyard", "launch", "job.yaml"]
from launcher.entry import main
sys.exit(main())
"""


@pytest.mark.parametrize("signal_name,code,line", [
    ("SIGINT", 130, "interrupted before the command started: nothing ran"),
    ("SIGTERM", 75, "preempted before the job started: nothing ran; run the same command to start it"),
])
def test_a_signal_while_the_command_line_imports_exits_with_its_code_and_one_line(signal_name, code, line):
    assert 'meshyard = "launcher.entry:main"' in (REPO / "pyproject.toml").read_text()
    result = subprocess.run([sys.executable, "-c", SIGNAL_DURING_IMPORT.replace("{signal}", signal_name)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (code, line + "\n")


SIGINT_IN_A_FINALIZER = """
import os, signal, sys
from launcher.interrupts import LAUNCH_SIGNALS

LAUNCH_SIGNALS.install()

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(10**5))  # the handler runs here, inside the finalizer, where Python cannot propagate it

Finalized()
try:
    LAUNCH_SIGNALS.raise_if_signalled()  # what the launch does before starting anything, and at each poll
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_ctrl_c_a_finalizer_swallowed_is_still_obeyed_and_prints_nothing():
    result = subprocess.run([sys.executable, "-c", SIGINT_IN_A_FINALIZER], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stderr) == (130, "")
