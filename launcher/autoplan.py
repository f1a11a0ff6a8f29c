"""`strategy: auto`: the cheapest plan whose predicted peak memory per rank fits the budget.

The budget is `resources.memory_per_rank`, or by default the GPU's memory (on CPU host RAM / the
node's processes) x SAFETY_MARGIN. It is compared with the estimate's predicted peak: what training
adds to a rank (model state, activations, buffers), not the process's own footprint. The candidates
(launcher/candidates.py) are ranked cheapest first and the first that fits is chosen; its spec and
plan are what the ranks receive (session.py writes both into the run directory, and ranks do not plan
again). When none fits, the plan error says by how much and what would fit, each option estimated.
docs/planning.md, "strategy: auto".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from launcher.candidates import CHECKPOINTING, Candidate, Outcome, Search, candidates, divisors, layer_count, ranked
from launcher.errors import PlanError
from launcher.estimate import Estimate, EstimateUnavailable, build_estimate, human_bytes
from launcher.plan import Plan
from launcher.profile import Measured, load_measured
from launcher.spec import JobSpec

SAFETY_MARGIN = 0.8  # of detected memory: the process's own footprint, allocator slack, transients not estimated
QUICK_SHARE = 0.5  # no budget of the user's: the base plan is kept unsearched while its model state is under this share
MORE_RANKS = (2, 4, 8, 16, 32, 64)  # multiples of the node count tried for the "more ranks" hint


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # "resources.memory_per_rank", or how the default was detected
    explicit: bool = False  # the user's, not detected

    def describe(self) -> str:
        return f"{human_bytes(self.bytes)} per rank ({self.source})"


def detected_budget(device: str, procs_per_node: int) -> Budget:
    """The default: the smallest visible GPU's memory, or on CPU host RAM shared by the node's ranks, x the margin."""
    if device == "cuda":
        import torch

        total = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
        what = f"GPU memory {human_bytes(total)}"
    else:
        import psutil

        ram = psutil.virtual_memory().total
        total, what = ram // procs_per_node, f"host RAM {human_bytes(ram)} / {procs_per_node} process(es)"
    return Budget(int(total * SAFETY_MARGIN), f"default: {what} x {SAFETY_MARGIN}")


@dataclass(frozen=True)
class AutoChoice:
    """What auto chose and why; `outcomes` (cheapest first) is empty when no search was needed."""

    spec: JobSpec
    plan: Plan
    chosen: str  # the candidate's label (the base plan's strategy when nothing was searched)
    why: str
    budget: Budget | None = None
    estimate: Estimate | None = None  # the chosen plan's, when the search made it
    outcomes: tuple[Outcome, ...] = ()
    ranked_by: str = ""

    def describe(self) -> str:
        budget = self.budget.describe() if self.budget is not None else "none"
        lines = [f"auto             {self.why}", f"budget           {budget}"]
        if self.outcomes:
            lines.append(f"ranked by        {self.ranked_by}")
            lines += outcome_table(self.outcomes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "why": self.why, "budget_bytes": self.budget.bytes if self.budget else None,
                "budget_source": self.budget.source if self.budget else None, "searched": bool(self.outcomes),
                "ranked_by": self.ranked_by or None, "candidates": [o.to_dict() for o in self.outcomes]}


def outcome_table(outcomes: tuple[Outcome, ...]) -> list[str]:
    """One line per candidate, cheapest first; the first that fits is the one chosen."""
    chosen = next((o for o in outcomes if o.fits), None)
    lines = [f"  {'candidate':<28} {'peak/rank':>10} {'step time':>10} {'moved/step':>11}  verdict"]
    for o in outcomes:
        if o is chosen:
            verdict = "chosen"
        elif o.fits and chosen is not None:
            verdict = f"fits; ranked after {chosen.candidate.label}"
        else:
            verdict = f"{'' if o.estimate is not None else 'rejected: '}{o.rejected}"
        peak = human_bytes(o.peak_bytes) if o.peak_bytes is not None else "-"
        step = f"{1000 * o.step_time_s:.1f} ms" if o.step_time_s is not None else "-"
        moved = human_bytes(o.moved_bytes) if o.moved_bytes is not None else "-"
        lines.append(f"  {o.candidate.label:<28} {peak:>10} {step:>10} {moved:>11}  {verdict}")
    return lines


class NoPlanFits(PlanError):
    """No candidate fits the budget; carries the ranked candidates for `meshyard plan --explain`."""

    def __init__(self, message: str, outcomes: tuple[Outcome, ...], ranked_by: str) -> None:
        self.outcomes, self.ranked_by = outcomes, ranked_by
        super().__init__(message)


def choose_plan(spec: JobSpec, base: Plan, train_set: Any, cuda: bool) -> AutoChoice:
    """The plan for `strategy: auto`; `base` is make_plan's (single for one process, else ddp)."""
    given = spec.resources.memory_per_rank
    if given is None and spec.resources.nodes > 1:
        return _kept(spec, base, "no resources.memory_per_rank, and each node's launcher plans alone, so a budget"
                                 " detected on one node cannot choose for all")
    budget = Budget(int(given), "resources.memory_per_rank", explicit=True) if given is not None else detected_budget(
        base.device, spec.resources.procs_per_node)
    if not budget.explicit:
        quick = _quick(spec, base, train_set, budget)
        if quick is not None:
            return quick
    # several nodes plan alone, each with its own host's profile: they rank without one, so they agree
    measured = load_measured(base.backend, base.world_size) if base.nodes == 1 else None
    return _search(Search(spec, cuda, train_set, budget.bytes, measured, layer_count(spec)), base, budget)


