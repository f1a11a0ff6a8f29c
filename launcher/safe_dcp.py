"""Reading torch.distributed.checkpoint (DCP) directories without running code from them.

torch 2.13's `FileSystemReader.read_metadata()` unpickles `.metadata` with plain `pickle.load`,
and `DefaultLoadPlanner.load_bytes` reads every non-tensor entry of the `.distcp` files (optimizer
`param_groups`, any BYTES item) with `torch.load(weights_only=False)`: a tampered checkpoint ran
its payload in whatever process loaded it. Here

- `.metadata` goes through `RestrictedUnpickler`, which resolves only DCP's own metadata classes
  (torch.distributed.checkpoint.metadata.*, filesystem._StorageInfo), torch.Size, torch dtypes and
  layouts, pathlib's POSIX paths, collections.OrderedDict and the plain builtin containers; any
  other global is refused before anything is called. The result must be a `Metadata` whose
  storage entries name plain files inside the checkpoint directory with no stream transforms.
- every non-tensor entry is read with `torch.load(weights_only=True)` (`SafeLoadPlanner`); tensor
  entries already are (FileSystemReader.read_data). `SafeFileSystemReader.read_data` refuses to
  run with any other planner, so the unsafe default cannot come back by omission.

`load_dcp` checks the metadata and every non-tensor entry before `dcp.load` starts, so a refusal
is one `CheckpointRefused` line naming the file on every rank (inside `dcp.load` the same error
would come back wrapped in DCP's multi-rank exception). Importing this module imports DCP (~0.6 s);
launcher.checkpoint imports it at the first load.
"""
from __future__ import annotations

import collections
import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from launcher.manifest import CheckpointRefused

