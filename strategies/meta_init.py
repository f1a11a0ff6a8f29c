"""Initialize a model built on the meta device one module at a time, so no rank holds it whole.

Each module's own tensors are created on the CPU and filled by its `reset_parameters()` in
registration order under the job's seed. For the built-in models (and any model whose modules are
constructed in the order they are registered) this draws the same random numbers as the
constructor, so sharded and pipeline-split runs start from the single-process weights.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn


def init_module_by_module(model: nn.Module, keep: Callable[[nn.Module], bool] = lambda module: False
                          ) -> Iterator[tuple[str, nn.Module]]:
    """Yield (name, module) with the module's own tensors materialized and initialized; afterwards
    the module goes back to the meta device unless `keep(module)`."""
    for prefix, module in model.named_modules():
        if not list(module.parameters(recurse=False)) and not list(module.buffers(recurse=False)):
            continue
        if not hasattr(module, "reset_parameters"):
            raise TypeError(f"{type(module).__name__} ({prefix or 'root'}) holds tensors but has no reset_parameters();"
                            " sharded and pipeline-parallel runs build on the meta device and need it to initialize them")
        module.to_empty(device="cpu", recurse=False)
        module.reset_parameters()
        yield prefix, module
        if not keep(module):
            module.to_empty(device="meta", recurse=False)