def _quick(spec: JobSpec, base: Plan, train_set: Any, budget: Budget) -> AutoChoice | None:
    """The unsearched default: ZeRO shards only model state, so while the base plan's is a small share of a
    detected budget, sharding it cannot be what makes a run fit (and tracing would cost every launch ~1 s)."""
    try:
        state = build_estimate(spec, base, train_set, trace=False).predicted_peak_bytes_per_rank
    except EstimateUnavailable as exc:
        return _kept(spec, base, f"no memory check ({exc})", budget)
    if state > budget.bytes * QUICK_SHARE:
        return None
    return _kept(spec, base, f"its model state and buffers ({human_bytes(state)}) are under half the budget, so no"
                             " other plan was compared (resources.memory_per_rank makes auto compare them)", budget)


def _kept(spec: JobSpec, base: Plan, why: str, budget: Budget | None = None) -> AutoChoice:
    """The base plan, unsearched, with the reason in its inferred values."""
    where = f"; budget {budget.describe()}" if budget is not None else ""
    plan = dataclasses.replace(base, inferred=(*base.inferred, f"auto kept {base.strategy}: {why}{where}"))
    return AutoChoice(spec, plan, base.strategy, f"{base.strategy}: {why}", budget)


def _search(search: Search, base: Plan, budget: Budget) -> AutoChoice:
    outcomes = [search.evaluate(c) for c in candidates(search.spec, base.world_size)]
    by_time = search.measured is not None and all(o.step_time_s is not None for o in outcomes if o.estimate)
    order = tuple(ranked(outcomes, by_time))
    how = _ranked_by(base, search.measured if by_time else None)
    chosen = next((o for o in order if o.fits), None)
    if chosen is None or chosen.plan is None or chosen.spec is None:
        raise NoPlanFits(shortfall(search, order, budget), order, how)
    label = chosen.candidate.label
    why = (f"{label}: the cheapest of {len(order)} candidates whose predicted peak"
           f" ({human_bytes(chosen.peak_bytes or 0)}) fits the budget")
    note = f"auto chose {label}: {chosen.candidate.describe_settings()} (`meshyard plan --explain`)"
    plan = dataclasses.replace(chosen.plan, inferred=(note, *chosen.plan.inferred))
    return AutoChoice(chosen.spec, plan, label, why, budget, chosen.estimate, order, how)


def _ranked_by(base: Plan, measured: Measured | None) -> str:
    if measured is not None:
        return f"predicted step time (machine profile {measured.key}, measured {measured.measured_at})"
    why = ("several nodes: host profiles are not used" if base.nodes > 1 else
           f"no machine profile for {base.backend}/{base.world_size}: meshyard calibrate --procs {base.world_size}")
    return f"data-parallel plans first, then fewest bytes moved per step ({why})"


