"""Build the user's components from the spec: model factory, datasets, loss function."""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from launcher.errors import UserError
from launcher.imports import resolve
from launcher.spec.schema import ComponentSpec, DataSpec, JobSpec
from strategies.batch import BatchFeed
from strategies.model_init import ModelRecipe


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of LM logits [B, T, V] against token ids [B, T]."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


INIT_FROM_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
MODEL_LOSS = "model"  # the loss the model returns itself
BUILTIN_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": F.mse_loss,
    "cross_entropy": F.cross_entropy,
    "token_cross_entropy": token_cross_entropy,
}


def check_targets(spec: JobSpec) -> None:
    """Fail before any process starts if a target does not import (raises SpecError)."""
    resolve(spec.model.target, "model.target")
    resolve(spec.data.target, "data.target")
    if spec.data.collate is not None:
        resolve(spec.data.collate, "data.collate")
    if spec.loss not in (*BUILTIN_LOSSES, MODEL_LOSS):
        resolve(spec.loss, "loss")
    if spec.model.init_from is not None:
        check_init_from(spec.model.init_from)


def check_init_from(path: str) -> None:
    """A readable weights file of a kind that loads without running code."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"model.init_from={path}: no such file")
    if file.suffix not in INIT_FROM_SUFFIXES:
        raise UserError(f"model.init_from={path}: expected one of {', '.join(INIT_FROM_SUFFIXES)}"
                        " (a consolidated state dict, e.g. from meshyard export)")
    if file.suffix == ".safetensors" and importlib.util.find_spec("safetensors") is None:
        raise UserError(f"model.init_from={path}: reading .safetensors needs the safetensors package;"
                        " pip install 'meshyard[hf]' (through constraints.txt)")


def batch_feed(spec: JobSpec) -> BatchFeed:
    return BatchFeed(spec.data.feed, spec.data.target_key, spec.loss == MODEL_LOSS)


def model_recipe(spec: JobSpec) -> ModelRecipe:
    """How every strategy builds the model and sets its starting weights."""
    return ModelRecipe(model_factory(spec.model), spec.model.init, spec.seed, spec.model.init_from,
                       spec.training.activation_checkpointing, spec.training.compile)


def build_collate(spec: DataSpec) -> Callable[[list[Any]], Any] | None:
    """The user's collate function, or None for torch's default (tensors, tuples and dicts)."""
    return resolve(spec.collate, "data.collate") if spec.collate is not None else None


def model_factory(spec: ComponentSpec) -> Callable[[], nn.Module]:
    build = resolve(spec.target, "model.target")

    def build_model() -> nn.Module:
        model = build(**spec.kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model.target {spec.target} returned {type(model).__name__}, not an nn.Module")
        return model

    return build_model


def build_datasets(spec: DataSpec) -> tuple[Dataset, Dataset | None]:
    """(train, eval or None). The eval split is the same factory with `eval_kwargs` merged in."""
    build = resolve(spec.target, "data.target")
    train = build(**spec.kwargs)
    evaluation = build(**{**spec.kwargs, **spec.eval_kwargs}) if spec.eval_kwargs is not None else None
    for split in (train, evaluation):
        if split is not None and not (hasattr(split, "__getitem__") and hasattr(split, "__len__")):
            raise TypeError(f"data.target {spec.target} must return a map-style Dataset (__getitem__ and __len__)")
    return train, evaluation


def build_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function by name; with `loss: model` the strategies use the model's own loss (see
    strategies/batch.py) and never call the function returned here."""
    if name == MODEL_LOSS:
        return _computed_by_the_model
    return BUILTIN_LOSSES.get(name) or resolve(name, "loss")


def _computed_by_the_model(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("loss: model uses the loss the model returns; no loss function is called")


def correct_predictions(output: torch.Tensor, targets: torch.Tensor) -> int | None:
    """How many argmax predictions hit their class label; None when this is not classification."""
    if output.ndim == 2 and output.shape[1] > 1 and not targets.is_floating_point():
        return int((output.argmax(dim=1) == targets).sum())
    return None
