"""Files other processes read while they are being replaced: written whole or not at all."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A temporary path of this process's own to write to, renamed over `path` when the block
    completes and removed when it fails, so readers never see half a file.

    The temporary name carries the PID because several processes may replace the same file at once
    (the launchers of a multi-node job all write the run's spec.json): with a shared name one
    writer's rename took the other's file away.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str, durable: bool = False) -> None:
    """`durable`: the file is fsynced before the rename and its directory after it, so the new
    contents survive a power loss once this returns (checkpoint manifests and `latest`)."""
    with atomic_target(path) as tmp:
        with open(tmp, "w") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
