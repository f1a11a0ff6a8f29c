"""Activation checkpointing of repeated layers (`training.activation_checkpointing`).

A checkpointed layer keeps only its inputs from forward and recomputes its activations when
backward reaches it: activation memory traded for one more forward of that layer. `full`
checkpoints every repeated layer, `every_<k>` every k-th (the k-th, 2k-th, ... of the model's whole
layer list, torchtitan's selective layer AC), `none` none.

The layer's own `forward` is replaced by one that runs it under `torch.utils.checkpoint`
(non-reentrant, RNG state replayed so dropout recomputes the same mask). The module tree is left as
it is: torch's `checkpoint_wrapper` (what torchtitan uses) inserts a `_checkpoint_wrapped_module`
level that `named_parameters()` above the wrapper still shows, while everything here that addresses
parameters by name (DCP checkpoints, export, FSDP's sharded initial state, compression masks) must
see the same names with and without checkpointing. Hooks stay outside the recomputed region: FSDP2
and tensor parallel hook `__call__`, which calls the replaced `forward`.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint


def layer_interval(policy: str) -> int:
    """Every how many layers one is checkpointed: 0 for `none`, 1 for `full`, k for `every_<k>`
    (the spec validates the form)."""
    if policy == "none":
        return 0
    return 1 if policy == "full" else int(policy.removeprefix("every_"))


def checkpointed_layers(layers: Iterable[nn.Module], policy: str) -> list[nn.Module]:
    """The layers of the model's whole list that `policy` checkpoints (the k-th, 2k-th, ...)."""
    interval = layer_interval(policy)
    return [layer for index, layer in enumerate(layers, start=1) if interval and index % interval == 0]


def checkpoint_layer(layer: nn.Module) -> None:
    """Make `layer` recompute its activations in backward (in place; names and hooks unchanged)."""
    forward = layer.forward

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        # kwargs go in a partial, so a layer argument cannot collide with checkpoint's own keywords
        return checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=False)

    # An instance attribute: Module.__call__ looks `forward` up on the instance before the class.
    layer.forward = checkpointed_forward
