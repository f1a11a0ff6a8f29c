"""What `meshyard plan` prints: the plan, its per-rank estimate, the predicted step time and the
dry run, as text for people or as JSON for scripts (bytes as integers)."""
from __future__ import annotations

import dataclasses
from typing import Any

from launcher.estimate import Estimate
from launcher.executors.request import LaunchRequest
from launcher.session import Session
from launcher.steptime import StepTime, predict_step_time


def step_time(session: Session) -> StepTime | str:
    if isinstance(session.estimate, str):
        return "needs the estimate"
    return predict_step_time(session.estimate, session.plan, session.spec.training.precision)


def plan_text(session: Session, request: LaunchRequest) -> str:
    estimate, step = session.estimate, step_time(session)
    return "\n".join([
        session.plan.describe(),
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
        "run_dir": str(session.run_dir),
        "dry_run": dataclasses.asdict(request),
    }
