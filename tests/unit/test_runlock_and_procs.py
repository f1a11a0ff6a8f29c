"""The run lock, the launch-token process finder and the loopback-bound store, without starting a job."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from launcher.errors import UserError
from launcher.executors.agent import is_loopback, loopback_store
from launcher.procs import LAUNCH_TOKEN_ENV, launch_processes, worker_pids
from launcher.runlock import hold_run, holders
from tests.integration.test_executors import is_loopback_address, listening_sockets


def test_a_held_run_refuses_a_second_holder_in_one_line_naming_the_pid(tmp_path):
    run = tmp_path / "runs" / "x"
    with hold_run(run) as holder:
        assert holder["pid"] == os.getpid() and os.environ[LAUNCH_TOKEN_ENV] == holder["token"]
        with pytest.raises(UserError) as refused:
            with hold_run(run):
                pass
        message = str(refused.value)
        assert "\n" not in message and f"(PID {os.getpid()})" in message and "another launch of this run" in message
        assert holders(run) == [holder]
        (run / "spec.json").write_text("{}")
    with hold_run(run):  # released on exit
        pass
    assert (run / ".lock").is_file()


def test_a_refused_launch_leaves_no_directory_it_created(tmp_path):
    with pytest.raises(UserError):
        with hold_run(tmp_path / "runs" / "x"):
            raise UserError("a check refused the launch")
    assert not (tmp_path / "runs").exists()


def test_processes_are_found_by_token_and_descent_not_by_command_line(tmp_path):
    token = "t" + os.urandom(8).hex()
    spec = str(tmp_path / "spec.json")
    env = {**os.environ, LAUNCH_TOKEN_ENV: token, "RANK": "0", "LOCAL_RANK": "0"}
    # A "rank" with a child of its own (as a data loader worker would be): same RANK, same token.
    rank = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time;"
                             " subprocess.Popen(['sleep', '60']); time.sleep(60)", spec], env=env)
    stranger = subprocess.Popen(["sleep", "60", spec])  # names the spec, carries no token
    try:
        deadline = time.monotonic() + 10
        while len(launch_processes(token, os.getpid())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = launch_processes(token, os.getpid())
        assert rank.pid in found and stranger.pid not in found and len(found) == 2
        assert launch_processes(token, root=rank.pid) == [p for p in found if p != rank.pid]  # its child only
        assert worker_pids(token) == {0: rank.pid}
        assert launch_processes(spec) == []  # a path is resolved through the run's lock files, never matched
    finally:
        for pid in launch_processes(token, os.getpid()):
            os.kill(pid, 9)
        for proc in (rank, stranger):
            proc.kill()
            proc.wait()


def test_a_store_on_a_loopback_host_listens_on_loopback_only():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("10.0.0.1") and not is_loopback("node-0")
    store = loopback_store("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    store.set("k", "v")
    listening = [address for address, _ in listening_sockets({os.getpid()})
                 if address.endswith(f":{store.port}")]
    assert listening == [f"127.0.0.1:{store.port}"] and all(map(is_loopback_address, listening))
