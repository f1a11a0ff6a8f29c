"""Metrics over the eval split: loss always; accuracy for class labels; perplexity and token
accuracy for language models.

Each data-parallel rank scores a strided share of the split and the sums are reduced over the dp
group. A language model is recognized by its output: logits [B, T, V] against token ids [B, T].
Tokens labelled -100 are ignored (PyTorch's and Hugging Face's convention). With `loss: model` the
model is taken to shift its labels itself, as HF causal LMs do, so token accuracy compares the
logits at position t with the label at t + 1; with a loss function the two are compared as given.
`eval_loss` is the mean of per-batch losses weighted by samples; perplexity is exp(eval_loss).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sized
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from launcher.components import correct_predictions
from strategies import BatchFeed, Strategy
from strategies.batch import batch_size, model_output

IGNORE_INDEX = -100


def evaluate_split(strategy: Strategy, eval_set: Dataset, micro_batch_size: int, loss_fn: Callable[..., torch.Tensor],
                   feed: BatchFeed, collate: Callable[[list[Any]], Any] | None = None) -> dict[str, float]:
    # map-style: build_datasets checks __len__
    shard = Subset(eval_set, range(strategy.dp_rank, len(cast(Sized, eval_set)), strategy.dp_size))
    # loss sum, samples, correct samples, correct tokens, tokens
    totals = torch.zeros(5, dtype=torch.float64)
    kinds: set[str] = set()
    for batch in DataLoader(shard, batch_size=micro_batch_size, collate_fn=collate):
        raw = strategy.evaluate(batch)
        _, _, target = feed.split(batch)
        count = batch_size(batch)
        totals[0] += feed.loss(raw, target, loss_fn).double().cpu() * count
        totals[1] += count
        output = model_output(raw).float().cpu()
        kind = _score(output, target, shifted=feed.loss_from_model, totals=totals)
        if kind is not None:
            kinds.add(kind)
    totals = strategy.reduce_sum(totals)
    loss = (totals[0] / totals[1]).item()
    metrics = {"eval_loss": loss}
    if "classes" in kinds:
        metrics["eval_accuracy"] = (totals[2] / totals[1]).item()
    if "tokens" in kinds:
        metrics["eval_token_accuracy"] = (totals[3] / totals[4]).item()
        metrics["eval_perplexity"] = math.exp(min(loss, 700.0))
    return metrics


def _score(output: torch.Tensor, target: Any, shifted: bool, totals: torch.Tensor) -> str | None:
    """Add this batch's hits to `totals`; which kind of labels it had (None: not a classification)."""
    if not isinstance(target, torch.Tensor) or target.is_floating_point():
        return None
    hits = correct_predictions(output, target)  # the same rule quantize's report uses
    if hits is not None:
        totals[2] += hits
        return "classes"
    if output.ndim == 3 and target.ndim == 2:
        logits, labels = (output[:, :-1], target[:, 1:]) if shifted else (output, target)
        real = labels != IGNORE_INDEX
        totals[3] += ((logits.argmax(dim=-1) == labels) & real).sum()
        totals[4] += real.sum()
        return "tokens"
    return None
