"""`meshyard plan --simulate`: every rank's sharded model is built, and one training step's structure
run, at the job's world size, in this one process, before anything is launched.

Each simulated rank joins torch's fake process group (launcher/fake_pg.py: collectives return at
once, shapes right, values meaningless) as that rank of the whole world, and runs the composed
strategy's own `setup` (strategies/composed.py: pipeline split, tensor parallel, FSDP2 over the
job's named mesh) on the model built on the meta device. Its parts then get fake storage (torch's
FakeTensorMode: no memory, no compute) and run one pipeline micro-batch of the training set: each
stage's forward (the first stage on the batch, a later one on a tensor of the shape the whole model
has at that cut), the loss on the last stage, backward, gradient clipping and the optimizer step.

What a launch would hit is reported with the ranks, the stage and the module: an exception (a
matmul whose shapes do not fit, a placement DTensor cannot propagate), or a layer, top-level module
or stage output whose shape differs from the whole model's (a layout that leaves a tensor sharded
where the rest of the model, the next stage or the loss expects all of it).

One rank is simulated per distinct (pipeline, data-shard, tensor) coordinate: the data-parallel
replicas of a rank build the same shapes and run the same program on other samples. Pipeline
send/recv is not run (the fake group has no data to send); each stage gets its input shape from the
whole model instead. Plain data parallel (DDP, ZeRO-1, DeepSpeed, one process) runs the whole model
on every rank, so it is simulated as that one program.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from launcher.errors import UserError
from launcher.simreport import GroupResult, Problem, Simulation
from launcher.trace import one_line
from strategies.batch import BatchFeed, model_output, tree_map
from strategies.composed import ComposedStrategy  # this module is imported only by `plan --simulate`

if TYPE_CHECKING:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from launcher.session import Session
    from strategies.layout import MeshLayout

Shape = tuple[int, ...]


class SimulationUnavailable(UserError):
    """Nothing could be simulated (no fake backend, no batch to run): one line, exit 2."""


# -- the step's shapes as the whole model has them ------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """Output shape of each checked module of the whole model, and each layer's input, on one batch."""

    outputs: dict[str, Shape]
    layer_inputs: list[tuple[Shape, torch.dtype]]
    output: Shape  # the model's output tensor


class Recorder:
    """Forward hooks on a model's modules (by whole-model path): the module the forward is in (for
    an exception: the innermost one entered and not left) and the output shapes of `checked` ones."""

    def __init__(self, names: dict[nn.Module, str], checked: set[str]) -> None:
        self.names, self.checked = names, checked
        self.stack: list[str] = []
        self.outputs: dict[str, Shape] = {}
        self.inputs: dict[str, tuple[Shape, torch.dtype]] = {}

    @contextlib.contextmanager
    def attached(self) -> Iterator[Recorder]:
        handles = []
        for module, name in self.names.items():
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: self._enter(name, args)))
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: self._leave(name, out)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, name: str, args: tuple[Any, ...]) -> None:
        self.stack.append(name)
        if args and isinstance(args[0], torch.Tensor):
            self.inputs.setdefault(name, (tuple(args[0].shape), args[0].dtype))

    def _leave(self, name: str, output: Any) -> None:
        self.stack.pop()
        shape = output_shape(output)
        if name in self.checked and shape is not None:
            self.outputs.setdefault(name, shape)

    @property
    def innermost(self) -> str | None:
        return self.stack[-1] if self.stack else None


def output_shape(output: Any) -> Shape | None:
    try:
        return tuple(model_output(output).shape)
    except TypeError:  # not a tensor output (e.g. a cache object): not compared
        return None


def checked_modules(model: nn.Module, layers_path: str | None, layers: nn.ModuleList | None) -> set[str]:
    """Modules whose output is whole in any correct layout: each repeated layer, and the model's
    top-level modules (tensor parallel shards inside a layer, never across its boundary)."""
    top = {name for name, _ in model.named_children() if layers_path is None or name != layers_path.split(".")[0]}
    return top | ({f"{layers_path}.{i}" for i in range(len(layers))} if layers is not None else set())


