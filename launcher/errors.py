"""User-facing errors: one line naming the field or file and what is allowed, exit code 2."""
from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_RANK_FAILED = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written, the same command resumes
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C stopped every process of the job


class UserError(Exception):
    """Bad input from the user. The CLI prints `error: <message>` and exits 2, no traceback."""

    exit_code = EXIT_USER_ERROR


class SpecError(UserError):
    """A job spec field is malformed. `path` is the dotted field path (e.g. `optimizer.lr`)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class PlanError(UserError):
    """The spec is well formed but cannot be mapped onto the requested processes and mesh."""


class LaunchError(Exception):
    """Some ranks failed. `failures` maps global rank -> a short description of its error; `logs`
    says where each rank's full output is (None: the executor keeps it elsewhere, e.g. Ray)."""

    exit_code = EXIT_RANK_FAILED

    def __init__(self, message: str, failures: dict[int, str] | None = None, logs: str | None = None) -> None:
        self.failures = failures or {}
        self.logs = logs
        super().__init__(message)
