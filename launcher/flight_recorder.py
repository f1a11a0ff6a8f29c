"""torch's Flight Recorder in the hang report: which ranks had not entered the collective the others wait in.

torch records the collectives of every process group in a ring buffer per process, gloo included
(torch 2.13: on by default, TORCH_FR_BUFFER_SIZE entries, default 2000; 0 turns it off). Every
entry carries its group, a sequence number per group, the operation and the tensor sizes; the
status says, per group, the sequence number of the last collective this process entered.

- Each heartbeat carries that status (`entered()`: a ~10 us read, once a second), so the launcher
  knows per group how far every rank got (not a frozen rank: its last beat may predate its last
  collectives, launcher/heartbeat.py leaves it out).
- When the launcher calls a hang it asks the ranks for the whole recorder: a request file their
  heartbeat threads look for (`DumpOnRequest`), answered with `<run>/heartbeats/flight_recorder/
  rank<r>.json` (torch's JSON dump). A frozen rank cannot answer.
- `not_entered()` compares the counts: in a group, the first collective some member entered and
  others had not is the one the others wait in; those others are named.

Without the recorder (TORCH_FR_BUFFER_SIZE=0, a torch without it) beats carry no counts and the
report judges from the ranks' stacks instead (launcher/heartbeat.py).

Imports only the standard library: the heartbeat starts before torch is imported, and this module
reads the recorder only once torch has been imported by the rank.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.atomic import write_text_atomic

C10D = "torch._C._distributed_c10d"
DUMP_DIR = "flight_recorder"
REQUEST = "request"


def _recorder(entries: bool) -> dict[str, Any] | None:
    """torch's JSON dump of this process's recorder (with its entries or only the status); None
    before torch is imported or where it has no recorder."""
    dump = getattr(sys.modules.get(C10D), "_dump_fr_trace_json", None)
    if dump is None:
        return None
    try:
        return json.loads(dump(entries, False))
    except (RuntimeError, TypeError, ValueError):  # never out of the heartbeat thread: its death reads as a hang
        return None


def entered(recorder: dict[str, Any] | None = None) -> dict[str, int]:
    """group name -> sequence number of the last collective this rank entered in it (of `recorder`,
    else read now); empty without a recorder or before the first process group."""
    if recorder is None:
        recorder = _recorder(entries=False)
    try:
        return {name: int(s["last_enqueued_collective"]) for name, s in (recorder or {})["pg_status"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):  # no status, or a format this code does not know
        return {}


class DumpOnRequest:
    """Rank side, polled by the heartbeat thread: writes this rank's recorder when the launcher asks.

    A request is a token in a file; one already there when the rank started is an earlier launch's."""

    def __init__(self, heartbeat_dir: Path, rank: int) -> None:
        self.request = heartbeat_dir / DUMP_DIR / REQUEST
        self.path = heartbeat_dir / DUMP_DIR / f"rank{rank}.json"
        self._answered = _read(self.request)

    def poll(self) -> None:
        token = _read(self.request)
        if token is None or token == self._answered:
            return
        self._answered = token
        recorder = _recorder(entries=True)
        if recorder is not None:
            try:
                write_text_atomic(self.path, json.dumps(recorder))
            except OSError:
                pass  # the report then goes without this rank's dump; its beats still count


def request_dumps(heartbeat_dir: Path, ranks: Iterable[int], wait_s: float) -> dict[int, dict[str, Any]]:
    """Launcher side: ask the ranks for their recorders; rank -> dump, of those that answered within
    `wait_s` (a rank beats once a second; dumping 2000 entries took 0.1-0.3 s here)."""
    folder = heartbeat_dir / DUMP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rank*.json"):
        old.unlink(missing_ok=True)  # an earlier hang's
    write_text_atomic(folder / REQUEST, f"{os.getpid()} {time.time()}")
    expected, deadline = set(ranks), time.monotonic() + wait_s
    try:
        while not expected <= set(dumps := read_dumps(heartbeat_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return dumps
    finally:
        (folder / REQUEST).unlink(missing_ok=True)


def read_dumps(heartbeat_dir: Path) -> dict[int, dict[str, Any]]:
    dumps = {}
    for path in (heartbeat_dir / DUMP_DIR).glob("rank*.json"):
        try:
            dumps[int(path.stem.removeprefix("rank"))] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return dumps


@dataclass(frozen=True)
class Unentered:
    """Collective `seq` of `group`: entered by the ranks `inside`, not (yet) by `missing`."""

    group: str
    seq: int
    inside: tuple[int, ...]
    missing: tuple[int, ...]
    op: str | None  # "gloo:all_reduce [[33]]", from a dump of a rank inside, when there is one

    def describe(self) -> str:
        return f"collective #{self.seq} of group {self.group}" + (f" ({self.op})" if self.op else "")


def not_entered(counts: dict[int, dict[str, int]], dumps: dict[int, dict[str, Any]]) -> list[Unentered]:
    """Per group (ranks that have it are its members), the first collective some members entered and
    others had not; `counts` is rank -> `entered()`, a dump's status overriding its rank's count."""
    counts = {**counts, **{rank: status for rank, dump in dumps.items() if (status := entered(dump))}}
    groups: dict[str, dict[int, int]] = {}
    for rank, entered_by_group in counts.items():
        for group, seq in entered_by_group.items():
            groups.setdefault(group, {})[rank] = seq
    found = []
    for group, seqs in sorted(groups.items()):
        seq = min(seqs.values()) + 1
        inside = tuple(sorted(r for r, s in seqs.items() if s >= seq))
        if inside:
            missing = tuple(sorted(r for r, s in seqs.items() if s < seq))
            op = _op(group, seq, [dumps[r] for r in inside if r in dumps])
            found.append(Unentered(group, seq, inside, missing, op))
    return found


def _op(group: str, seq: int, dumps: list[dict[str, Any]]) -> str | None:
    for dump in dumps:
        for entry in dump.get("entries", []):
            if (entry.get("process_group", [None])[0] == group and entry.get("collective_seq_id") == seq
                    and not entry.get("is_p2p")):
                return f"{entry.get('profiling_name', '?')} {entry.get('input_sizes', '')}".strip()
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
