"""The plans `strategy: auto` compares: each is the user's spec with a few settings changed, planned and
estimated exactly as `meshyard plan` does a spec that names it (make_plan, check_model_layout,
build_estimate: meta device and fake tensors, no processes), then ranked cheapest first.

Candidates are built along `AXES`, each adding its options to every candidate so far: the mesh
(tensor x pipeline degrees), then the data-parallel strategy for the data-parallel ranks it leaves,
then activation checkpointing (none, full), which ranks after every plan without it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from launcher.errors import PlanError, UserError
from launcher.estimate import Estimate, EstimateUnavailable, TraceCache, build_estimate, human_bytes
from launcher.plan import Plan, check_model_layout, make_plan, meta_model
from launcher.profile import Measured
from launcher.spec import JobSpec, validate_spec
from launcher.steptime import StepTime, predict_step_time

Settings = dict[str, Any]  # dotted spec field -> value
Axis = Callable[[JobSpec, int, Settings], list[tuple[str, Settings]]]


@dataclass(frozen=True)
class Candidate:
    label: str
    settings: tuple[tuple[str, Any], ...]  # dotted spec fields it sets

    def describe_settings(self) -> str:
        return ", ".join(f"{key} = {value}" for key, value in self.settings)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def mesh_options(spec: JobSpec, world: int, chosen: Settings) -> list[tuple[str, Settings]]:
    """Tensor x pipeline degrees whose product divides the world size; only the user's mesh if they set one."""
    par = spec.parallel
    if (par.data, par.tensor, par.pipeline) != (-1, 1, 1):
        return [("", {})]
    accum = spec.training.grad_accum_steps
    options: list[tuple[str, Settings]] = []
    for tp in divisors(world):
        for pp in divisors(world // tp):
            label = " x ".join(f"{name} {degree}" for name, degree in (("tensor", tp), ("pipeline", pp)) if degree > 1)
            # fewer data-parallel ranks: more micro-batches per step keep the user's global batch
            options.append((label, {} if tp * pp == 1 else {"parallel.tensor": tp, "parallel.pipeline": pp,
                                                               "training.grad_accum_steps": accum * tp * pp}))
    return options


def strategy_options(spec: JobSpec, world: int, chosen: Settings) -> list[tuple[str, Settings]]:
    """ddp and ZeRO 1-3 over the data-parallel ranks the mesh leaves (beside tensor or pipeline parallel,
    data parallel is FSDP2: replicate as ddp, or shard as ZeRO 2/3)."""
    if world == 1:
        return [("single", {"strategy.name": "single"})]
    model_degree = chosen.get("parallel.tensor", spec.parallel.tensor) * chosen.get(
        "parallel.pipeline", spec.parallel.pipeline)
    data = spec.parallel.data if spec.parallel.data != -1 else max(1, world // model_degree)
    if data == 1:
        return [("", {"strategy.name": "ddp"})]
    stages = (1, 2, 3) if model_degree == 1 else (2, 3)
    return [("ddp", {"strategy.name": "ddp"}),
            *((f"zero {s}", {"strategy.name": "zero", "strategy.stage": s}) for s in stages)]


CHECKPOINTING = "ac"  # the label of activation checkpointing's option (training.activation_checkpointing full)


def checkpointing_options(spec: JobSpec, world: int, chosen: Settings) -> list[tuple[str, Settings]]:
    """Without, then with activation checkpointing of every repeated layer (`full`): memory for ~1.3-1.7x compute
    (each layer's forward again in backward). Only for a model with a layer list, and a spec that leaves it `none`."""
    if spec.training.activation_checkpointing != "none" or layer_count(spec) is None:
        return [("", {})]
    return [("", {}), (CHECKPOINTING, {"training.activation_checkpointing": "full"})]


AXES: tuple[Axis, ...] = (mesh_options, strategy_options, checkpointing_options)


def candidates(spec: JobSpec, world: int, axes: tuple[Axis, ...] = AXES) -> list[Candidate]:
    built: list[tuple[str, Settings]] = [("", {})]
    for axis in axes:
        built = [(" + ".join(filter(None, (label, more))), {**settings, **extra})
                 for label, settings in built for more, extra in axis(spec, world, settings)]
    return [Candidate(label, tuple(settings.items())) for label, settings in built]


def with_settings(spec: JobSpec, settings: tuple[tuple[str, Any], ...]) -> JobSpec:
    """The spec with `settings` changed, validated again (a combination the schema refuses is a SpecError)."""
    raw = spec.model_dump(mode="json", by_alias=True)
    for key, value in settings:
        section, name = key.split(".")
        raw[section][name] = value
    return validate_spec(raw)


@dataclass(frozen=True)
class Outcome:
    """One candidate, planned and estimated; `rejected` says why it cannot be chosen (None: it fits)."""

    candidate: Candidate
    spec: JobSpec | None = None
    plan: Plan | None = None
    estimate: Estimate | None = None
    step_time_s: float | None = None
    rejected: str | None = None

    @property
    def peak_bytes(self) -> int | None:
        return None if self.estimate is None else self.estimate.predicted_peak_bytes_per_rank

    @property
    def moved_bytes(self) -> int | None:
        """Collective payload per step of the rank that moves most."""
        if self.estimate is None:
            return None
        return max(sum(rank.collective_bytes.values()) for rank in self.estimate.ranks)

    @property
    def fits(self) -> bool:
        return self.estimate is not None and self.rejected is None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.candidate.label, "settings": dict(self.candidate.settings),
                "predicted_peak_bytes_per_rank": self.peak_bytes, "predicted_step_time_s": self.step_time_s,
                "moved_bytes_per_step": self.moved_bytes, "fits": self.fits, "rejected": self.rejected}


@dataclass(frozen=True)
class Search:
    """What every candidate is judged by: the user's spec, this host, the budget, the machine profile."""

    spec: JobSpec
    cuda: bool
    train_set: Any
    budget_bytes: int
    measured: Measured | None = None  # step times are predicted only with one
    layer_count: int | None = None  # the model's repeated layers, for even pipeline splits
    traces: TraceCache = field(default_factory=dict, compare=False)  # shared by candidates that trace the same

    def evaluate(self, candidate: Candidate) -> Outcome:
        try:
            spec = with_settings(self.spec, candidate.settings)
            plan = make_plan(spec, self.cuda)
            check_model_layout(spec, plan)
            self._check_even_split(candidate, plan)
            estimate = build_estimate(spec, plan, self.train_set, traces=self.traces)
        except (UserError, EstimateUnavailable) as exc:
            return Outcome(candidate, rejected=str(exc))
        step = predict_step_time(estimate, plan, spec.training.precision, self.measured) if self.measured else None
        peak = estimate.predicted_peak_bytes_per_rank
        over = f"over budget by {human_bytes(peak - self.budget_bytes)}" if peak > self.budget_bytes else None
        seconds = step.predicted_step_time_s if isinstance(step, StepTime) else None
        return Outcome(candidate, spec, plan, estimate, seconds, over)

    def _check_even_split(self, candidate: Candidate, plan: Plan) -> None:
        """Auto proposes pipelines that split the layers evenly (a user's own mesh may split them as it likes)."""
        layers = self.layer_count
        if "parallel.pipeline" in dict(candidate.settings) and layers is not None and layers % plan.pp_degree:
            raise PlanError(f"pipeline {plan.pp_degree} does not divide the model's {layers} layers")


# The model's repeated layers by its `model` section: every candidate of a search asks, and all build the same model.
_LAYER_COUNTS: dict[str, int | None] = {}


def layer_count(spec: JobSpec) -> int | None:
    from strategies.layers import find_layers

    key = spec.model.model_dump_json()
    if key not in _LAYER_COUNTS:
        try:
            found = find_layers(meta_model(spec), spec.model.layers)
        except (PlanError, ValueError):
            found = None
        _LAYER_COUNTS[key] = len(found[1]) if found is not None else None
    return _LAYER_COUNTS[key]


def rank_key(outcome: Outcome, index: int, by_time: bool) -> tuple[int, bool, float, int, int, int]:
    """Cheapest first: plans without auto's activation checkpointing (its recompute costs ~1.3-1.7x compute), then
    predicted step time (with a machine profile), then fewer tensor x pipeline ranks, then fewer bytes moved per
    step, then the order candidates were made in (ddp, zero 1, 2, 3); unestimated last."""
    if outcome.plan is None or outcome.estimate is None:
        return (1, False, 0.0, 0, 0, index)
    recomputes = "training.activation_checkpointing" in dict(outcome.candidate.settings)
    seconds = outcome.step_time_s if by_time and outcome.step_time_s is not None else 0.0
    return (0, recomputes, seconds, outcome.plan.tp_degree * outcome.plan.pp_degree, outcome.moved_bytes or 0, index)


def ranked(outcomes: list[Outcome], by_time: bool) -> list[Outcome]:
    return [o for i, o in sorted(enumerate(outcomes), key=lambda item: rank_key(item[1], item[0], by_time))]