def shortfall(search: Search, order: tuple[Outcome, ...], budget: Budget) -> str:
    """The plan error when nothing fits: by how much, and what would (each option estimated)."""
    estimated = [o for o in order if o.estimate is not None]
    if not estimated:
        first = order[0].rejected if order else "there are none"
        return f"strategy auto: no candidate plan could be estimated; the first: {first}"
    best = min(estimated, key=lambda o: o.peak_bytes or 0)
    peak = best.peak_bytes or 0
    hints = [hint for hint in (_more_ranks(search), _smaller_micro_batch(search, best), _checkpointing(search, best))
             if hint] or ["nothing auto can change: a larger resources.memory_per_rank, or a smaller model"]
    if not budget.explicit:
        hints.append("or a budget of your own (resources.memory_per_rank), or a named strategy: only auto checks one")
    return "\n".join([f"strategy auto: no plan fits {budget.describe()}: the smallest predicted peak is"
                      f" {best.candidate.label}'s, {human_bytes(peak)} ({human_bytes(peak - budget.bytes)} over)."
                      " What would fit:", *(f"  {hint}" for hint in hints),
                      "  (meshyard plan SPEC --explain lists every candidate)"])


def _more_ranks(search: Search) -> str | None:
    """ZeRO-3 over more nodes like these (the budget is per rank, so nodes, not processes per node)."""
    res = search.spec.resources
    for factor in MORE_RANKS:
        nodes = res.nodes * factor
        outcome = search.evaluate(Candidate(f"zero 3 over {nodes * res.procs_per_node} ranks", (
            ("resources.nodes", nodes), ("strategy.name", "zero"), ("strategy.stage", 3))))
        if outcome.fits:
            return (f"more ranks: {outcome.candidate.label} (resources.nodes {nodes}), predicted"
                    f" {human_bytes(outcome.peak_bytes or 0)} per rank")
    return None


def _smaller_micro_batch(search: Search, best: Outcome) -> str | None:
    """The best candidate with the largest smaller micro-batch that fits, accumulating more to keep the global batch."""
    assert best.spec is not None and best.estimate is not None  # only estimated outcomes are the best
    micro, accum = best.spec.data.micro_batch_size, best.spec.training.grad_accum_steps
    activations = max(rank.activation_bytes or 0 for rank in best.estimate.ranks)
    if activations < (best.peak_bytes or 0) - search.budget_bytes:
        return None  # even none would not fit
    for size in sorted(divisors(micro)[:-1], reverse=True):
        settings = {**dict(best.candidate.settings), "data.micro_batch_size": size,
                    "training.grad_accum_steps": accum * (micro // size)}
        outcome = search.evaluate(Candidate(best.candidate.label, tuple(settings.items())))
        if outcome.fits:
            return (f"a smaller micro-batch: {best.candidate.label} with data.micro_batch_size {size} and"
                    f" training.grad_accum_steps {settings['training.grad_accum_steps']} (the same global batch),"
                    f" predicted {human_bytes(outcome.peak_bytes or 0)} per rank")
    return None


def _checkpointing(search: Search, best: Outcome) -> str | None:
    """The best candidate with every repeated layer checkpointed, when it is not already (the spec sets a policy of
    its own, or auto's checkpointing candidates were rejected) and that fits."""
    assert best.spec is not None  # only estimated outcomes are the best
    if best.spec.training.activation_checkpointing == "full" or layer_count(search.spec) is None:
        return None
    settings = {**dict(best.candidate.settings), "training.activation_checkpointing": "full"}
    outcome = search.evaluate(Candidate(f"{best.candidate.label} + {CHECKPOINTING}", tuple(settings.items())))
    if not outcome.fits:
        return None
    return (f"activation checkpointing: {outcome.candidate.label} (training.activation_checkpointing full: each"
            f" layer's forward again in backward), predicted {human_bytes(outcome.peak_bytes or 0)} per rank")


def unused_budget_note(spec: JobSpec) -> str | None:
    """A budget beside a strategy the user named does nothing: say so (auto is the only planner that reads it)."""
    if spec.resources.memory_per_rank is None or spec.strategy.name == "auto":
        return None
    return f"resources.memory_per_rank not used (strategy.name = {spec.strategy.name}; only auto plans against it)"
