"""Built-in models, so every example runs with no download.

Each keeps its repeated layers in `self.blocks` (an nn.ModuleList): sharding strategies wrap per
block, and pipeline parallel splits there.
"""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """in_dim -> depth x (Linear + GELU) of width `hidden` -> out_dim."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, depth: int = 2) -> None:
        super().__init__()
        widths = [in_dim] + [hidden] * depth
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.GELU()) for a, b in zip(widths[:-1], widths[1:])
        )
        self.head = nn.Linear(widths[-1], out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def mlp(in_dim: int = 32, hidden: int = 256, out_dim: int = 1, depth: int = 2) -> MLP:
    """A regression MLP (use with `loss: mse`)."""
    return MLP(in_dim, hidden, out_dim, depth)


def classifier(in_dim: int = 32, hidden: int = 128, num_classes: int = 10, depth: int = 2) -> MLP:
    """A small MLP classifier producing logits (use with `loss: cross_entropy`)."""
    return MLP(in_dim, hidden, num_classes, depth)
