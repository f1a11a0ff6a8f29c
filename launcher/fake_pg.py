"""One process plays any rank of any world size: torch's fake process-group backend.

A fake process group accepts every collective and returns without moving data (results keep their
shapes, not their values), so DeviceMesh, DTensor and FSDP2 build and run one rank's program with no
peer processes. `meshyard plan --simulate` (launcher/simulate.py) is its only user.

Why this module exists: the backend is not fully public API. torch 2.13 ships it as
`dist.Backend.FAKE` and makes it with no import of ours (we hand it a public HashStore, so torch does
not reach for `FakeStore` either), but earlier torch releases registered it only when the private
test module `torch.testing._internal.distributed.fake_pg` was imported, which has no stability
promise. That private import is made here and nowhere else, only when the backend is missing, and
a torch with neither says so in one line instead of a stack trace.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

FAKE = "fake"
PRIVATE_MODULE = "torch.testing._internal.distributed.fake_pg"  # registers the backend on import (older torch)


class FakeBackendMissing(Exception):
    """This torch has no fake process-group backend."""


def ensure_fake_backend() -> None:
    """Make the "fake" backend available, or raise FakeBackendMissing saying why."""
    if not dist.is_available():
        raise FakeBackendMissing(f"torch {torch.__version__} was built without torch.distributed")
    if FAKE in dist.Backend.backend_list:
        return
    try:
        importlib.import_module(PRIVATE_MODULE)  # private: see the module docstring
    except ImportError as exc:
        raise FakeBackendMissing(f"torch {torch.__version__} has no fake process-group backend ({PRIVATE_MODULE}:"
                                 f" {exc}); meshyard is tested with torch 2.13") from None
    if FAKE not in dist.Backend.backend_list:
        raise FakeBackendMissing(f"torch {torch.__version__}: importing {PRIVATE_MODULE} registered no"
                                 f" {FAKE!r} backend")


@contextlib.contextmanager
def fake_rank(rank: int, world_size: int) -> Iterator[None]:
    """The default process group of this process is rank `rank` of `world_size` fake ranks until exit."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process; simulate in a fresh one")
    dist.init_process_group(FAKE, rank=rank, world_size=world_size, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def forget_rank_caches() -> None:
    """Clear DTensor's caches of sharding decisions before another rank is played, when the ranks
    played since the last clear held unevenly sharded tensors.

    DTensor caches them by global shapes and placements, not by rank: in a real process the rank
    never changes, but the local size of an uneven shard does change with it (30 columns over 4
    ranks: 8, 8, 8, 6). Without this, rank 3 would reuse rank 0's local shapes and fail where a
    launch does not. (Even shards give every rank the same entries, and recomputing them costs
    several times the rest of a simulated step, hence "when".) Both caches are torch internals (a
    private debug helper and a private function's functools cache), so their absence is an error
    rather than a silently wrong result."""
    from torch.distributed.tensor import _redistribute, debug

    try:
        clear_sharding_propagation = debug._clear_sharding_prop_cache
        clear_redistribute_plans = _redistribute._gen_transform_infos.cache_clear
    except AttributeError as exc:
        raise FakeBackendMissing(f"torch {torch.__version__}: DTensor's per-rank caches moved ({exc}); simulating"
                                 " several ranks in one process would reuse one rank's shapes for another") from None
    clear_sharding_propagation()
    clear_redistribute_plans()
