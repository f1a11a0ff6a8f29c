"""`training.compile`: torch.compile each repeated layer, as torchtitan does.

Per layer rather than the whole model: identical layers share one compiled graph (parameters are
graph inputs, not constants), compile time stays that of one layer, and the data-parallel wrapper
applied afterwards (FSDP2, DDP) stays outside the compiled code (`torch.compile(DDP(model))` broke
into graphs here; DDP over compiled layers compiled cleanly). `Module.compile()` compiles the
layer's `__call__` in place, so parameter names keep no `_orig_mod.` prefix and checkpoints read
the same with and without compile. Compilation happens at the first call: the first step (and the
first evaluation, a second graph without autograd) pays it.
"""
from __future__ import annotations

import shutil
from typing import Any

import torch
from torch import nn


def compile_layer(layer: nn.Module) -> None:
    """Compile `layer`'s forward (inductor, torch's default backend) in place."""
    forward = layer.forward

    def layer_forward(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    # An instance attribute: Module.__call__ looks `forward` up on the instance before the class.
    layer.forward = torch.compile(layer_forward)


def missing_cpp_compiler() -> str | None:
    """The C++ compiler(s) inductor would look for on CPU when none of them is on PATH, else None."""
    # torch._inductor.config is private, but it is where inductor keeps its compiler search list:
    # $CXX if set, else g++ (clang++ on macOS); a None entry means "install one with conda", which
    # inductor does only when TORCH_INDUCTOR_INSTALL_GXX is set.
    from torch._inductor import config

    cxx = config.cpp.cxx
    names = [name for name in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if name]
    if any(shutil.which(name) for name in names):
        return None
    return " or ".join(names) or "a C++ compiler"
