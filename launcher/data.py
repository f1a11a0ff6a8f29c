"""Built-in synthetic datasets: map-style, (input, target) pairs, deterministic in `seed`."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def synthetic_regression(
    n: int = 8192, in_dim: int = 32, out_dim: int = 1, noise: float = 0.05, seed: int = 0
) -> TensorDataset:
    """y = tanh(x W1) w2 + noise: a smooth nonlinear target an MLP can fit."""
    gen = torch.Generator().manual_seed(seed)
    # The teacher weights come from a fixed seed so train and eval splits share one target function.
    teacher = torch.Generator().manual_seed(12345)
    w1 = torch.randn(in_dim, 64, generator=teacher) / in_dim**0.5
    w2 = torch.randn(64, out_dim, generator=teacher) / 8.0
    x = torch.randn(n, in_dim, generator=gen)
    y = torch.tanh(x @ w1) @ w2 + noise * torch.randn(n, out_dim, generator=gen)
    return TensorDataset(x, y)


def synthetic_classification(
    n: int = 8192, in_dim: int = 32, num_classes: int = 10, seed: int = 0
) -> TensorDataset:
    """Labels from a fixed random linear teacher: learnable, with a known best accuracy near 100%."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.Generator().manual_seed(54321)
    w = torch.randn(in_dim, num_classes, generator=teacher)
    x = torch.randn(n, in_dim, generator=gen)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)
