"""Everything the CLI knows before starting processes: spec, plan, run directory, dry run."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.atomic import write_text_atomic
from launcher.errors import UserError
from launcher.executors.request import Job, LaunchOptions, LaunchRequest
from launcher.plan import Plan, check_model_layout, make_plan, plan_to_json
from launcher.rundir import RunDir
from launcher.spec import JobSpec, load_spec

if TYPE_CHECKING:
    from launcher.autoplan import AutoChoice
    from launcher.estimate import Estimate


@dataclass(frozen=True)
class Session:
    spec: JobSpec
    plan: Plan
    train_set: Any = field(default=None, repr=False, compare=False)  # built once by the checks; the estimate reads it
    auto: AutoChoice | None = field(default=None, repr=False, compare=False)  # what strategy auto chose, and why

    @cached_property
    def estimate(self) -> Estimate | str:
        """What a step will cost each rank (launcher/estimate.py), or why it cannot be estimated."""
        from launcher.estimate import EstimateUnavailable, build_estimate

        if self.auto is not None and self.auto.estimate is not None:
            return self.auto.estimate  # made by auto's search for this very spec and plan
        try:
            return build_estimate(self.spec, self.plan, self.train_set)
        except EstimateUnavailable as exc:
            return str(exc)

    @property
    def run_dir(self) -> Path:
        return Path(self.spec.output.dir).resolve() / self.spec.name

    @property
    def spec_path(self) -> Path:
        return RunDir(self.run_dir).spec

    @property
    def job(self) -> Job:
        return Job(name=self.spec.name, spec_path=self.spec_path, plan=self.plan,
                   max_restarts=self.spec.resources.max_restarts,
                   hang_timeout_s=self.spec.training.collective_timeout_s,
                   checkpoints_kept=self.spec.checkpoint.keep)

    def dry_run(self, options: LaunchOptions) -> LaunchRequest:
        from launcher.executors import get_executor

        return get_executor(options.executor).dry_run(self.job, options)

    def check_before_launch(self) -> None:
        """Checks that need the filesystem: checkpoints to resume from, a distillation teacher."""
        self._check_resume()
        if self.spec.compression.distill is not None:
            from launcher.compression.distill import teacher_checkpoint

            teacher_checkpoint(self.spec.compression.distill.teacher)

    def _check_resume(self) -> None:
        """Refuse to start if the resume setting would lose or misuse checkpoints."""
        from launcher.checkpoint import find_latest, is_complete

        resume = self.spec.checkpoint.resume
        latest = find_latest(RunDir(self.run_dir).checkpoints)
        if resume == "never":
            if latest is not None:
                raise UserError(
                    f"checkpoint.resume=never but {latest} exists; use resume: auto, or another name/output.dir"
                )
            return
        if resume != "auto":
            if not is_complete(Path(resume)):
                raise UserError(f"checkpoint.resume={resume}: not a complete checkpoint directory (no manifest.json)")
            latest = Path(resume)
        if latest is not None:
            from launcher.compat import check_checkpoint_fits  # imports DCP (~1 s): only when resuming

            check_checkpoint_fits(self.spec, latest, self.plan.world_size)

    def preempted_step(self, since: float) -> int | None:
        """The step a preempted launch checkpointed at, if this launch (started at `since`) was preempted."""
        marker = RunDir(self.run_dir).preempted
        if marker.is_file() and marker.stat().st_mtime >= since:
            return int(json.loads(marker.read_text())["step"])
        return None

    def write_spec(self) -> None:
        """The resolved spec and the plan every rank reads: ranks run the plan the user saw instead of
        planning again (the launchers of a multi-node job all write them at once)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.spec_path, json.dumps(self.spec.model_dump(mode="json", by_alias=True), indent=1))
        write_text_atomic(RunDir(self.run_dir).plan, plan_to_json(self.plan))


def prepare(spec_file: str, overrides: list[str]) -> Session:
    """Load and validate the spec, import its targets, and plan (strategy auto: choose the plan, and
    with it the spec the ranks run). Raises UserError on bad input."""
    spec = load_spec(spec_file, overrides)
    cuda = _cuda_available()
    plan = make_plan(spec, cuda_available=cuda)
    from launcher.autoplan import choose_plan, unused_budget_note
    from launcher.components import check_targets
    from launcher.preflight import check_component_kwargs, check_run_dir, check_training_set

    check_targets(spec)
    check_component_kwargs(spec)
    check_model_layout(spec, plan)
    train_set = check_training_set(spec, plan)
    note = unused_budget_note(spec)  # the user's spec: auto's choice names a strategy and keeps the budget
    auto = choose_plan(spec, plan, train_set, cuda) if spec.strategy.name == "auto" else None
    if auto is not None:
        spec, plan = auto.spec, auto.plan
    if note is not None:
        plan = replace(plan, inferred=(*plan.inferred, note))
    session = Session(spec, plan, train_set, auto)
    check_run_dir(spec.output.dir, session.run_dir)
    return session


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
