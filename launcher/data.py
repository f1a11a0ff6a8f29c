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


ALPHABET = "\n .,abcdefghijklmnopqrstuvwxyz"  # ids 0..29; the built-in transformer's vocab_size (32) covers it
_SUBJECTS = ("the cat", "a dog", "the old sailor", "my neighbour", "a small robot", "the teacher", "every bird",
             "the queen", "a tired farmer", "the river")
_VERBS = ("sees", "likes", "carries", "paints", "follows", "forgets", "builds", "finds", "sings to", "waits for")
_OBJECTS = ("the red boat", "a quiet garden", "seven apples", "the long road", "a broken clock", "the moon",
            "an open window", "the market", "a warm loaf", "the last train")
_ENDINGS = (".", ".", ",", ".\n")


def corpus_text(num_chars: int, seed: int = 0) -> str:
    """Sentences from a tiny grammar (subject verb object): structure a character LM can learn."""
    import random

    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < num_chars:
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)} "
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)[:num_chars]


def char_corpus(n: int = 2048, seq_len: int = 32, seed: int = 0) -> TensorDataset:
    """`n` windows of a generated text as character ids: (x, y) with y = x shifted by one character.
    Generated in code, so the LM examples need no download."""
    text = corpus_text(n * seq_len + 1, seed)
    ids = torch.tensor([ALPHABET.index(c) for c in text], dtype=torch.long)
    starts = torch.arange(n) * seq_len
    x = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + seq_len + 1] for s in starts.tolist()])
    return TensorDataset(x, y)
