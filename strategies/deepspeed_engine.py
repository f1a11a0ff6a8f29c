"""DeepSpeed's engine (ZeRO stages 0-3, optional CPU optimizer offload) behind the same seam.

What differs from the torch-native strategies, and why it stays inside this file:
- The engine scales the loss by 1/gradient_accumulation_steps in `backward` itself, so the window
  loss is passed unscaled, and `engine.step()` is called after every micro-batch (off the boundary
  it only advances the engine's accumulation counter).
- From ZeRO-1 on, gradients live in the engine's partitioned buffers, not in `p.grad`: L1/L2 goes
  through DeepSpeed's public accessors (`safe_get_full_grad` for stages 0-2, whose weights are
  whole on every rank; `safe_get_local_grad` for stage 3, whose weights and gradients are
  partitions — nothing is gathered).
- The engine clips inside its step (`gradient_clipping` in its config), so from ZeRO-1 on the
  gradient norm is known only after `optimizer_step()`, which returns it.
- Checkpoints are DeepSpeed's own (`engine.save_checkpoint`), written into the directory the
  loop's Checkpointer publishes and read back with weights_only=True (strategies/deepspeed_checkpoint.py).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from strategies.base import Batch, LossFn, OptimizerFactory
from strategies.batch import BatchFeed, to_device, tree_map
from strategies.deepspeed_checkpoint import DeepSpeedCheckpoint, weights_only_checkpoint_engine
from strategies.grads import add_l1_l2_to_pairs_, clip_grad_norm_
from strategies.model_init import ModelRecipe
from strategies.single import SingleProcessStrategy


def skip_shared_memory_comm_build() -> None:
    """Don't JIT-compile DeepSpeed's shared-memory all-reduce op on CPU.

    DeepSpeed builds it (ninja + a C++ compiler, ~2.5 min the first time) whenever its comm backend
    starts, but only its inference all-reduce uses it; training collectives go through the gloo
    process group. Marking the op incompatible makes DeepSpeed fall back to gloo, as it does on
    platforms without the op.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedStrategy(SingleProcessStrategy):
    """All ranks form the engine's one data-parallel group (the default process group)."""

    def __init__(self, device: torch.device, precision: str, config: dict[str, Any],
                 feed: BatchFeed = BatchFeed()) -> None:
        super().__init__(device, precision, feed)
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.is_logging_rank = self.dp_rank == 0
        self.config = config
        self.stage: int = config["zero_optimization"]["stage"]
        self.input_dtype = torch.bfloat16 if config["bf16"]["enabled"] else None
        self.native_checkpoint = DeepSpeedCheckpoint(self)

    def setup(self, recipe: ModelRecipe, build_optimizer: OptimizerFactory, loss_fn: LossFn) -> None:
        if recipe.wraps_layers:  # the plan refuses it first (launcher/plan.py says why)
            raise ValueError("training.activation_checkpointing and training.compile do not apply to strategy"
                             " deepspeed; use strategy zero")
        # DeepSpeed picks its accelerator at import; on a machine with no GPU it must be told "cpu".
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device.type == "cuda" else "cpu")
        import deepspeed

        skip_shared_memory_comm_build()
        # DeepSpeed calls torch's deprecated *_tensor collectives every step; the warning is not ours to fix.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+_tensor` is deprecated",
                                category=FutureWarning)
        # Every stage starts from the constructor's whole model; the engine partitions it (stage 3)
        # in initialize. deepspeed.zero.Init is not used: it partitions each submodule as soon as it
        # is built, so a constructor that writes into parameters afterwards (HF post_init, nanoGPT's
        # _init_weights, a kaiming loop) would silently write into empty partitions.
        self.module = recipe.full().to(self.device)
        optimizer = build_optimizer(self.module.parameters())
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=self.config,
                                                    dist_init_required=False)
        self.engine.checkpoint_engine = weights_only_checkpoint_engine()  # DeepSpeed's own loads pickles unchecked
        self.model = self.engine
        # The loop's LR schedule drives the torch optimizer; the engine's ZeRO optimizer shares its param groups.
        self.optimizer = optimizer
        self.loss_fn = loss_fn

    def forward_backward(self, micro_batches: Sequence[Batch], *, sync_grads: bool = True) -> torch.Tensor:
        if not sync_grads:
            raise ValueError("DeepSpeed's engine synchronizes on its own accumulation boundary")
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            loss = self._loss(batch)
            self.engine.backward(loss)  # divides by gradient_accumulation_steps
            if index < len(micro_batches) - 1:
                self.engine.step()  # off the boundary: only advances the engine's micro-step counter
            total += loss.detach().float()
        return total / len(micro_batches)

    def regularize(self, l1: float, l2: float) -> torch.Tensor:
        if self.stage == 3:
            return add_l1_l2_to_pairs_(self._local_pairs(), l1, l2, self.reduce_sum)
        return add_l1_l2_to_pairs_(self._full_pairs(), l1, l2)

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor | None:
        """The engine clips in its step. At stage 0 the synchronized gradients are in p.grad, so the
        pre-clip norm is measured here; from ZeRO-1 on, optimizer_step() reports the engine's."""
        if self.stage == 0:
            return clip_grad_norm_(self.module.parameters(), None)
        return None

    def optimizer_step(self) -> torch.Tensor | None:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm, dtype=torch.float32).detach().cpu()

    def discard_grads(self) -> None:
        raise RuntimeError("DeepSpeed cannot drop an accumulated window")  # the plan refuses on_nonfinite=skip

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.reduce_sum(value) / self.dp_size

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value

    def close(self) -> None:
        # Without it, ranks sometimes aborted at exit after a ZeRO-3 save ("terminate called without
        # an active exception", SIGABRT) once the process group was destroyed under the engine's hooks.
        self.engine.destroy()

    @property
    def local_optimizer_state(self) -> dict[Any, dict[str, Any]]:
        zero_optimizer = self.engine.optimizer
        inner = getattr(zero_optimizer, "optimizer", zero_optimizer)  # ZeRO wraps the torch optimizer
        return inner.state

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.input_dtype is not None:  # the engine holds bf16 weights
            args, kwargs = tree_map(self._to_input_dtype, (args, kwargs))
        return self.engine(*args, **kwargs)

    def _to_input_dtype(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.input_dtype) if tensor.is_floating_point() else tensor

    def _loss(self, batch: Batch) -> torch.Tensor:
        args, kwargs, target = self.feed.split(to_device(batch, self.device))
        return self.feed.loss(self._forward(*args, **kwargs), target, self.loss_fn)

    # (weight, gradient) pairs for the L1/L2 transform. Each pair's gradient is written back to the
    # engine when the consumer moves on to the next pair (i.e. after it has been transformed).
    def _full_pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        for param in self.module.parameters():
            grad = safe_get_full_grad(param)
            if grad is None:
                continue
            yield param.detach(), grad
            safe_set_full_grad(param, grad)

    def _local_pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad

        for param in self.module.parameters():
            grad = safe_get_local_grad(param)
            if grad is None:
                continue
            # Partitions are padded to equal size; the padding is not part of the model (its weights
            # are arbitrary, and l1*sign(w) there would leak into the gradient norm).
            start = self.dp_rank * grad.numel()
            real = max(0, min(grad.numel(), param.ds_numel - start))  # type: ignore[attr-defined]  # set by DeepSpeed
            yield safe_get_local_fp32_param(param).view(-1)[:real], grad.view(-1)[:real]
            safe_set_local_grad(param, grad)
