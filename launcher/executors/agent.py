"""What the launcher's fork does before it becomes torchrun's elastic agent (or `accelerate launch`).

Parent death (Linux prctl PR_SET_PDEATHSIG; a no-op elsewhere):
- the agent gets SIGTERM when the launcher dies, even by SIGKILL: torch elastic's own shutdown then
  sends SIGTERM to every rank (which checkpoints at its next step boundary and exits, as when
  preempted) and SIGKILL to those still alive after --shutdown-timeout;
- every rank the agent starts gets SIGKILL when the agent dies (set between the rank's fork and its
  exec, through a preexec_fn on torch elastic's Popen): an agent killed outright leaves no rank
  training unsupervised.

Quiet about ranks: a failed rank is the launcher's to report (launcher/executors/process.py, from the
ranks' error files), so the agent's own account of it (its log lines about stopping ranks, and the
ChildFailedError table with every rank's traceback) is not printed. A rank that died without a
Python error (a signal: segfault, out-of-memory kill) writes no error file; the agent writes one for
it from the exit status it saw (note_deaths), at each failure (a restart too), so the launcher's
report names that rank.

Loopback stores: torch's TCPStore listens on every interface whatever host name it is given. Here a
store server whose host is a loopback address (the single-node rendezvous at 127.0.0.1, the agent
store that MASTER_ADDR/MASTER_PORT name, torchrun's --local-addr=127.0.0.1) is handed a listening
socket bound to that address (TCPStore's master_listen_fd), so it is reachable from this machine
only. A store on another address (a multi-node rendezvous endpoint) is created as torch does.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from launcher.executors.failures import AGENT_NOTE, TRACE_LINES
from launcher.procs import die_with_parent
from launcher.worker import GLOBAL_RANK_FILE

ELASTIC_CHILDREN = "torch.distributed.elastic.multiprocessing"
STORE_ARGS = ("host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant",
              "master_listen_fd", "use_libuv")


def become_agent(launcher_pid: int) -> None:
    """Called first thing in the fork (in its own session already)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # until torch elastic installs its own handler
    die_with_parent(signal.SIGTERM)
    if os.getppid() != launcher_pid:  # the launcher died before the kernel was told to warn us
        os._exit(1)
    _ranks_die_with_the_agent()
    _loopback_stores()
    _quiet_about_ranks()
    _name_the_dead()


def note_deaths(failures: dict[int, Any], error_files: dict[int, str]) -> None:
    """An error file (torch elastic's format, as the rank's @record writes it, plus the exit code) for
    each failed rank that left none. `failures`: global rank -> ProcessFailure (as the agent's
    RunResult has them); `error_files`: local rank -> where that rank's error file goes."""
    for rank, failure in failures.items():
        error_file = Path(error_files[failure.local_rank])
        if error_file.exists() or not error_file.parent.is_dir():
            continue
        how = (f"killed by signal {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode} without an error report")
        headline = f"{how} (PID {failure.pid})"
        stack = "\n".join([*crash_frames(error_file.parent / "stderr.log"), headline])
        message = {"message": headline, "extraInfo": {"py_callstack": stack, "timestamp": str(int(time.time()))}}
        error_file.write_text(json.dumps({"message": message, AGENT_NOTE: failure.exitcode}))
        (error_file.parent / GLOBAL_RANK_FILE).write_text(str(rank))


def crash_frames(stderr_log: Path, tail_bytes: int = 65536) -> list[str]:
    """The crashed thread's innermost Python frames, outermost first as in a traceback, from the dump
    that faulthandler (enabled by torch's @record in every rank) wrote to the rank's stderr.log on a
    fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL); none for SIGKILL."""
    try:
        with stderr_log.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - tail_bytes))
            text = log.read().decode(errors="replace")
    except OSError:
        return []
    _, found, dump = text.rpartition("Current thread ")
    frames = []
    for line in dump.splitlines()[1:] if found else []:
        if not line.startswith("  File "):
            break
        frames.append(line)
    return frames[:TRACE_LINES][::-1]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_store(*args: Any, **kwargs: Any) -> Any:
    """torch.distributed.TCPStore(...), but a server on a loopback host listens on that address only."""
    from torch.distributed import TCPStore

    call = dict(zip(STORE_ARGS, args), **kwargs)
    if call.get("is_master") and call.get("master_listen_fd") is None and is_loopback(str(call["host_name"])):
        host = "127.0.0.1" if call["host_name"] == "localhost" else str(call["host_name"]).strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, int(call["port"])))
            listener.listen(2048)
        except OSError as exc:  # what TCPStore raises for a port in use: the c10d backend retries as a client
            listener.close()
            raise RuntimeError(f"cannot listen on {host}:{call['port']}: {exc}") from exc
        call["port"] = listener.getsockname()[1]
        call["master_listen_fd"] = listener.detach()  # the store owns (and closes) the socket from here on
    return TCPStore(**call)


def patch_after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run `patch(module)` once module `name` is imported (now, if it already is), without importing it."""
    if name in sys.modules:
        patch(sys.modules[name])
        return
    sys.meta_path.insert(0, _AfterImport(name, patch))


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, self.patch)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, patch: Callable[[ModuleType], None]) -> None:
        self.loader, self.patch = loader, patch

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.patch(module)


def _quiet_about_ranks() -> None:
    """Silence torch elastic's child-process loggers (each module's logger has its own level)."""
    for name in [ELASTIC_CHILDREN, *logging.root.manager.loggerDict]:
        if name.startswith(ELASTIC_CHILDREN):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def _name_the_dead() -> None:
    """note_deaths each time the agent finds failed ranks, before it restarts or stops the group."""
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor = LocalElasticAgent._monitor_workers

    def monitor_and_note(agent: LocalElasticAgent, worker_group: Any) -> Any:
        result = monitor(agent, worker_group)
        if result.state == WorkerState.FAILED and agent._pcontext is not None:
            try:
                note_deaths(result.failures, agent._pcontext.error_files)
            except OSError:  # a full disk: the report then lacks the rank, the agent goes on
                pass
        return result

    LocalElasticAgent._monitor_workers = monitor_and_note  # type: ignore[method-assign]


def _loopback_stores() -> None:
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, static_tcp_rendezvous
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    # Monkeypatches (a function where torch has a class or a method), hence the type: ignores.
    # The rendezvous store (--rdzv-backend=c10d), accelerate's single-node static rendezvous, and the
    # agent store (MASTER_ADDR:MASTER_PORT):
    c10d_rendezvous_backend.TCPStore = loopback_store  # type: ignore[misc, assignment]
    static_tcp_rendezvous.TCPStore = loopback_store  # type: ignore[misc, assignment]
    DynamicRendezvousHandler._create_tcp_store_server = (  # type: ignore[method-assign]
        lambda self, master_addr, master_port: loopback_store(
            host_name=master_addr, port=master_port, is_master=True, multi_tenant=True))


def _ranks_die_with_the_agent() -> None:
    import subprocess

    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    agent = os.getpid()

    def rank_preexec() -> None:  # in the rank, between fork and exec: only a system call and a check
        die_with_parent(signal.SIGKILL)
        if os.getppid() != agent:
            os._exit(1)

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(*args, preexec_fn=rank_preexec, **kwargs)  # type: ignore[call-overload]

    # torch elastic starts each rank with this name (start_new_session=True)
    subprocess_handler.Popen = popen  # type: ignore[misc, assignment]
