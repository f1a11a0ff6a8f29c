"""Every executor starts CPU ranks with the allocator settings of launcher/allocator.py, as its dry
run shows; a variable the user set wins; CUDA ranks get none. (That the ranks really start with
them, and that glibc then returns freed buffers: tests/distributed/test_memory.py.)"""
from __future__ import annotations

import pytest

from launcher.allocator import CPU_ALLOCATOR_ENV, allocator_env
from launcher.cli import main
from launcher.executors.request import LaunchOptions, LaunchRequest
from launcher.session import prepare
from tests.helpers import make_spec


@pytest.fixture(autouse=True)
def no_user_settings(monkeypatch):
    for name in CPU_ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def rank_allocator_env(request: LaunchRequest) -> dict[str, str]:
    if request.executor == "ray":  # Ray starts its workers with their runtime environment's variables
        return request.settings["RunConfig"]["worker_runtime_env"]["env_vars"]
    return {k: v for k, v in request.env.items() if k.startswith("MALLOC_")}


@pytest.mark.parametrize("executor", ["local", "accelerate", "ray"])
def test_every_executor_gives_cpu_ranks_the_allocator_settings(tmp_path, monkeypatch, executor):
    spec = make_spec(tmp_path, resources={"procs_per_node": 2})
    assert rank_allocator_env(prepare(str(spec), []).dry_run(LaunchOptions(executor=executor))) == CPU_ALLOCATOR_ENV
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "262144")
    mine = rank_allocator_env(prepare(str(spec), []).dry_run(LaunchOptions(executor=executor)))
    assert mine == {**CPU_ALLOCATOR_ENV, "MALLOC_MMAP_THRESHOLD_": "262144"}


def test_plan_says_what_it_set_and_what_it_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    assert main(["plan", str(make_spec(tmp_path, resources={"procs_per_node": 2}))]) == 0
    out = capsys.readouterr().out
    ours = CPU_ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert f"allocator        MALLOC_MMAP_THRESHOLD_={ours} MALLOC_TRIM_THRESHOLD_=65536\n" in out
    assert f"inferred         MALLOC_MMAP_THRESHOLD_={ours} (not set:" in out  # the user's is not "inferred"
    assert f"MALLOC_MMAP_THRESHOLD_={ours} MALLOC_TRIM_THRESHOLD_=65536 " in out  # the rendered command's environment


def test_cuda_ranks_get_no_allocator_settings():
    inferred: list[str] = []
    assert allocator_env("cuda", inferred, environ={}) == {} and inferred == []
    assert allocator_env("cpu", inferred, environ={}) == CPU_ALLOCATOR_ENV and len(inferred) == 1
