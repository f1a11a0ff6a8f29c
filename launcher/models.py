"""Built-in models, so every example runs with no download.

Each keeps its repeated layers in `self.blocks` (an nn.ModuleList): sharding strategies wrap per
block, and pipeline parallel splits there. Pipeline stages are copies of the model in which the
blocks of other stages are dropped and the top-level modules registered before `blocks` (first
stage) or after it (last stage) are set to None, so each forward skips a module that is None.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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
        return self.head(x) if self.head is not None else x


def mlp(in_dim: int = 32, hidden: int = 256, out_dim: int = 1, depth: int = 2) -> MLP:
    """A regression MLP (use with `loss: mse`)."""
    return MLP(in_dim, hidden, out_dim, depth)


def classifier(in_dim: int = 32, hidden: int = 128, num_classes: int = 10, depth: int = 2) -> MLP:
    """A small MLP classifier producing logits (use with `loss: cross_entropy`)."""
    return MLP(in_dim, hidden, num_classes, depth)


class Attention(nn.Module):
    """Causal self-attention. Heads are inferred from q's width, so a column-wise split of q/k/v
    over the tensor-parallel group leaves each rank its own whole heads."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerLM(nn.Module):
    """A small GPT-style language model: token + position embeddings, blocks, final norm, head."""

    # Megatron-style tensor parallel: column-wise in, row-wise out, one all-reduce per sub-layer.
    tp_plan = {"blocks.*.attn.q": "colwise", "blocks.*.attn.k": "colwise", "blocks.*.attn.v": "colwise",
               "blocks.*.attn.o": "rowwise", "blocks.*.fc1": "colwise", "blocks.*.fc2": "rowwise"}

    def __init__(self, vocab_size: int, dim: int, n_heads: int, n_layers: int, max_len: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.tok_emb, self.pos_emb = nn.Embedding(vocab_size, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok_emb is not None:  # first pipeline stage (or no pipeline): token ids in
            x = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)
        if self.head is not None:  # last stage: logits out
            x = self.head(self.ln_f(x))
        return x


def transformer(vocab_size: int = 32, dim: int = 64, n_heads: int = 4, n_layers: int = 4,
                max_len: int = 64) -> TransformerLM:
    """A GPT-style character LM (use with `loss: token_cross_entropy` and `launcher.data:char_corpus`)."""
    return TransformerLM(vocab_size, dim, n_heads, n_layers, max_len)
