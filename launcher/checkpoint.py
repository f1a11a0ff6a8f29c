"""Checkpoints through torch.distributed.checkpoint (DCP), complete or invisible.

Layout of `<run>/checkpoints/`:
    step_00000010/      model + optimizer (DCP shards, or an engine's own files: DeepSpeed writes
                        deepspeed/), rank<r>.pt (step, scheduler, RNG), manifest.json (with the format)
    .partial-step_...   being written; never loaded, removed at the next start
    latest              name of the newest complete checkpoint, swapped atomically

Every rank writes into the partial directory; after a barrier rank 0 writes the manifest and renames
the directory, so a reader either sees a whole checkpoint or none.

Durability and integrity (manifests with sizes and SHA-256, fsync, verification and its cost) are
launcher/manifest.py's job; readers here only use checkpoints it finds intact.

`latest` is kept for people and outside tools; readers take the newest verified step directory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import torch
import torch.distributed as dist

from launcher.atomic import write_text_atomic
from launcher.errors import UserError
from launcher.manifest import (
    DCP_FORMAT,
    MANIFEST,
    CheckpointRefused,
    check_intact,
    fsync_dir,
    read_manifest,
    stamp_verified,
    verify,
    write_manifest,
)
from strategies.base import DCPStateful, NativeCheckpoint, Strategy

PARTIAL_PREFIX = ".partial-"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def find_latest(root: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint whose files match its manifest (highest step first); a
    damaged one is skipped with one warning line (`warn`, default: stderr) naming the file. None if
    there is no complete checkpoint; CheckpointRefused if there are some but every one is damaged
    (starting over would silently drop the run's progress, and the next save of that step its files)."""
    if not root.is_dir():
        return None
    complete = sorted((p for p in root.glob("step_*") if p.is_dir() and is_complete(p)), reverse=True)
    for candidate in complete:
        problem, fresh = verify(candidate)
        if problem is None:
            return candidate
        if fresh:  # a verdict this launch's launcher reached was reported there
            (warn or _warn)(f"{problem}; skipped {candidate.name},"
                            " an older complete checkpoint is used if there is one")
    if complete:
        raise CheckpointRefused(f"{root}: every complete checkpoint is damaged (see the warnings); repair or remove"
                                " them, or use another name or output.dir")
    return None


def check_loadable(path: Path) -> None:
    """What the launcher checks before ranks start: files intact, rank files weights-only, for DCP
    the metadata and every non-tensor entry readable without running code (launcher.safe_dcp), for
    DeepSpeed no class in any file's pickle beyond its three data classes. CheckpointRefused (one
    line naming the file) otherwise."""
    check_intact(path)
    for rank_file in sorted(path.glob("rank*.pt")):
        load_rank_file(rank_file)
    if checkpoint_format(path) == DCP_FORMAT:
        from launcher.safe_dcp import check_dcp

        check_dcp(path)
    else:
        from strategies.deepspeed_checkpoint import UnreadableCheckpoint, check_pickled_globals

        for engine_file in sorted(path.rglob("*.pt")):
            try:
                check_pickled_globals(engine_file)
            except UnreadableCheckpoint as exc:
                raise CheckpointRefused(str(exc)) from None


