"""Checkpoints through torch.distributed.checkpoint (DCP), complete or invisible.

Layout of `<run>/checkpoints/`:
    step_00000010/      model + optimizer (DCP shards, or an engine's own files: DeepSpeed writes
                        deepspeed/), rank<r>.pt (step, scheduler, RNG), manifest.json (with the format)
    .partial-step_...   being written; never loaded, removed at the next start
    latest              name of the newest complete checkpoint, swapped atomically

Every rank writes into the partial directory; after a barrier rank 0 writes the manifest and renames
the directory, so a reader either sees a whole checkpoint or none.

Durability and integrity. At publish rank 0 records every file of the directory (recursively:
DeepSpeed writes deepspeed/) with its size and SHA-256 in manifest.json, fsyncs every file, the
manifest and every directory before the rename, and the parent after the rename and after the
`latest` update. Readers (`find_latest`, `Checkpointer.load`, `load_model_weights`,
`check_loadable`) only use a checkpoint whose files match its manifest: a missing file, a size or
a hash mismatch, or a manifest that is not JSON skips that checkpoint with one warning line naming
the file (`find_latest` then takes the next older one), or refuses an explicitly named one with
`CheckpointRefused`. Manifests written before hashes were recorded are checked by size only.

Cost: hashing reads the whole checkpoint once. `meshyard launch` does it in the launcher before
any rank starts (session -> find_latest / compat.check_checkpoint_fits) and hands its verdicts to
the ranks through the environment (MESHYARD_CHECKPOINT_VERDICTS: path -> digest of the sizes and
mtimes it saw, and the problem found); a rank whose files still show those sizes and mtimes takes
the verdict, so ranks stat files but do not hash them. The checkpoints rank 0 publishes carry a
`.verified` stamp (written after the manifest, never listed in it) with this launch's token
(MESHYARD_CHECKPOINT_TOKEN, set at import here, so inherited from the launcher) and the same
digest: restarts within a launch do not hash them either. A new launch (new token),
`meshyard export`/`quantize`, and Ray workers (which do not inherit the launcher's environment)
hash again. The hashes detect damage (a torn copy, bit rot, a truncated shard), not tampering:
whoever can rewrite a shard can rewrite the manifest; what keeps a tampered checkpoint from running
code is launcher.safe_dcp.

`latest` is kept for people and outside tools; readers take the newest verified step directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
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
from strategies.base import DCPStateful, NativeCheckpoint, Strategy

PARTIAL_PREFIX = ".partial-"
MANIFEST = "manifest.json"
LATEST = "latest"
VERDICT = ".verified"  # written after the manifest, never listed in it
DCP_FORMAT = "dcp"
TOKEN_ENV = "MESHYARD_CHECKPOINT_TOKEN"  # one per launch: set at import, so the ranks the launcher starts inherit it
os.environ.setdefault(TOKEN_ENV, secrets.token_hex(8))
VERDICTS_ENV = "MESHYARD_CHECKPOINT_VERDICTS"  # this process's (and its launcher's) verification results
MAX_VERDICTS = 16  # the environment stays small however many checkpoints one process checks


class CheckpointRefused(UserError):
    """A checkpoint this code will not load (damaged, or holding something that would run code);
    the message is one line naming the file."""


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
        problem, fresh = _verify(candidate)
        if problem is None:
            return candidate
        if fresh:  # a verdict this launch's launcher reached was reported there
            (warn or _warn)(f"{problem}; skipped {candidate.name}, an older complete checkpoint is used if there is one")
    if complete:
        raise CheckpointRefused(f"{root}: every complete checkpoint is damaged (see the warnings); repair or remove"
                                " them, or use another name or output.dir")
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    """A complete checkpoint's manifest: step, world_size, format, files. CheckpointRefused if it is
    not a manifest."""
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointRefused(f"{file}: unreadable manifest ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or type(manifest.get("step")) is not int:
        raise CheckpointRefused(f"{file}: not a checkpoint manifest (no integer step)")
    manifest.setdefault("format", DCP_FORMAT)  # written before the format was recorded
    return manifest


def check_intact(path: Path) -> None:
    """CheckpointRefused unless `path`'s files match its manifest (sizes, and SHA-256 where recorded)."""
    problem, _ = _verify(path)
    if problem is not None:
        raise CheckpointRefused(problem)


def check_loadable(path: Path) -> None:
    """What the launcher checks before ranks start: files intact, rank files weights-only, and for
    DCP the metadata and every non-tensor entry readable without running code (launcher.safe_dcp).
    CheckpointRefused (one line naming the file) otherwise."""
    check_intact(path)
    for rank_file in sorted(path.glob("rank*.pt")):
        load_rank_file(rank_file)
    if checkpoint_format(path) == DCP_FORMAT:
        from launcher.safe_dcp import check_dcp

        check_dcp(path)


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


