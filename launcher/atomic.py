"""Files other processes read while they are being replaced: written whole or not at all."""
from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file of this process's own, then rename it over `path`.

    Readers never see half a file. The temporary name carries the PID because several processes
    may replace the same file at once (the launchers of a multi-node job all write the run's
    spec.json): with a shared name one writer's rename took the other's file away.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
