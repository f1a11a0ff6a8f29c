"""Per-rank entry point of torchrun and `accelerate launch`, with torchrun's environment contract
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and the resolved spec as a JSON file:

    python -m launcher.worker <run_dir>/spec.json [node=R]

`node=R` only marks the processes of node R's launcher (several launchers on one machine).

This module imports only the standard library and two small meshyard modules: the preemption flag
and the heartbeat start before torch is imported (~2 s), so a SIGTERM relayed during start-up is a
preemption, not a death, and a rank stopped during start-up is seen by the launcher's hang watch.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import cast

from launcher.heartbeat import Heartbeat
from launcher.interrupts import PreemptionFlag


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or (len(args) == 2 and not args[1].startswith("node=")):
        raise SystemExit("usage: python -m launcher.worker RUN_DIR/spec.json [node=R]")
    spec_path = Path(args[0])
    preemption = PreemptionFlag().install()
    _name_the_error_file()
    heartbeat = Heartbeat(spec_path.parent, int(os.environ.get("RANK", 0))).start()
    try:
        from torch.distributed.elastic.multiprocessing.errors import record

        from launcher.rank import format_summary, run_rank
        from launcher.startup import StartupClock

        # record: writes this rank's exception to torchrun's error file, so the launcher can report it
        summary = record(run_rank)(spec_path, StartupClock(), preemption=preemption, heartbeat=heartbeat)
    finally:
        heartbeat.stop()
    if int(os.environ.get("RANK", 0)) == 0:
        print(format_summary(cast(dict, summary)), flush=True)  # record() is typed as maybe returning None
    # The run is complete and on disk (checkpoint, metrics, summary). Skip the interpreter's teardown: in
    # about 1 launch of 100 a rank aborted in it ("terminate called without an active exception", a C++
    # destructor at exit, no Python frame) and turned a finished job into a failed one. Cause not found.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


GLOBAL_RANK_FILE = "global_rank"


def _name_the_error_file() -> None:
    """torchrun files a rank's error under its LOCAL rank (<log-dir>/.../attempt_N/<local_rank>/
    error.json); on several nodes that number repeats. The global rank goes next to it."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        Path(error_file).parent.mkdir(parents=True, exist_ok=True)
        (Path(error_file).parent / GLOBAL_RANK_FILE).write_text(os.environ.get("RANK", "0"))


if __name__ == "__main__":
    main()
