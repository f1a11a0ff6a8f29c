"""A checkpoint's manifest: what files it holds, their sizes and SHA-256, and whether they still match.

At publish rank 0 records every file of the checkpoint directory (recursively:
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
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from launcher.atomic import write_text_atomic
from launcher.errors import UserError

MANIFEST = "manifest.json"
VERDICT = ".verified"  # written after the manifest, never listed in it
DCP_FORMAT = "dcp"
TOKEN_ENV = "MESHYARD_CHECKPOINT_TOKEN"  # one per launch: set at import, so the ranks the launcher starts inherit it
os.environ.setdefault(TOKEN_ENV, secrets.token_hex(8))
VERDICTS_ENV = "MESHYARD_CHECKPOINT_VERDICTS"  # this process's (and its launcher's) verification results
MAX_VERDICTS = 16  # the environment stays small however many checkpoints one process checks


class CheckpointRefused(UserError):
    """A checkpoint this code will not load (damaged, or holding something that would run code);
    the message is one line naming the file."""


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
    problem, _ = verify(path)
    if problem is not None:
        raise CheckpointRefused(problem)


def write_manifest(directory: Path, header: dict[str, Any]) -> dict[str, list[int]]:
    """Hash and fsync every file under `directory`, write the manifest (`header` + files), fsync every
    directory; return each file's [size, mtime_ns] for `stamp_verified`."""
    files: dict[str, dict[str, Any]] = {}
    stats: dict[str, list[int]] = {}
    directories = [directory]
    for path in sorted(directory.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            directories.append(path)
        elif path.is_file() and path.relative_to(directory).as_posix() not in (MANIFEST, VERDICT):
            rel = path.relative_to(directory).as_posix()
            st = path.stat()
            files[rel] = {"size": st.st_size, "sha256": _sha256(path, fsync=True)}
            stats[rel] = [st.st_size, st.st_mtime_ns]
    write_text_atomic(directory / MANIFEST, json.dumps({**header, "files": files}, indent=1), durable=True)
    for each in reversed(directories):
        fsync_dir(each)
    return stats


def stamp_verified(directory: Path, stats: dict[str, list[int]]) -> None:
    """Just hashed: the processes of this launch (restarts, Ray's hand-back of this directory) need
    not hash it again. Best effort: without the stamp they do."""
    manifest_stat = (directory / MANIFEST).stat()
    fingerprint = _fingerprint([manifest_stat.st_size, manifest_stat.st_mtime_ns], dict(stats))
    with contextlib.suppress(OSError):
        write_text_atomic(directory / VERDICT, json.dumps({"token": os.environ[TOKEN_ENV], "fingerprint": fingerprint}))


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


def verify(path: Path) -> tuple[str | None, bool]:
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
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
            and (v[1] is None or isinstance(v[1], str))}


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


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
