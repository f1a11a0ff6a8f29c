"""The batch and output contract every strategy shares.

A batch is what the DataLoader collates: a tensor, a tuple/list, or a (nested) dict of tensors. A
`BatchFeed` says how it reaches the model and the loss:

- positional: the batch is (input, target); the model is called as `model(input)`;
- kwargs: the batch is a dict; the model is called as `model(**batch)`, with the `target_key`
  entry taken out for the loss function (or left in, when the model computes its own loss).

A model may return a tensor, a tuple/list (its first element is the output), or a dict /
Hugging Face `ModelOutput` (its `logits`). With `loss: model` the loss is the one the model
returns (`output.loss` / `output["loss"]`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

Target = Any  # a tensor, or (labels, teacher logits) under distillation, or None with loss: model
LossFn = Callable[[torch.Tensor, Target], torch.Tensor]


def tree_map(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """Apply `fn` to every tensor leaf of nested tuples, lists and dicts; other leaves stay."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {key: tree_map(fn, item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(tree_map(fn, item) for item in value)
    return value


def to_device(value: Any, device: torch.device) -> Any:
    """Move every tensor leaf to `device`."""
    return tree_map(lambda tensor: tensor.to(device, non_blocking=True), value)


def batch_size(value: Any) -> int:
    """Samples in a batch: dim 0 of its first tensor leaf."""
    if isinstance(value, torch.Tensor):
        return value.shape[0]
    items = value.values() if isinstance(value, Mapping) else value
    for item in items:
        size = batch_size(item)
        if size >= 0:
            return size
    return -1


def model_output(output: Any) -> torch.Tensor:
    """The output tensor of whatever the model returned (see the module docstring)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # dicts and transformers' ModelOutput (an OrderedDict)
        if "logits" in output:
            return output["logits"]
        tensors = [v for k, v in output.items() if k != "loss" and isinstance(v, torch.Tensor)]
        if tensors:
            return tensors[0]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}; expected a tensor, a tuple whose first element is"
                    " the output, or a dict/ModelOutput with `logits`")


def model_loss(output: Any) -> torch.Tensor:
    """The loss the model computed itself (loss: model)."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss: model, but the model returned {type(output).__name__} without a `loss` tensor; pass"
                        " the labels in the batch (data.feed: kwargs) or name a loss function")
    return loss


@dataclass(frozen=True)
class BatchFeed:
    mode: str = "positional"  # positional | kwargs
    target_key: str = "labels"
    loss_from_model: bool = False

    def split(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Target]:
        """(positional args, keyword args, target) of one micro-batch."""
        if self.mode == "kwargs":
            if not isinstance(batch, Mapping):
                raise TypeError(f"data.feed=kwargs needs dict samples, got {type(batch).__name__}")
            if self.loss_from_model:
                return (), dict(batch), batch.get(self.target_key)
            if self.target_key not in batch:
                raise KeyError(f"data.target_key={self.target_key!r} is not in the batch (keys: {sorted(batch)})")
            kwargs = {k: v for k, v in batch.items() if k != self.target_key}
            return (), kwargs, batch[self.target_key]
        if self.loss_from_model:
            return tuple(batch), {}, None
        inputs, target = batch
        return (inputs,), {}, target

    def token_positions(self, batch: Any) -> int:
        """Token positions one micro-batch feeds the model (padding included): the numel of its token
        ids (`input_ids`, or the positional input when it holds integers); 0 for other inputs."""
        args, kwargs, _ = self.split(batch)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and not ids.is_complex():
            return ids.numel()
        return 0

    def loss(self, output: Any, target: Target, loss_fn: LossFn) -> torch.Tensor:
        """The training objective of one micro-batch's output (fp32)."""
        if self.loss_from_model:
            return model_loss(output).float()
        return loss_fn(model_output(output).float(), target)
