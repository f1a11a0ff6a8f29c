"""Run an executor's `python -m MODULE ARGS` command in a fork of the launcher.

The launcher has already imported torch (to plan and to check the spec's targets), so a fork
skips one interpreter start and one torch import (~2 s on 2 cores) before torchrun or
`accelerate launch` even begins: that was most of meshyard's start-up overhead over the bare
command. The child behaves as the printed command would: its own session (so the whole tree can
be torn down), the request's environment on top of ours, `sys.argv` as the module expects, and
its exit status as the command's. Two things the printed command alone would not do are added
(launcher/executors/agent.py): the agent and its ranks stop when the launcher dies, and a store on
a loopback address listens on loopback only.
"""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
import time
import traceback
import warnings

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


class ForkedCommand:
    """A Popen-like handle (pid, poll, wait) on `argv` = (python, "-m", module, *args) run in a fork."""

    def __init__(self, argv: tuple[str, ...], env: dict[str, str]) -> None:
        if len(argv) < 3 or argv[1] != "-m":
            raise ValueError(f"not a `python -m` command: {argv[:3]}")
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode: int | None = None
        launcher = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            os._exit(_run_module(argv[2], list(argv[3:]), env, launcher))

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.05)
        return code


def _run_module(module: str, args: list[str], env: dict[str, str], launcher: int) -> int:
    code = 1
    try:
        os.setsid()
        from launcher.executors.agent import become_agent

        become_agent(launcher)
        os.environ.update(env)
        sys.argv = [module, *args]
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except ChildFailedError:  # ranks failed: the launcher reports them from their error files, not this table
        pass
    except SignalException as exc:  # torch elastic's agent was told to stop (by the launcher): no traceback
        code = 128 + int(exc.sigval)
    except BaseException as exc:  # what the interpreter would print for an uncaught exception
        if os.getppid() != launcher:  # stopped by its parent-death signal: the launcher is gone, say so once
            print(f"meshyard: the launcher (PID {launcher}) died; the job was stopped ({exc})", file=sys.stderr)
        else:
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code
