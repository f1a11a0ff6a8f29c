"""Where a run's starting weights come from, the same under every strategy.

`init: constructor` (the default) builds the model with the user's real constructor on the CPU of
every rank under the job's seed, so whatever the constructor does (HF `post_init`, nanoGPT's
`_init_weights`, a kaiming loop, a private generator) is kept; rank 0's weights are then
broadcast, so a constructor that is not deterministic cannot make ranks disagree. Strategies shard
or split that model afterwards. Every rank briefly holds the whole model, as with DDP.

`init: meta` is for models too large for one host: the model is built on the meta device and each
module's tensors are created one module at a time (children before parents, like `Module.apply`),
filled by the module's `reset_parameters()` if it has one and then by the model's own
`_init_weights(module)` hook (HF's and nanoGPT's convention), under the job's seed. The starting
weights are the hook's, identical under every strategy, but not the constructor's draws. A tensor
that neither sets is refused by name.

`init_from` loads a consolidated state dict (safetensors, or a torch file read with
weights_only=True) over either.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

INIT_HOOK = "_init_weights"


@dataclass(frozen=True)
class ModelRecipe:
    """How to build the user's model and set its starting weights (see the module docstring), and
    how the strategy runs its repeated layers (strategies/checkpointing.py, strategies/compilation.py)."""

    build: Callable[[], nn.Module]
    init: str = "constructor"
    seed: int = 0
    init_from: str | None = None
    activation_checkpointing: str = "none"  # none | full | every_<k>
    compile: bool = False

    @property
    def wraps_layers(self) -> bool:
        """Whether the strategy checkpoints or compiles the repeated layers."""
        return self.activation_checkpointing != "none" or self.compile

    def full(self) -> nn.Module:
        """The whole model on the CPU with its starting weights, equal on every rank."""
        if self.init == "meta":
            model = self.skeleton()
            for _ in self.materialize(model, keep=lambda module: True):
                pass
            return model
        model = self.build()
        broadcast_from_rank_0(model)
        if self.init_from is not None:
            load_consolidated(model, read_state_dict(self.init_from), self.init_from)
        return model

    def skeleton(self) -> nn.Module:
        """The model on the meta device: shapes only, no memory, no init."""
        with torch.device("meta"):
            return self.build()

    def materialize(self, model: nn.Module, keep: Callable[[nn.Module], bool]) -> Iterator[tuple[str, nn.Module]]:
        """Yield (name, module) with the module's own tensors on the CPU and initialized (meta path);
        afterwards each goes back to the meta device unless `keep(module)`."""
        hook = getattr(model, INIT_HOOK, None)
        if not callable(hook):
            raise TypeError(f"model.init=meta: {type(model).__name__} has no {INIT_HOOK}(module) hook")
        loaded = read_state_dict(self.init_from) if self.init_from is not None else None
        shared: dict[int, nn.Parameter] = {}  # tied weights: the first module to materialize one owns it
        generator_state = torch.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            for prefix, module in children_first(model):
                if not _own_tensors(module):
                    continue
                _materialize_own(module, shared)
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()  # type: ignore[operator]  # Module.__getattr__ is typed Tensor | Module
                hook(module)
                _check_set(prefix, module)
                if loaded is not None:
                    _copy_own(prefix, module, loaded)
                yield prefix, module
                if not keep(module):
                    module.to_empty(device="meta", recurse=False)
        finally:
            torch.set_rng_state(generator_state)


def children_first(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) in `Module.apply`'s order: every child before its parent."""
    for name, child in model.named_children():
        yield from children_first(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, model


def _own_tensors(module: nn.Module) -> bool:
    return bool(module._parameters or module._buffers)


def _materialize_own(module: nn.Module, shared: dict[int, nn.Parameter]) -> None:
    """Give the module's own meta tensors CPU storage filled with NaN (so an unset one shows)."""
    for name, param in list(module._parameters.items()):
        if param is None:
            continue
        if id(param) in shared:
            module._parameters[name] = shared[id(param)]
            continue
        real = nn.Parameter(torch.full(param.shape, math.nan, dtype=param.dtype) if param.is_floating_point()
                            else torch.zeros(param.shape, dtype=param.dtype), requires_grad=param.requires_grad)
        shared[id(param)] = real
        module._parameters[name] = real
    for name, buffer in list(module._buffers.items()):
        if buffer is not None and buffer.is_meta:
            module._buffers[name] = (torch.full(buffer.shape, math.nan, dtype=buffer.dtype)
                                     if buffer.is_floating_point() else torch.zeros(buffer.shape, dtype=buffer.dtype))


def _check_set(prefix: str, module: nn.Module) -> None:
    for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
        if tensor is not None and tensor.is_floating_point() and torch.isnan(tensor).any():
            raise ValueError(f"model.init=meta: {prefix + '.' if prefix else ''}{name} was set by neither"
                             f" reset_parameters() nor {INIT_HOOK}(); initialize it in the hook, or use"
                             " model.init: constructor")


def _copy_own(prefix: str, module: nn.Module, loaded: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            key = f"{prefix}.{name}" if prefix else name
            if tensor is not None and key in loaded:
                tensor.copy_(loaded[key])


@torch.no_grad()
def broadcast_from_rank_0(model: nn.Module) -> None:
    """Make every rank hold rank 0's parameters and buffers (what DDP does at construction)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    tensors = [t for t in [*model.parameters(), *model.buffers()] if not t.is_meta]
    for dtype in {t.dtype for t in tensors}:
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def load_consolidated(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a whole state dict; a missing key is allowed only for a tied weight (one tensor under two
    names, e.g. an LM head tied to the embedding, which safetensors files store once)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    loaded_elsewhere = {name for names in names_of.values() if any(n in state for n in names) for name in names}
    missing = [name for name in missing if name not in loaded_elsewhere]
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"holds {unexpected[0]!r}, which the model has not"
        raise ValueError(f"model.init_from={source}: {what}"
                         f" (+{len(missing) + len(unexpected) - 1} more mismatched keys)")


def read_state_dict(path: str) -> dict[str, Any]:
    """A consolidated state dict from .safetensors, or from a torch file read with weights_only=True."""
    file = Path(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"model.init_from={path}: holds {type(state).__name__}, not a state dict")
    return state
