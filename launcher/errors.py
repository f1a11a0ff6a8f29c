"""User-facing errors: one line naming the field or file and what is allowed, exit code 2."""
from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_RANK_FAILED = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written, the same command resumes
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C stopped every process of the job

# What a rank raises when another rank of its job died: a consequence, never the root cause.
PEER_LOSS_SIGNS = ("Connection closed by peer", "Connection reset by peer", "remote process exited",
                   "NCCL communicator was aborted")


def lost_a_peer(error: str) -> bool:
    """Whether a rank's error (its headline first) says only that another rank went away."""
    headline = error.splitlines()[0] if error else ""
    return any(sign in headline for sign in PEER_LOSS_SIGNS)


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
    """Some ranks failed. `failures` maps global rank -> a short description of its error (its first
    line the exception, then the traceback's last lines), the root cause first; `logs` is a line
    saying where each rank's full output is (None: the executor keeps it elsewhere, e.g. Ray)."""

    exit_code = EXIT_RANK_FAILED
    LATER_SHOWN = 3  # ranks that failed after the first, one line each; more are counted, not listed

    def __init__(self, message: str, failures: dict[int, str] | None = None, logs: str | None = None) -> None:
        self.failures = failures or {}
        self.logs = logs
        super().__init__(message)

    def report(self) -> list[str]:
        """The console lines under `error: <message>`: a few, whatever the world size."""
        lines = []
        for index, (rank, error) in enumerate(self.failures.items()):
            headline, *trace = error.splitlines() or [""]
            if index == 0 and lost_a_peer(error):
                # every failure seen here is a consequence: the failing rank is on another node, or died unseen
                lines.append(f"  rank {rank} (lost its peer; the rank that failed first is not among these):"
                             f" {headline}")
            elif index == 0:
                lines += [f"  rank {rank} (first to fail): {headline}", *(f"    {line}" for line in trace)]
            elif index <= self.LATER_SHOWN:  # usually a consequence: it lost its peer
                lines.append(f"  rank {rank} (failed after it): {headline}")
        later = list(self.failures)[self.LATER_SHOWN + 1 :]
        if later:
            lines.append(f"  and {len(later)} more rank(s) after it: {', '.join(map(str, later))}")
        if self.logs:
            lines.append(f"  {self.logs}")
        return lines
