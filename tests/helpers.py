"""Shared test helpers: write specs, run the real CLI, train in-process, read results back."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from launcher.export import load_run_model
from launcher.interrupts import PreemptionFlag
from launcher.metrics import read_metrics
from launcher.session import prepare
from launcher.spec import load_spec
from launcher.stragglers import FIELDS as STRAGGLER_FIELDS
from launcher.trainer import train

REPO = Path(__file__).resolve().parents[1]
MESHYARD = str(Path(sys.executable).parent / "meshyard")

BASE_SPEC: dict[str, Any] = {
    "name": "test",
    "seed": 7,
    "model": {"target": "launcher.models:mlp", "kwargs": {"in_dim": 8, "hidden": 16, "out_dim": 1, "depth": 2}},
    "data": {"target": "launcher.data:synthetic_regression", "kwargs": {"n": 480, "in_dim": 8, "out_dim": 1},
             "micro_batch_size": 24, "shuffle": True},
    "loss": "mse",
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "l1": 1.0e-3, "l2": 1.0e-3, "grad_clip": 1.0},
    "schedule": {"warmup_steps": 2, "decay": "cosine"},
    "training": {"max_steps": 10, "grad_accum_steps": 1, "log_every": 1},
    "resources": {"procs_per_node": 1},
}


def make_spec(tmp: Path, name: str = "test", /, **sections: Any) -> Path:
    """BASE_SPEC with `sections` merged in (one level deep), written to `tmp/<name>.yaml`."""
    raw = copy.deepcopy(BASE_SPEC)
    raw["name"] = name
    raw["output"] = {"dir": str(tmp / "runs")}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_dir(spec_path: Path) -> Path:
    spec = load_spec(spec_path)
    return Path(spec.output.dir) / spec.name


def meshyard(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `meshyard` console script from the repository root (`env` on top of ours)."""
    return subprocess.run([MESHYARD, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)


def launch_ok(spec_path: Path, *overrides: str, args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Path:
    """`meshyard launch SPEC --set ... ARGS` must succeed; the run directory."""
    sets = [a for o in overrides for a in ("--set", o)]
    result = meshyard("launch", str(spec_path), *sets, *args, env=env)
    assert result.returncode == 0, f"launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return run_dir(spec_path)


def launch_resumed(spec_path: Path, from_step: int, *overrides: str, args: tuple[str, ...] = ()) -> Path:
    """`meshyard launch` that must resume from step `from_step`'s checkpoint: it says so, and keeps
    the metrics rows up to that step exactly as the earlier launch wrote them (see assert_resumed)."""
    run = run_dir(spec_path)
    before = read_metrics(run)
    sets = [a for o in overrides for a in ("--set", o)]
    result = meshyard("launch", str(spec_path), *sets, *args)
    assert result.returncode == 0, f"launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    checkpoint = run / "checkpoints" / f"step_{from_step:08d}"
    assert f"resumed from {checkpoint} at step {from_step}" in result.stdout, result.stdout[-3000:]
    assert_resumed(run, before, from_step)
    return run


def assert_resumed(run: Path, before: list[dict[str, Any]], from_step: int) -> None:
    """The rows logged up to `from_step` are the earlier launch's, timings included, and the rest
    continue from there: a launch that ignored the checkpoint would have retrained from step 1 and
    rewritten every row (same losses, other timings)."""
    kept = [m for m in before if m["step"] <= from_step]
    after = read_metrics(run)
    assert kept, f"nothing was logged up to step {from_step}: the check would prove nothing"
    assert after[: len(kept)] == kept, "rows before the checkpoint were rewritten: the launch did not resume"
    assert [m["step"] for m in after[len(kept):]] == list(range(kept[-1]["step"] + 1, after[-1]["step"] + 1))


def train_in_process(spec_path: Path, *overrides: str, preemption: PreemptionFlag | None = None) -> Path:
    """A 1-process reference run, in this process (no torchrun, no process group). A `preemption`
    flag already requested stops it as SIGTERM would: at the next vote, with a checkpoint."""
    session = prepare(str(spec_path), list(overrides))
    session.write_spec()  # like a launch, so the run directory is complete (quantize, teachers read it)
    train(session.spec, session.plan, session.run_dir, preemption=preemption)
    return session.run_dir


def final_params(run: Path) -> dict[str, torch.Tensor]:
    """Consolidated model parameters of the run's newest checkpoint, loaded with no process group
    (by `meshyard export`'s own loader; the run directory's spec.json names the model)."""
    return load_run_model(run)[1].state_dict()


def curve(run: Path, key: str = "loss") -> list[float]:
    return [m[key] for m in read_metrics(run)]


def assert_runs_match(reference: Path, run: Path, tol: float,
                      keys: tuple[str, ...] = ("loss", "penalty", "grad_norm", "eval_loss")) -> None:
    """The one parity check of the suite: `run` logged the reference's steps, each curve is within
    `tol` at every step (a key logged by one run must be logged by the other at the same steps),
    the reference trained (the loss fell: equal curves cannot be two flat lines), and the
    consolidated final weights are within `tol`."""
    ref, got = read_metrics(reference), read_metrics(run)
    assert len(ref) > 1 and [m["step"] for m in got] == [m["step"] for m in ref]
    for key in keys:
        pairs = [(a.get(key), b.get(key)) for a, b in zip(ref, got, strict=True)]
        assert all((x is None) == (y is None) for x, y in pairs), f"{key} logged by one run only"
        diffs = [abs(x - y) for x, y in pairs if x is not None]
        assert not diffs or max(diffs) < tol, (key, diffs)
    assert ref[-1]["loss"] < ref[0]["loss"]
    assert max_param_diff(final_params(reference), final_params(run)) < tol


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def start_launch(spec_path: Path, *overrides: str, args: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """`meshyard launch` in the background; stdout/stderr are read with .communicate()."""
    sets = [a for o in overrides for a in ("--set", o)]
    return subprocess.Popen([MESHYARD, "launch", str(spec_path), *sets, *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_ctrl_c_as_in_a_terminal)


def _ctrl_c_as_in_a_terminal() -> None:
    """A shell without job control starts background commands with SIGINT ignored, and the ignore is
    inherited: under `make test &` the Ctrl-C test's SIGINT would never reach the launcher."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_step(run: Path, step: int, timeout: float = 120.0) -> int:
    """Block until rank 0 has logged `step` (or later); return the newest logged step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_metrics(run)
        if records and records[-1]["step"] >= step:
            return records[-1]["step"]
        time.sleep(0.02)
    raise AssertionError(f"{run} never reached step {step}")


# Fields that measure the machine or the process, not the training: never equal between two runs.
NOT_REPRODUCIBLE = ("samples_per_s", "tokens_per_s", "mfu", "step_time_s", "peak_rss_bytes", "rss_before_model_bytes",
                    "cuda_max_allocated_bytes", "cuda_max_reserved_bytes", *STRAGGLER_FIELDS)


def comparable(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without wall-clock and process fields, for exact comparison between runs."""
    return [{k: v for k, v in m.items() if k not in NOT_REPRODUCIBLE} for m in read_metrics(run)]


def params_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reseal(checkpoint: Path) -> None:
    """Rewrite a checkpoint's manifest sizes and hashes for its files as they are now, so a tampered
    file passes the integrity check and what refuses it is the reader itself."""
    import hashlib
    import json

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for rel in manifest["files"]:
        data = (checkpoint / rel).read_bytes()
        manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


class Planted:
    """What a tampered checkpoint could hold: unpickling it calls os.makedirs(path)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.makedirs, (self.path,)
