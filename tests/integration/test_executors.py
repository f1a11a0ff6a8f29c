"""The same spec gives the same numbers through every executor: local (torchrun), accelerate, Ray Train.

One DDP spec (2 workers, accumulation 2) runs once per executor; the local run is the reference.
The Ray run also carries the fault test: a worker SIGKILLed by PID mid-run, FailureConfig
(max_failures=1) restarts the group, and the resumed run must still equal the uninterrupted one.
A second, uninterrupted Ray run must print what the local run printed, line for line.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.heartbeat import read_heartbeats
from launcher.metrics import read_metrics
from launcher.procs import descendants, launch_processes, processes_with_marker
from launcher.session import prepare
from tests.helpers import (
    MESHYARD,
    REPO,
    assert_runs_match,
    free_port,
    launch_ok,
    make_spec,
    meshyard,
    run_dir,
    start_launch,
    wait_for_step,
)

pytestmark = pytest.mark.distributed
TOL = 1e-6
KILL_AFTER_STEP = 6

# ~80 ms of data loading per step, so the Ray test can kill a worker between checkpoints.
PARITY = {
    "data": {"target": "tests.fixtures.faulty:SlowDataset", "micro_batch_size": 4,
             "kwargs": {"n": 96, "in_dim": 8, "out_dim": 1, "delay_s": 0.01}},
    "optimizer": {"name": "adam", "lr": 0.01, "l1": 1.0e-4, "l2": 1.0e-3, "grad_clip": 0.5},
    "training": {"max_steps": 20, "grad_accum_steps": 2, "log_every": 1, "checkpoint_every": 4},
    "strategy": {"name": "ddp"},
    "resources": {"procs_per_node": 2, "max_restarts": 1},
}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference, run with Ray, Accelerate and DeepSpeed unimportable in every process of it; and
    how long its user waited: from starting the command to reading its first step line."""
    tmp = tmp_path_factory.mktemp("local")
    blocked_log = tmp / "blocked_imports.log"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "fixtures" / "no_engines"), str(REPO)]),
           "MESHYARD_BLOCKED_IMPORTS_LOG": str(blocked_log)}
    spec = make_spec(tmp, "parity", **PARITY)
    started, waited, stdout = time.time(), None, []
    with (tmp / "stderr.txt").open("w+") as stderr:  # a file: a full pipe must not stall the launch
        launch = subprocess.Popen([MESHYARD, "launch", str(spec)], cwd=REPO, text=True, env={**os.environ, **env},
                                  stdout=subprocess.PIPE, stderr=stderr)
        assert launch.stdout is not None
        for line in launch.stdout:
            if waited is None and line.startswith("step "):
                waited = time.time() - started
            stdout.append(line)
        launch.wait(timeout=240)
        stderr.seek(0)
        result = subprocess.CompletedProcess(launch.args, launch.returncode, "".join(stdout), stderr.read())
    assert result.returncode == 0, f"launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return run_dir(spec), blocked_log, result, waited


def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_same_numbers(run, reference) -> None:
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 21))
    assert_runs_match(reference, run, TOL)
    assert summary(run)["world_size"] == 2 and summary(run)["steps"] == 20


def test_local_run_imports_no_engine(local_run):
    run, blocked_log, _, _ = local_run
    assert summary(run)["world_size"] == 2
    record = blocked_log.read_text().splitlines()
    assert not [line for line in record if not line.startswith("active ")], record
    assert {"RANK=0", "RANK=1"} <= {line.split()[-1] for line in record}, record  # the blocker ran in both ranks
    assert set(summary(run)["startup_s"]) == {"spawn", "pg_init", "model_build", "data_build", "first_step"}


def test_time_to_first_step_counts_from_the_users_enter(local_run):
    """The printed time to first step (rank 0's startup_s) starts with the launcher's process, so its
    interpreter start and imports (~1.6 s) are in it: it is what the user waited until the step ended,
    which this test saw from outside a moment later (the step line on its way through the pipe)."""
    run, _, _, waited = local_run
    reported = sum(summary(run)["startup_s"].values())
    assert waited is not None and reported <= waited + 0.02, (reported, waited)  # the kernel counts 10 ms ticks
    assert waited - reported < 0.75, (reported, waited)


