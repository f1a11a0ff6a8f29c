"""Where a model keeps its repeated layers: FSDP wraps each one, pipeline stages split the list.

The path comes from `model.layers` in the spec (e.g. `model.layers` for HF Llama, `transformer.h`
for GPT-2); without one, the single nn.ModuleList whose children are all of one class is used.
"""
from __future__ import annotations

from typing import cast

from torch import nn


def layer_list_candidates(model: nn.Module) -> list[str]:
    """Paths of every nn.ModuleList of two or more children of one class (outermost first)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            if not any(name.startswith(outer + ".") for outer in found):
                found.append(name)
    return found


def find_layers(model: nn.Module, path: str | None) -> tuple[str, nn.ModuleList] | None:
    """(path, layer list) of `model`; None when no path is given and there is no candidate.

    ValueError (naming the setting) when the path is not a ModuleList or the choice is ambiguous.
    """
    if path is not None:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"model.layers={path}: {type(model).__name__} has no submodule {path!r}") from None
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"model.layers={path}: is a {type(layers).__name__}, not an nn.ModuleList of layers")
        return path, layers
    candidates = layer_list_candidates(model)
    if len(candidates) > 1:
        raise ValueError(f"model.layers: {type(model).__name__} has several lists of repeated layers"
                         f" ({', '.join(candidates)}); name one")
    if not candidates:
        return None
    return candidates[0], cast(nn.ModuleList, model.get_submodule(candidates[0]))  # a candidate is one