_METADATA_CLASSES = (
    dcp_metadata.Metadata, dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta, dcp_metadata.TensorStorageMetadata,
    dcp_metadata.BytesStorageMetadata, dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties,
    dcp_metadata._MEM_FORMAT_ENCODING, _StorageInfo,
)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {(cls.__module__, cls.__qualname__): cls for cls in _METADATA_CLASSES}
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a name -> torch.layout lookup
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for path_class in (pathlib.PosixPath, pathlib.PurePosixPath):  # StorageMeta.checkpoint_id
        allowed[("pathlib", path_class.__name__)] = path_class
        allowed[(path_class.__module__, path_class.__name__)] = path_class
    for container in (dict, list, tuple, set, frozenset):
        allowed[("builtins", container.__name__)] = container
    for name, value in vars(torch).items():  # torch.float32, torch.strided, torch.contiguous_format, ...
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any global outside `_allowed_globals()` raises CheckpointRefused."""

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file)
        self.source = source
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise CheckpointRefused(f"{self.source}: refused to load: its pickle names {module}.{name}, which DCP"
                                    " metadata never holds (checkpoints are read without running code from them)"
                                    ) from None


def read_metadata_file(path: Path) -> dcp_metadata.Metadata:
    """A `.metadata` file through `RestrictedUnpickler`, checked to be DCP metadata of plain local files."""
    try:
        with open(path, "rb") as file:
            metadata = RestrictedUnpickler(file, path).load()
    except CheckpointRefused:
        raise
    except FileNotFoundError:
        raise CheckpointRefused(f"{path}: missing (not a DCP checkpoint)") from None
    except Exception as exc:  # a damaged pickle fails in many ways: EOFError, UnpicklingError, TypeError, ...
        raise CheckpointRefused(f"{path}: unreadable DCP metadata ({type(exc).__name__}: {_one_line(exc)})") from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointRefused(f"{path}: not DCP metadata (holds {type(metadata).__name__})")
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(key, str) or not (isinstance(meta, dcp_metadata.BytesStorageMetadata) or (
                isinstance(meta, dcp_metadata.TensorStorageMetadata) and isinstance(meta.size, torch.Size))):
            raise CheckpointRefused(f"{path}: not DCP metadata (entry {key!r} is {type(meta).__name__})")
    storage = metadata.storage_data
    if not isinstance(storage, dict) or not all(isinstance(key, dcp_metadata.MetadataIndex) for key in storage):
        raise CheckpointRefused(f"{path}: not DCP metadata (no storage table)")
    for info in storage.values():
        where = getattr(info, "relative_path", None)
        if (not isinstance(info, _StorageInfo) or not _plain_file_name(where) or info.transform_descriptors
                or not all(type(getattr(info, n, None)) is int and getattr(info, n) >= 0
                           for n in ("offset", "length"))):
            raise CheckpointRefused(f"{path}: refused to load: a storage entry points at {where!r}"
                                    " (entries must be plain files of the checkpoint directory, untransformed)")
    if metadata.storage_meta is None:
        metadata.storage_meta = dcp_metadata.StorageMeta()
    if not isinstance(metadata.storage_meta, dcp_metadata.StorageMeta):
        raise CheckpointRefused(f"{path}: not DCP metadata (storage_meta is {type(metadata.storage_meta).__name__})")
    return metadata


def _plain_file_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def load_bytes_entry(data: io.BytesIO, where: str) -> Any:
    """One non-tensor entry, with torch.load(weights_only=True); CheckpointRefused names `where`."""
    try:
        return torch.load(data, weights_only=True)
    except pickle.UnpicklingError:
        data.seek(0)
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(data)
        except Exception:
            names = []
        raise CheckpointRefused(f"{where}: refused to load: it holds {', '.join(names) or 'a non-tensor object'}"
                                " (non-tensor entries are read with weights_only=True)") from None
    except Exception as exc:
        raise CheckpointRefused(f"{where}: unreadable ({type(exc).__name__}: {_one_line(exc)})") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries are read with weights_only=True."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__()
        self.checkpoint = checkpoint

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        loaded = load_bytes_entry(value, f"{_entry_file(self.checkpoint, self.metadata, read_item)} (entry {fqn})")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def _entry_file(checkpoint: Path, metadata: Any, read_item: ReadItem) -> Path:
    info = getattr(metadata, "storage_data", {}).get(read_item.storage_index)
    return checkpoint / info.relative_path if isinstance(info, _StorageInfo) else checkpoint


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader over a local checkpoint directory that never unpickles code (module docstring)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.directory = Path(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_metadata_file(Path(self._get_metadata_path(kwargs.get("rank"))))
        assert metadata.storage_meta is not None  # read_metadata_file fills it in
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if not isinstance(planner, SafeLoadPlanner):
            raise TypeError(f"SafeFileSystemReader needs a SafeLoadPlanner, not {type(planner).__name__}: other"
                            " planners read non-tensor entries with torch.load(weights_only=False)")
        return super().read_data(plan, planner)


def check_dcp(checkpoint: Path) -> dcp_metadata.Metadata:
    """Read `checkpoint`'s metadata and every non-tensor entry the safe way; its metadata.

    Cheap: non-tensor entries are scalars and small lists (param_groups), read by offset."""
    metadata = read_metadata_file(checkpoint / ".metadata")
    by_file: dict[str, list[tuple[str, _StorageInfo]]] = {}
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), dcp_metadata.BytesStorageMetadata):
            by_file.setdefault(info.relative_path, []).append((index.fqn, info))
    for name, entries in by_file.items():
        path = checkpoint / name
        try:
            with open(path, "rb") as file:
                for fqn, info in entries:
                    file.seek(info.offset)
                    data = file.read(info.length)
                    if len(data) != info.length:
                        raise CheckpointRefused(f"{path}: shorter than its metadata says (entry {fqn})")
                    load_bytes_entry(io.BytesIO(data), f"{path} (entry {fqn})")
        except OSError as exc:
            raise CheckpointRefused(f"{path}: unreadable ({type(exc).__name__}: {_one_line(exc)})") from None
    return metadata


def load_dcp(state: dict[str, Any], checkpoint: Path) -> None:
    """dcp.load into `state` (in place, as dcp.load does), after `check_dcp`, through the safe reader
    and planner. Call on every rank, like dcp.load."""
    check_dcp(checkpoint)
    dcp.load(state, storage_reader=SafeFileSystemReader(checkpoint), planner=SafeLoadPlanner(checkpoint))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else ""