def test_accelerate_launch_matches_local(tmp_path, local_run):
    spec = make_spec(tmp_path, "parity", **PARITY)
    run = launch_ok(spec, args=("--executor", "accelerate"))
    assert_same_numbers(run, local_run[0])
    assert (run / "accelerate_config.yaml").is_file()


def test_ray_train_matches_local_after_a_worker_is_killed(tmp_path, local_run):
    spec = make_spec(tmp_path, "parity", **PARITY)
    run = run_dir(spec)
    # Ray registers a reported checkpoint at its controller's next poll (2 s): the run stands still in the step after
    # KILL_AFTER_STEP (its first item; 8 per rank and step) until the kill, with the same numbers. The restarted
    # group's items are counted afresh and reach that count only after the release.
    release = tmp_path / "release"
    hold = (f"data.kwargs.hold_file={release}", f"data.kwargs.hold_at_call={8 * KILL_AFTER_STEP + 1}")
    launch = start_launch(spec, *hold, args=("--executor", "ray"))
    try:
        wait_for_step(run, KILL_AFTER_STEP, timeout=180)
        # The embedded Ray (gcs_server, raylet, agents, driver, workers) listens on loopback only.
        listening = listening_sockets({launch.pid} | descendants(launch.pid))
        assert len(listening) >= 5 and not_loopback(listening) == [], not_loopback(listening)
        registered = wait_for_ray_checkpoint(run / "ray" / "parity", timeout=60)
        victim = read_heartbeats(run / "heartbeats")[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        release.touch()
        out, err = launch.communicate(timeout=240)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.communicate()
    assert launch.returncode == 0, (out[-3000:], err[-3000:])
    # The restarted group resumed from a checkpoint at least as new as the one Ray handed back, not from scratch.
    resumed = re.search(r"resumed from (\S+/step_(\d+)) at step (\d+)", out + err)
    assert resumed and int(resumed[2]) == int(resumed[3]) >= registered, resumed
    assert read_heartbeats(run / "heartbeats")[1]["pid"] != victim
    assert_same_numbers(run, local_run[0])
    snapshot = json.loads((run / "ray" / "parity" / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "step_00000020"  # Result.checkpoint
    assert (run / "ray" / "parity" / "step_00000020" / "manifest.json").is_file()
    assert not processes_with_marker(str(run / "spec.json"))


def test_ray_prints_what_a_local_launch_prints(tmp_path, local_run):
    """Each line once, uncoloured, none of Ray's own output (which lands in <run>/logs/ray.log)."""
    local_dir, _, local, _ = local_run
    spec = make_spec(tmp_path, "parity", **PARITY)
    result = meshyard("launch", str(spec), "--executor", "ray", timeout=300)
    run = run_dir(spec)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "\x1b" not in result.stdout + result.stderr
    assert console(result.stdout, run) == console(local.stdout, local_dir)
    assert console(result.stderr, run) == console(local.stderr, local_dir)
    assert len([line for line in result.stdout.splitlines() if line.startswith("step ")]) == 20
    ray_log = (run / "logs" / "ray.log").read_text()
    assert "Started a local Ray instance" in ray_log and "(TrainController pid=" in ray_log, ray_log[-3000:]


def console(text: str, run: Path) -> list[str]:
    """A launch's output lines, with what differs between two launches of one spec put aside: the
    run directory, timings and throughput, and the executor's own command on the `launching` line."""
    lines = []
    for line in text.replace(str(run), "<run>").splitlines():
        if line.startswith("launching ("):
            line = "launching (<executor>): <command>"
        elif line.startswith("time to first step"):
            line = re.sub(r"\d+\.\d+", "N", line)
        lines.append(re.sub(r"\d+(\.\d+)?(?= (s|samples/s|tokens/s|ms/step)\b)", "N", line))
    return lines


def wait_for_ray_checkpoint(storage, timeout: float) -> int:
    """The step of the newest checkpoint Ray's controller has registered (its snapshot file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
            return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    raise AssertionError(f"Ray registered no checkpoint under {storage} within {timeout} s")


def test_two_launchers_form_one_two_node_job(tmp_path):
    spec = make_spec(tmp_path, "twonode", strategy={"name": "ddp"}, resources={"procs_per_node": 2},
                     data={"micro_batch_size": 4}, training={"max_steps": 4, "grad_accum_steps": 2})
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [start_launch(spec, args=("--nnodes", "2", "--node-rank", str(r), "--rdzv-endpoint", endpoint))
             for r in (0, 1)]
    results = finish_all(nodes, timeout=180)
    for node, (_out, _err) in zip(nodes, results):
        assert node.returncode == 0, results
    run = run_dir(spec)
    assert summary(run)["world_size"] == 4 and summary(run)["steps"] == 4
    assert summary(run)["global_batch_size"] == 4 * 2 * 4


def finish_all(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[str, str]]:
    """Every process's (stdout tail, stderr tail); all are killed if any is still running at the deadline,
    so a node that waits for a crashed peer shows the peer's error instead of only its own timeout."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    return [tuple(text[-2000:] for text in p.communicate()) for p in procs]


def test_a_launcher_that_silently_starts_one_process_is_refused(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process on CPU; the rank must refuse to train."""
    session = prepare(str(make_spec(tmp_path, "one", strategy={"name": "ddp"}, resources={"procs_per_node": 2})), [])
    session.write_spec()
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--cpu",
                             "--num_processes", "2", "-m", "launcher.worker", str(session.spec_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "sees WORLD_SIZE=1, but the plan needs 2 processes" in result.stderr
    assert not (session.run_dir / "metrics.jsonl").exists()


# --- Local executor hardening: loopback-only listeners, parent death, one launch per run, own processes only.

# ~0.3 s per step with 2 ranks on 2 busy cores: long enough to look at a running job.
SLOW_LOCAL = {
    "data": {"target": "tests.fixtures.faulty:SlowDataset", "micro_batch_size": 4,
             "kwargs": {"n": 96, "in_dim": 8, "out_dim": 1, "delay_s": 0.05}},
    "strategy": {"name": "ddp"},
    "resources": {"procs_per_node": 2},
    "training": {"max_steps": 3000, "log_every": 1, "checkpoint_every": 5},
}


def test_a_local_run_listens_on_loopback_only_and_stops_when_its_launcher_is_killed(tmp_path):
    spec = make_spec(tmp_path, "guarded", **SLOW_LOCAL)
    run = run_dir(spec)
    launch = start_launch(spec)
    tree: set[int] = set()
    try:
        wait_for_step(run, 3, timeout=120)
        tree = {launch.pid} | descendants(launch.pid)
        listening = listening_sockets(tree)
        # the rendezvous store and the agent store (MASTER_PORT) in the agent, gloo in each rank
        assert len(listening) >= 2, listening
        assert not_loopback(listening) == [], listening
        token = launch_token_of(run)
        assert len(launch_processes(token)) >= 2  # the ranks carry the launch token

        os.kill(launch.pid, signal.SIGKILL)
        launch.wait(timeout=10)  # not communicate(): a surviving agent or rank would hold its pipes open
        deadline = time.monotonic() + 15
        while (alive := [pid for pid in tree - {launch.pid} if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"still running 15 s after the launcher was killed: {alive}"
        assert launch_processes(token) == []
    finally:
        if launch.poll() is None:
            launch.kill()
        for pid in [*launch_processes(str(run / "spec.json")), *(tree - {launch.pid})]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        launch.communicate()
    assert (run / "checkpoints" / "latest").is_file()  # the ranks stopped between checkpoints: resumable


def test_one_launch_per_run_and_cleanup_spares_a_stranger_naming_the_spec(tmp_path):
    steps = 12
    release = tmp_path / "release"
    # The first launch stands still in step 3 (each rank's 9th item; 4 per step) until the second was refused.
    data = {**SLOW_LOCAL["data"], "kwargs": {**SLOW_LOCAL["data"]["kwargs"], "hold_file": str(release),
                                             "hold_at_call": 9}}
    spec = make_spec(tmp_path, "locked", **{**SLOW_LOCAL, "data": data,
                                            "training": {**SLOW_LOCAL["training"], "max_steps": steps}})
    run = run_dir(spec)
    run.mkdir(parents=True)
    # Not ours, but its command line names the run's spec, as a user's `tail -f runs/locked/spec.json` would.
    stranger = subprocess.Popen(["bash", "-c", f'exec -a "tail -f {run / "spec.json"}" sleep 300'])
    first = start_launch(spec)
    try:
        wait_for_step(run, 2, timeout=120)
        before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in (run / ".lock", run / "spec.json")
                  if path.exists()}
        second = meshyard("launch", str(spec), "--set", "training.max_steps=5", timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert first.poll() is None  # still held: the refusal was met while the first launch ran
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"(PID {first.pid})" in lines[0] and "another launch of this run" in lines[0], lines
        assert {name: ((run / name).stat().st_mtime_ns, (run / name).read_bytes()) for name in before} == before
        release.touch()
        out, err = first.communicate(timeout=240)
        assert first.returncode == 0, err[-3000:]
        assert [m["step"] for m in read_metrics(run)] == list(range(1, steps + 1))
        assert stranger.poll() is None, "a finished launch's cleanup killed a process that only named its spec"

        # A cancelled launch of the same run (resumes after step 12, then Ctrl-C) spares it too.
        cancelled = start_launch(spec, f"training.max_steps={steps + 1000}")
        wait_for_step(run, steps + 2, timeout=120)
        cancelled.send_signal(signal.SIGINT)
        cancelled.communicate(timeout=60)
        assert cancelled.returncode == 130
        assert stranger.poll() is None, "a cancelled launch's cleanup killed a process that only named its spec"
        assert launch_processes(str(run / "spec.json")) == []
    finally:
        release.touch()  # a failed assertion must not leave the first launch held
        if first.poll() is None:
            first.send_signal(signal.SIGINT)
            first.communicate(timeout=60)
        stranger.kill()
        stranger.wait()


def launch_token_of(run) -> str:
    return json.loads((run / ".lock").read_text())["token"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def listening_sockets(pids: set[int]) -> list[tuple[str, int]]:
    """(address, pid) of every listening TCP socket (IPv4 and IPv6) held by one of `pids`, from /proc."""
    owners = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[target[8:-1]] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in owners:  # 0A = LISTEN
                    found.append((_address(local), owners[inode]))
    return found


def _address(hex_address: str) -> str:
    """/proc/net/tcp's IP:PORT (each 32-bit word of the address in host byte order) -> 'ip:port'."""
    ip_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(ip_hex)
    ip = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(ip) == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(family, ip)}:{int(port_hex, 16)}"


def not_loopback(listening: list[tuple[str, int]]) -> list[tuple[str, int, str]]:
    """The non-loopback listeners, with their processes' command lines (for the assertion message)."""
    return [(address, pid, _cmdline(pid)) for address, pid in listening if not is_loopback_address(address)]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def is_loopback_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_a_failure_on_a_two_node_job_is_named_by_its_global_rank(tmp_path):
    """Each node's torchrun files errors under local ranks 0 and 1; the report must say rank 3."""
    model = {"target": "tests.fixtures.faulty:model_failing_on_rank",
             "kwargs": {"fail_rank": 3, "in_dim": 8, "hidden": 16, "out_dim": 1}}
    spec = make_spec(tmp_path, "twonode_fail", model=model, strategy={"name": "ddp"},
                     resources={"procs_per_node": 2}, data={"micro_batch_size": 4}, training={"max_steps": 4})
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [start_launch(spec, args=("--nnodes", "2", "--node-rank", str(r), "--rdzv-endpoint", endpoint))
             for r in (0, 1)]
    results = finish_all(nodes, timeout=180)
    first = [line for _out, err in results for line in err.splitlines() if "(first to fail)" in line]
    assert first and all(line.startswith("  rank 3 (first to fail): ") for line in first), results
