"""What `meshyard plan` prints: the plan, its per-rank estimate, the predicted step time and the
dry run, as text for people or as JSON for scripts (bytes as integers)."""
from __future__ import annotations

import dataclasses
from typing import Any

from launcher.autoplan import NoPlanFits, outcome_table
from launcher.estimate import Estimate
from launcher.executors.request import LaunchRequest
from launcher.session import Session
from launcher.steptime import StepTime, predict_step_time


def step_time(session: Session) -> StepTime | str:
    if isinstance(session.estimate, str):
        return "needs the estimate"
    return predict_step_time(session.estimate, session.plan, session.spec.training.precision)


def plan_text(session: Session, request: LaunchRequest, explain: bool = False) -> str:
    estimate, step = session.estimate, step_time(session)
    auto = session.auto.describe() if session.auto is not None else (
        f"auto             not asked for (strategy.name = {session.spec.strategy.name})")
    return "\n".join([
        session.plan.describe(),
        *([auto] if explain else []),
        estimate.describe() if isinstance(estimate, Estimate) else f"estimate         not available ({estimate})",
        step.describe() if isinstance(step, StepTime) else f"step time        not predicted: {step}",
        f"run directory    {session.run_dir}",
        f"{request.executor} executor would run:",
        request.render(),
    ])


def plan_json(session: Session, request: LaunchRequest) -> dict[str, Any]:
    estimate, step = session.estimate, step_time(session)
    return {
        "plan": dataclasses.asdict(session.plan),
        "estimate": estimate.to_dict() if isinstance(estimate, Estimate) else {"unavailable": estimate},
        "step_time": step.to_dict() if isinstance(step, StepTime) else {"unavailable": step},
        "auto": session.auto.to_dict() if session.auto is not None else None,
        "run_dir": str(session.run_dir),
        "dry_run": dataclasses.asdict(request),
    }


def explain_text(exc: NoPlanFits) -> str:
    """`--explain` when no candidate fits: the ranked candidates (the error follows on stderr)."""
    return "\n".join([f"ranked by        {exc.ranked_by}", *outcome_table(exc.outcomes)])


def no_plan_fits_json(exc: NoPlanFits) -> dict[str, Any]:
    return {"error": str(exc), "auto": {"searched": True, "chosen": None, "ranked_by": exc.ranked_by,
                                        "candidates": [o.to_dict() for o in exc.outcomes]}}
