"""`meshyard submit` and `meshyard jobs` against a real Ray head started by this module.

The head binds 127.0.0.1, pins every port it opens, has its own temp dir and its own auth token
(token authentication on), and is stopped by its own PIDs: never `ray stop`, which would kill
every Ray on the machine.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from launcher.heartbeat import read_heartbeats
from tests.helpers import REPO, free_port, make_spec, meshyard, run_dir, wait_for_step

pytestmark = pytest.mark.distributed
VENV_BIN = Path(sys.executable).parent


def descendants(pid: int) -> list[int]:
    """pid and every process below it (Linux /proc), so the head's workers and job drivers are found too."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="myray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}  # the job's `python` is this venv's
    ports = [free_port() for _ in range(9)]
    worker_ports = ",".join(str(free_port()) for _ in range(24))
    argv = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ports[0]}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={ports[1]}",
            f"--dashboard-agent-grpc-port={ports[2]}", f"--ray-client-server-port={ports[3]}",
            f"--node-manager-port={ports[4]}", f"--object-manager-port={ports[5]}",
            f"--runtime-env-agent-port={ports[6]}", f"--metrics-export-port={ports[7]}",
            f"--worker-port-list={worker_ports}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                request = urllib.request.Request(f"{address}/api/version",
                                                 headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
                urllib.request.urlopen(request, timeout=2)
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, (Path(temp_dir) / "head.log").read_text()
                time.sleep(1)
        yield address, env
    finally:
        tree = descendants(head.pid)
        signal_all(tree, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while any(Path(f"/proc/{p}").exists() for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        signal_all(descendants(head.pid) + tree, signal.SIGKILL)  # some Ray processes ignore SIGTERM for a while
        head.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submitted_id(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout.split("submitted ")[1].split(":")[0]


def wait_status(address: str, env: dict, job_id: str, wanted: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = meshyard("jobs", "status", job_id, "--address", address, env=env).stdout.strip()
        if state in wanted or time.monotonic() > deadline:
            return state
        time.sleep(1)


def test_submit_follow_logs_and_succeed(tmp_path, ray_head):
    address, env = ray_head
    spec = make_spec(tmp_path, "job", strategy={"name": "ddp"}, resources={"procs_per_node": 2},
                     data={"micro_batch_size": 4}, training={"grad_accum_steps": 2, "max_steps": 6})
    job_id = submitted_id(meshyard("submit", str(spec), "--address", address, "--working-dir", str(tmp_path), env=env))
    logs = meshyard("jobs", "logs", job_id, "--follow", "--address", address, env=env, timeout=300)
    assert logs.returncode == 0, logs.stderr[-2000:]
    assert "done: 6/6 steps" in logs.stdout
    assert meshyard("jobs", "status", job_id, "--address", address, env=env).stdout.strip() == "SUCCEEDED"
    assert job_id in meshyard("jobs", "list", "--address", address, env=env).stdout
    assert (run_dir(spec) / "checkpoints" / "step_00000006" / "manifest.json").is_file()


def test_a_long_job_is_stopped(tmp_path, ray_head):
    address, env = ray_head
    # User code travels in the packaged working directory: the slow dataset is a module there.
    shutil.copy(REPO / "tests" / "fixtures" / "faulty.py", tmp_path / "slowdata.py")
    spec = make_spec(tmp_path, "long", strategy={"name": "ddp"}, resources={"procs_per_node": 2},
                     data={"target": "slowdata:SlowDataset",
                           "kwargs": {"n": 96, "in_dim": 8, "out_dim": 1, "delay_s": 0.05}},
                     training={"max_steps": 100000})
    job_id = submitted_id(meshyard("submit", str(spec), "--address", address, "--working-dir", str(tmp_path), env=env))
    assert wait_status(address, env, job_id, {"RUNNING"}) == "RUNNING"
    wait_for_step(run_dir(spec), 1, timeout=180)  # training has started on the Ray workers
    stopped = meshyard("jobs", "stop", job_id, "--address", address, env=env)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout
    assert wait_status(address, env, job_id, {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
    ranks = [beat["pid"] for beat in read_heartbeats(run_dir(spec) / "heartbeats").values()]
    assert len(ranks) == 2
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks)  # the training workers are gone too


def test_a_bad_address_is_one_line():
    result = meshyard("jobs", "list", "--address", f"http://127.0.0.1:{free_port()}", env={"RAY_AUTH_MODE": "token"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot reach a Ray job API there" in result.stderr