def whole_model_reference(model: nn.Module, batch: Any, feed: BatchFeed, autocast: torch.dtype | None,
                          checked: set[str], layers_path: str | None, num_layers: int) -> tuple[Reference, Any]:
    """The shapes one batch takes through the whole (unsharded) fake model, and its output."""
    recorder = Recorder({m: n for n, m in model.named_modules() if n}, checked)
    args, kwargs, _ = feed.split(batch)
    with recorder.attached(), autocast_cpu(autocast):
        output = model(*args, **kwargs)
    layer_inputs = [recorder.inputs[f"{layers_path}.{i}"] for i in range(num_layers)] if layers_path else []
    return Reference(recorder.outputs, layer_inputs, tuple(model_output(output).shape)), output


def as_constant(tensor: torch.Tensor, mode: FakeTensorMode) -> torch.Tensor:
    """A fake tensor that keeps the batch's values: code that reads them (an attention mask checked
    with `bool(mask.all())`) gets them, while the model's own tensors stay fake. FakeTensorMode keeps
    such "constants" for the tensors it is given this way (an internal of torch's fake tensors)."""
    return mode.fake_tensor_converter.from_real_tensor(mode, tensor, make_constant=True)


def autocast_cpu(dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# -- one rank -------------------------------------------------------------------------------------

class SimulatedStrategy(ComposedStrategy):
    """The composed strategy with its starting weights left out: the model stays on the meta device
    through split, tensor parallel and FSDP2; its parts get fake storage afterwards."""

    def _materialize(self, recipe: Any, model: nn.Module, owner: nn.Module) -> None:
        return None


@dataclass
class RankRun:
    """What every simulated rank shares: the job's settings, the batch and the whole model's shapes."""

    session: Session
    layout: MeshLayout
    mode: FakeTensorMode
    batch: Any  # one pipeline micro-batch (a micro-batch without a pipeline), fake
    reference: Reference
    checked: set[str]
    layer_ranges: list[range]  # layer indices of each stage
    uneven: bool = False  # the last rank run may have cached rank-dependent shapes (fake_pg.forget_rank_caches)

    def run(self, ranks: tuple[int, ...], coordinates: dict[str, int]) -> GroupResult:
        """Simulate ranks[0], standing for `ranks`."""
        from launcher.fake_pg import fake_rank
        from strategies.grads import local

        plan = self.session.plan
        stages = tuple(self.layout.stage_indices(coordinates["pp"])) if plan.pp_degree > 1 else ()
        with fake_rank(ranks[0], plan.world_size):
            try:
                strategy = self._build()
            except Exception as exc:  # the layout cannot even be built on this rank
                self.uneven = True  # what it cached before failing is unknown
                return GroupResult(ranks, coordinates, stages, 0, (failure(ranks, "build", None, None, exc),))
            held = sum(local(p).numel() for p in strategy.module.parameters())
            self.uneven = any(unevenly_sharded(p) for p in strategy.module.parameters())
            names = {m: n for n, m in strategy.module.named_modules() if n}
            indices: list[int | None] = [*stages] or [None]  # no pipeline: the one part is the model
            found = (self._run_stage(strategy, part, i, names, ranks) for part, i in zip(strategy.parts, indices))
            problems = [problem for problem in found if problem is not None]
            if not problems:
                try:
                    with self.mode:
                        strategy.clip_grad_norm(self.session.spec.optimizer.grad_clip)
                        strategy.optimizer_step()
                except Exception as exc:
                    problems.append(failure(ranks, "optimizer step", None, None, exc))
        return GroupResult(ranks, coordinates, stages, held, tuple(problems))

    def _build(self) -> ComposedStrategy:
        """This rank's strategy after `setup`: the meta model split, parallelized and given fake storage."""
        from launcher.components import batch_feed, build_loss, model_factory
        from launcher.optim import optimizer_factory
        from strategies.model_init import ModelRecipe

        spec, plan = self.session.spec, self.session.plan
        strategy = SimulatedStrategy(torch.device("cpu"), spec.training.precision, self.layout, plan.zero_stage,
                                     batch_feed(spec))
        strategy.setup(ModelRecipe(model_factory(spec.model), init="meta", seed=spec.seed),
                       optimizer_factory(spec.optimizer), build_loss(spec.loss))
        with self.mode:
            for part in strategy.parts:
                part.to_empty(device="cpu")
        return strategy

    def _run_stage(self, strategy: ComposedStrategy, part: nn.Module, stage: int | None,
                   names: dict[nn.Module, str], ranks: tuple[int, ...]) -> Problem | None:
        """Forward and backward of one part (a pipeline stage, or the model); the first problem."""
        last = stage is None or stage == self.layout.num_stages - 1
        recorder = Recorder(names, self.checked)
        with self.mode:
            args, kwargs, target = strategy.feed.split(self.batch)
            if stage not in (None, 0):  # what the previous stage sends: the whole model's tensor at the cut
                shape, dtype = self.reference.layer_inputs[self.layer_ranges[stage][0]]
                args, kwargs = (torch.empty(shape, dtype=dtype, requires_grad=True),), {}
            try:
                with recorder.attached(), autocast_cpu(strategy.autocast_dtype):
                    returned = part(*args, **kwargs)
                output = model_output(returned)
            except Exception as exc:
                return failure(ranks, "forward", stage, recorder.innermost, exc)
            mismatch = self._first_mismatch(recorder, stage, tuple(output.shape), last)
            if mismatch is not None:
                return Problem(ranks, "forward", stage, *mismatch)
            try:
                if last:
                    strategy.feed.loss(returned, target, strategy.loss_fn).backward()  # loss: model reads `loss`
                else:
                    output.backward(torch.empty_like(output))
            except Exception as exc:
                return failure(ranks, "backward", stage, None, exc)
        return None

    def _first_mismatch(self, recorder: Recorder, stage: int | None, output: Shape,
                        last: bool) -> tuple[str | None, str] | None:
        """(module, what differs) for the first checked output whose shape is not the whole model's."""
        for name, shape in recorder.outputs.items():
            expected = self.reference.outputs.get(name)
            if expected is not None and shape != expected:
                return name, f"output {list(shape)}, but the whole model's is {list(expected)}"
        if last:
            expected = self.reference.output
        else:
            assert stage is not None  # only a pipeline has stages before the last
            expected = self.reference.layer_inputs[self.layer_ranges[stage + 1][0]][0]
        if output != expected:
            what = "model output" if last else f"stage {stage}'s output (stage {(stage or 0) + 1}'s input)"
            return None, f"{what} {list(output)}, but the whole model's is {list(expected)}"
        return None


def unevenly_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor whose shards differ in size from rank to rank: a sharded dim the product of its mesh
    axes does not divide."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return False
    ways: dict[int, int] = {}
    for axis, placement in enumerate(tensor.placements):
        dim = getattr(placement, "dim", None)  # Shard, and FSDP-over-TP's _StridedShard (not a Shard subclass)
        if dim is not None:
            ways[dim] = ways.get(dim, 1) * tensor.device_mesh.size(axis)
    return any(tensor.shape[dim] % n for dim, n in ways.items())


def failure(ranks: tuple[int, ...], phase: str, stage: int | None, module: str | None, exc: Exception) -> Problem:
    return Problem(ranks, phase, stage, module, one_line(exc), simulated=not _fake_limit(exc))


def _fake_limit(exc: Exception) -> bool:
    """The exception says fake tensors cannot run this (the code reads values), not that the layout is wrong."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedOperatorException,
    )

    return isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException))


# -- the whole job --------------------------------------------------------------------------------

def rank_groups(layout: MeshLayout) -> Iterator[tuple[dict[str, int], tuple[int, ...]]]:
    """(pp, dp_shard, tp coordinates; the ranks there, one per dp_replicate index) in rank order.
    Ranks lie on the mesh row-major over (pp, dp_replicate, dp_shard, tp), as init_device_mesh lays them."""
    pp, rep, shard, tp = layout.pp_degree, layout.dp_replicate_degree, layout.dp_shard_degree, layout.tp_degree
    for p in range(pp):
        for s in range(shard):
            for t in range(tp):
                yield {"pp": p, "dp_shard": s, "tp": t}, tuple(((p * rep + r) * shard + s) * tp + t for r in range(rep))


def simulate(session: Session) -> Simulation:
    """Simulate the session's job at its world size; SimulationUnavailable when nothing can be run."""
    from launcher.fake_pg import FakeBackendMissing, ensure_fake_backend

    try:
        ensure_fake_backend()
    except FakeBackendMissing as exc:
        raise SimulationUnavailable(f"plan --simulate: {exc}") from None
    started = time.perf_counter()
    with _quiet():
        return _simulate(session, started)


def _simulate(session: Session, started: float) -> Simulation:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from launcher.components import batch_feed, build_loss
    from launcher.fake_pg import forget_rank_caches
    from launcher.plan import meta_model
    from launcher.trace import fake_model
    from strategies import data_parallel_layout
    from strategies.layers import find_layers
    from strategies.layout import stage_block_ranges

    spec, plan = session.spec, session.plan
    layout = plan.layout or data_parallel_layout(plan.world_size, plan.zero_stage, spec.model.layers)
    composed = plan.strategy in ("ddp", "zero") and (plan.layout is not None or plan.dp_shard_degree > 1)
    samples = plan.micro_batch_size // (layout.microbatches if plan.pp_degree > 1 else 1)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    batch = _fake_batch(session, samples, mode)
    model = meta_model(spec)
    path, layers = find_layers(model, spec.model.layers) or (None, None)
    checked = checked_modules(model, path, layers)
    feed, whole = batch_feed(spec), tuple(range(plan.world_size))
    autocast = torch.bfloat16 if spec.training.precision == "bf16" else None
    try:
        with mode:
            fake_model(model, mode)
            reference, output = whole_model_reference(model, batch, feed, autocast, checked, path, len(layers or ()))
            if not composed:  # every rank runs this one program: its backward completes the simulation
                feed.loss(output, feed.split(batch)[2], build_loss(spec.loss)).backward()
    except Exception as exc:
        problem = failure(whole, "whole model", None, None, exc)
        return Simulation(plan.world_size, (GroupResult(whole, {}, (), 0, (problem,)),),
                          time.perf_counter() - started, "the whole model on fake tensors (one process)")
    if not composed:
        count = sum(p.numel() for p in model.parameters())
        return Simulation(plan.world_size, (GroupResult(whole, {}, (), count, ()),), time.perf_counter() - started,
                          f"strategy {plan.strategy} without a mesh: every rank runs the whole model, simulated"
                          " once (gradient all-reduce not simulated)")
    ranges = stage_block_ranges(len(layers or ()), layout.num_stages, layout.split_points, path or "") \
        if plan.pp_degree > 1 else []
    runner = RankRun(session, layout, mode, batch, reference, checked, ranges)
    groups = []
    for coordinates, ranks in rank_groups(layout):
        if runner.uneven:
            forget_rank_caches()
        groups.append(runner.run(ranks, coordinates))
    how = (f"fake process group of {plan.world_size} ranks (pp {layout.pp_degree} x dp_replicate"
           f" {layout.dp_replicate_degree} x dp_shard {layout.dp_shard_degree} x tp {layout.tp_degree}), one rank per"
           f" (pp, dp_shard, tp) coordinate, model on fake tensors, a batch of {samples}")
    return Simulation(plan.world_size, tuple(groups), time.perf_counter() - started, how)


def _fake_batch(session: Session, samples: int, mode: FakeTensorMode) -> Any:
    """The training set's first `samples` samples, collated as a launch would, as fake constants."""
    from launcher.components import build_collate
    from launcher.estimate import _default_collate, _sample_batch
    from launcher.trace import NotTraced

    try:
        batch = _sample_batch(session.train_set, samples, build_collate(session.spec.data) or _default_collate)
    except NotTraced as exc:
        raise SimulationUnavailable(f"plan --simulate: {exc}") from None
    return tree_map(lambda tensor: as_constant(tensor, mode), batch)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Torch's notes on the simulated run stay out of the plan's output: DTensor's redistribution
    advice and FSDP's warnings concern a real run's speed, and fake tensors log every failed op with
    its stack, which the simulation reports in one line itself."""
    loggers = [logging.getLogger(name) for name in ("torch.distributed", "torch._subclasses.fake_tensor")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
