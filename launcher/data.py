"""Built-in synthetic datasets: map-style, deterministic in `seed`; (input, target) pairs, or dict
samples for models fed as `model(**sample)` (data.feed: kwargs)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset


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


class TokenWindows(Dataset):
    """Dict samples as Hugging Face causal LMs take them: input_ids, attention_mask and labels
    (= input_ids: the model shifts them itself)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def token_corpus(n: int = 2048, seq_len: int = 32, seed: int = 0) -> TokenWindows:
    """`n` windows of the generated text (see char_corpus) as dict samples for `loss: model`."""
    return TokenWindows(char_corpus(n, seq_len, seed).tensors[0])


def digits(split: str = "train", eval_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no download), pixels
    scaled to [0, 1] as 64 features. The split is a fixed permutation: `eval_fraction` of it is eval.
    Needs the `examples` extra (scikit-learn)."""
    if split not in ("train", "eval"):
        raise ValueError(f"data.kwargs.split={split!r}: allowed train, eval")
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(len(labels) * (1 - eval_fraction))
    keep = order[:cut] if split == "train" else order[cut:]
    x = torch.tensor(images, dtype=torch.float32)[keep] / 16.0
    return TensorDataset(x, torch.tensor(labels, dtype=torch.long)[keep])
