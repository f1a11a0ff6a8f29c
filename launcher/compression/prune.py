"""Gradual pruning of nn.Linear weights during training.

Masks are computed by torch.nn.utils.prune's own methods (L1Unstructured, LnStructured) but kept
here rather than as prune's forward-hook reparametrization, so parameter names, checkpoints, DDP
buckets and optimizer state stay those of the plain model. After every optimizer step the masks
are applied in place; data-parallel ranks hold bit-identical weights, hence identical masks.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import prune

from launcher.spec.schema import PruneSpec


def prunable_weights(model_parts: Iterable[nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{index}.{name}.weight": module.weight
        for index, part in enumerate(model_parts)
        for name, module in part.named_modules()
        if isinstance(module, nn.Linear)
    }


class Pruner:
    def __init__(self, spec: PruneSpec, model_parts: Iterable[nn.Module]) -> None:
        self.spec = spec
        self.weights = prunable_weights(model_parts)
        self.masks: dict[str, torch.Tensor] = {}

    def target_sparsity(self, step: int) -> float:
        sched = self.spec.schedule
        progress = (1.0 if sched.end_step == sched.start_step
                    else (step - sched.start_step) / (sched.end_step - sched.start_step))
        progress = min(1.0, max(0.0, progress))
        ramp = 1.0 - (1.0 - progress) ** 3 if sched.ramp == "cubic" else progress
        return self.spec.amount * ramp

    def is_event(self, step: int) -> bool:
        sched = self.spec.schedule
        return sched.start_step <= step <= sched.end_step and (
            (step - sched.start_step) % sched.every == 0 or step == sched.end_step
        )

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Recompute masks at pruning events; keep pruned weights at zero after every step."""
        if self.is_event(step):
            self.masks = self._compute_masks(self.target_sparsity(step))
        for name, mask in self.masks.items():
            self.weights[name].mul_(mask)

    def _compute_masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        weights = {name: w.detach() for name, w in self.weights.items()}
        if self.spec.method == "l1_structured":
            method: prune.BasePruningMethod = prune.LnStructured(amount=sparsity, n=1, dim=0)
            return {name: method.compute_mask(w, torch.ones_like(w)) for name, w in weights.items()}
        if self.spec.scope == "per_layer":
            method = prune.L1Unstructured(amount=sparsity)
            return {name: method.compute_mask(w, torch.ones_like(w)) for name, w in weights.items()}
        flat = torch.cat([w.flatten() for w in weights.values()])
        flat_mask = prune.L1Unstructured(amount=sparsity).compute_mask(flat, torch.ones_like(flat))
        masks, offset = {}, 0
        for name, w in weights.items():
            masks[name] = flat_mask[offset : offset + w.numel()].view_as(w)
            offset += w.numel()
        return masks

    def sparsity(self) -> dict[str, float]:
        """Fraction of zero weights per pruned layer and overall."""
        report = {name: (w == 0).float().mean().item() for name, w in self.weights.items()}
        zeros = sum((w == 0).sum().item() for w in self.weights.values())
        report["overall"] = zeros / sum(w.numel() for w in self.weights.values())
        return report

    def mask_digest(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.masks):
            digest.update(name.encode())
            digest.update(self.masks[name].to(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.bool() for name, mask in self.masks.items()}

    def load_state_dict(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = {name: mask.to(self.weights[name].dtype) for name, mask in masks.items()}
