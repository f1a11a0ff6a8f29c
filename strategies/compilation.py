"""`training.compile`: torch.compile each repeated layer, as torchtitan does.

Per layer rather than the whole model: identical layers share one compiled graph, compile time
stays that of a layer or two, and the data-parallel wrapper applied afterwards (FSDP2, DDP) stays
outside the compiled code (`torch.compile(DDP(model))` broke into graphs here; DDP over compiled
layers compiled cleanly). The layer's `forward` is replaced by a compiled function calling it,
leaving the module tree as it is, so parameter names, checkpoints and exports are the same with and
without compile. Neither torch's own way does both: `torch.compile(layer)` returns a wrapper whose
`_orig_mod.` would enter every name, and `layer.compile()` compiles the module's `_call_impl`, a
torch.nn frame that dynamo skips, so a layer whose `forward` is torch's own (nn.Sequential) was
silently left uncompiled. Compilation happens at the first call: the first step (and the first
evaluation, another graph without autograd) pays it.
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
