"""What an executor would do, as data: the dry run that `meshyard plan` prints and tests assert on."""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LaunchRequest:
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)  # set on top of the caller's environment
    files: dict[str, str] = field(default_factory=dict)  # path -> what it is
    marker: str = ""  # a string on every process's command line of this run
    log_dir: str = ""  # where the ranks' error files land
    heartbeat_dir: str = ""  # where the ranks' heartbeat files land
    world_size: int = 1
    hang_timeout_s: float = 300.0  # no progress by any rank for this long = a hang

    def render(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        command = " ".join(shlex.quote(a) for a in self.argv)
        lines = [f"{env} \\\n  {command}" if env else command]
        lines += [f"  file {path}: {role}" for path, role in self.files.items()]
        return "\n".join(lines)