def load_rank_file(path: Path) -> dict[str, Any]:
    """A rank<r>.pt (step, scheduler, RNG) with weights_only=True; CheckpointRefused names the file."""
    import pickle

    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointRefused(f"{path}: refused to load: it holds something other than tensors and plain data"
                                " (rank files are read with weights_only=True)") from None
    except Exception as exc:
        raise CheckpointRefused(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointRefused(f"{path}: not a rank state (holds {type(state).__name__})")
    return state


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def checkpoint_format(path: Path) -> str:
    return read_manifest(path)["format"]


def load_model_weights(model: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    """Fill a plain module with a checkpoint's (possibly sharded) model weights; any world size,
    with or without a process group. CheckpointRefused if the checkpoint is damaged or unsafe."""
    check_intact(checkpoint)
    if checkpoint_format(checkpoint) == "deepspeed":
        from strategies.deepspeed_checkpoint import UnreadableCheckpoint, consolidated_state_dict

        try:
            model.load_state_dict(consolidated_state_dict(checkpoint))
        except UnreadableCheckpoint as exc:
            raise UserError(str(exc)) from None
        return model
    state = {"model": model.state_dict()}
    with _single_process_ok():
        _safe_dcp().load_dcp(state, checkpoint)
    model.load_state_dict(state["model"])
    return model


class DCPShards:
    """The default checkpoint format: torch.distributed.checkpoint over the strategy's state_dict()."""

    format = DCP_FORMAT

    def __init__(self, strategy: DCPStateful, async_group: Any = None) -> None:
        self.strategy, self.async_group = strategy, async_group

    def save(self, path: Path) -> None:
        with _single_process_ok():
            _dcp().save(self.strategy.state_dict(), checkpoint_id=path)

    def save_async(self, path: Path) -> Any:
        """Stage the state in memory and write it in the background; returns a future."""
        with _single_process_ok():
            return _dcp().async_save(self.strategy.state_dict(), checkpoint_id=path, process_group=self.async_group,
                                  no_dist=not dist.is_initialized())

    def load(self, path: Path) -> None:
        state = self.strategy.state_dict()
        with _single_process_ok():
            _safe_dcp().load_dcp(state, path)  # never unpickles code (launcher.safe_dcp)
        self.strategy.load_state_dict(state)


class Checkpointer:
    """Saves and loads one run's checkpoints; every rank holds one and calls it at the same points."""

    def __init__(self, root: Path, keep: int, rank: int, world_size: int, barrier: Callable[[], None],
                 strategy: Strategy, async_save: bool = False,
                 on_published: Callable[[int, Path], None] | None = None) -> None:
        self.root, self.keep, self.rank, self.world_size, self.barrier = root, keep, rank, world_size, barrier
        self.async_save = async_save
        self.on_published = on_published  # called on every rank with (step, directory) once a checkpoint is complete
        # async_save's collectives must not share the training group (FACTS: "collective mismatch").
        async_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self.shards: NativeCheckpoint = (strategy.native_checkpoint
                                         or DCPShards(cast(DCPStateful, strategy), async_group))
        self._pending: tuple[Any, Path, Path, int] | None = None

    def remove_partials(self) -> None:
        """Drop directories left by an interrupted save. Call before any rank starts saving."""
        if self.rank == 0 and self.root.is_dir():
            for partial in self.root.glob(PARTIAL_PREFIX + "*"):
                shutil.rmtree(partial, ignore_errors=True)
        self.barrier()

    def save(self, step: int, rank_state: dict[str, Any]) -> Path:
        """Write checkpoint `step`. With async_save it is published later, by wait() or the next save."""
        self.wait()
        final = self.root / step_dir_name(step)
        partial = self.root / (PARTIAL_PREFIX + final.name)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.barrier()
        torch.save(rank_state, partial / f"rank{self.rank}.pt")
        if self.async_save and isinstance(self.shards, DCPShards):  # the plan allows async saves only with DCP
            self._pending = (self.shards.save_async(partial), partial, final, step)
            return final
        self.shards.save(partial)
        self._finish(partial, final, step)
        return final

    def wait(self) -> None:
        """Finish (and publish) an async save still in flight. Call before exit."""
        if self._pending is None:
            return
        future, partial, final, step = self._pending
        self._pending = None
        future.result()
        self._finish(partial, final, step)

    def _finish(self, partial: Path, final: Path, step: int) -> None:
        self.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            self._publish(partial, final, step)
        self.barrier()
        if self.on_published is not None:
            self.on_published(step, final)

    def load(self, path: Path) -> dict[str, Any]:
        """Restore the strategy's model and optimizer from `path`; return this rank's own extra state
        (RNG, scheduler). CheckpointRefused (one line naming the file) if its files do not match
        its manifest or it holds anything that would run code when read."""
        check_intact(path)  # sizes and mtimes only when this launch's launcher has hashed it
        self.shards.load(path)
        own = path / f"rank{self.rank}.pt"
        # A checkpoint from a different world size has no file for new ranks: take rank 0's
        # step and schedule (identical on every rank); only the RNG stream then differs.
        return load_rank_file(own if own.is_file() else path / "rank0.pt")

    def _publish(self, partial: Path, final: Path, step: int) -> None:
        """Manifest (every file's size and SHA-256, all fsynced), the rename, then `latest`."""
        stats = write_manifest(partial, {"step": step, "world_size": self.world_size, "format": self.shards.format})
        if final.exists():  # re-saving the same step (e.g. a resumed run that stops where it resumed)
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync_dir(self.root)
        write_text_atomic(self.root / LATEST, final.name, durable=True)
        stamp_verified(final, stats)
        self._prune()

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if is_complete(p))
        for old in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)


def _safe_dcp() -> ModuleType:
    """launcher.safe_dcp, imported at the first load (it imports DCP, see _dcp)."""
    from launcher import safe_dcp

    return safe_dcp


def _dcp() -> ModuleType:
    """torch.distributed.checkpoint, imported at the first save or load: it pulls in DTensor, about
    0.6 s per rank that would otherwise delay every job's first step."""
    import torch.distributed.checkpoint as dcp

    return dcp



@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns that it assumes one process when no group exists; for `single` that is the intent."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