def _expected_files(path: Path, manifest: dict[str, Any]) -> dict[str, tuple[int, str | None]]:
    """relative path -> (size, sha256 or None for manifests written before hashes were recorded)."""
    files = manifest.get("files", {})
    bad = CheckpointRefused(f"{path / MANIFEST}: malformed file list")
    if not isinstance(files, dict):
        raise bad
    expected: dict[str, tuple[int, str | None]] = {}
    for rel, entry in files.items():
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or rel in (MANIFEST, VERDICT):
            raise bad
        if type(entry) is int:
            expected[rel] = (entry, None)
        elif isinstance(entry, dict) and type(entry.get("size")) is int and isinstance(entry.get("sha256"), str):
            expected[rel] = (entry["size"], entry["sha256"])
        else:
            raise bad
    return expected


def _verify(path: Path) -> tuple[str | None, bool]:
    """(the first problem as one line naming the file, or None; whether the verdict was reached now
    rather than handed over by this launch, so that it is reported once)."""
    try:
        expected = _expected_files(path, read_manifest(path))
        manifest_stat = (path / MANIFEST).stat()
    except CheckpointRefused as exc:
        return str(exc), True
    except OSError:
        return f"{path / MANIFEST}: unreadable", True
    stats: dict[str, list[int] | None] = {}
    for rel in expected:
        try:
            st = (path / rel).stat()
            stats[rel] = [st.st_size, st.st_mtime_ns]
        except OSError:
            stats[rel] = None
    fingerprint = _fingerprint([manifest_stat.st_size, manifest_stat.st_mtime_ns], stats)
    key = str(path.resolve())
    verdicts = _inherited_verdicts()
    if key in verdicts and verdicts[key][0] == fingerprint:
        return verdicts[key][1], False
    stamp = _read_stamp(path)
    if stamp == {"token": os.environ[TOKEN_ENV], "fingerprint": fingerprint}:
        return None, False
    problem = _first_problem(path, expected, stats)
    verdicts.pop(key, None)
    verdicts[key] = [fingerprint, problem]
    os.environ[VERDICTS_ENV] = json.dumps(dict(list(verdicts.items())[-MAX_VERDICTS:]))
    return problem, True


def _fingerprint(manifest: list[int], files: dict[str, list[int] | None]) -> str:
    """Sizes and mtimes of a checkpoint's manifest and files, as one short digest."""
    canonical = json.dumps({"manifest": manifest, "files": files}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _inherited_verdicts() -> dict[str, list[Any]]:
    """resolved checkpoint path -> [fingerprint, problem or None], as this process and the launcher
    that started it found them."""
    try:
        verdicts = json.loads(os.environ.get(VERDICTS_ENV, "{}"))
    except ValueError:
        return {}
    if not isinstance(verdicts, dict):
        return {}
    return {k: v for k, v in verdicts.items()
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and (v[1] is None or isinstance(v[1], str))}


def _first_problem(path: Path, expected: dict[str, tuple[int, str | None]],
                   stats: dict[str, list[int] | None]) -> str | None:
    for rel, (size, _) in expected.items():
        stat = stats[rel]
        if stat is None:
            return f"{path / rel}: missing (the manifest lists it)"
        if stat[0] != size:
            return f"{path / rel}: {stat[0]} bytes, the manifest says {size}"
    for rel, (_, digest) in expected.items():
        if digest is None:
            continue
        try:
            actual = _sha256(path / rel)
        except OSError as exc:
            return f"{path / rel}: unreadable ({type(exc).__name__})"
        if actual != digest:
            return f"{path / rel}: contents differ from the manifest's SHA-256"
    return None


def _read_stamp(path: Path) -> Any:
    try:
        return json.loads((path / VERDICT).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _sha256(file: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
        if fsync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    check_intact(checkpoint)
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
        self.shards: NativeCheckpoint = strategy.native_checkpoint or DCPShards(cast(DCPStateful, strategy), async_group)
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
        """Manifest with every file's size and SHA-256, everything fsynced, then the rename (module docstring)."""
        files: dict[str, dict[str, Any]] = {}
        stats: dict[str, list[int]] = {}
        directories = [partial]
        for path in sorted(partial.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                directories.append(path)
            elif path.is_file() and path.relative_to(partial).as_posix() not in (MANIFEST, VERDICT):
                rel = path.relative_to(partial).as_posix()
                st = path.stat()
                files[rel] = {"size": st.st_size, "sha256": _sha256(path, fsync=True)}
                stats[rel] = [st.st_size, st.st_mtime_ns]
        manifest = {"step": step, "world_size": self.world_size, "format": self.shards.format, "files": files}
        write_text_atomic(partial / MANIFEST, json.dumps(manifest, indent=1), durable=True)
        for directory in reversed(directories):
            _fsync_dir(directory)
        if final.exists():  # re-saving the same step (e.g. a resumed run that stops where it resumed)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(self.root)
        write_text_atomic(self.root / LATEST, final.name, durable=True)
        # Just hashed: the processes of this launch (restarts, Ray's hand-back of this directory) need
        # not hash it again. Best effort: without the stamp they do.
        manifest_stat = (final / MANIFEST).stat()
        fingerprint = _fingerprint([manifest_stat.st_size, manifest_stat.st_mtime_ns], dict(stats))
        with contextlib.suppress(OSError):
            write_text_atomic(final / VERDICT, json.dumps({"token": os.environ[TOKEN_ENV], "fingerprint": fingerprint}))
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
