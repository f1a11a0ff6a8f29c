"""Experiment trackers fed from the logging rank's one stream of records (metrics.jsonl is the other
reader). Each tracker is an optional extra, registered by name and imported only when the spec names it.

What every tracker receives: the resolved spec as flat hyperparameters and the plan when a launch
starts, each logged record, and the summary when it ends. A resumed launch continues the same
tracker run; where each tracker's run is remembered is `<run>/trackers.json`.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from launcher.atomic import write_text_atomic
from launcher.errors import PlanError
from launcher.metrics import read_metrics
from launcher.rundir import RunDir
from launcher.spec.schema import JobSpec, ObserveSpec

if TYPE_CHECKING:  # launcher.plan imports this module for its install check
    from launcher.plan import Plan

Scalar = bool | int | float | str

# name -> (the "module:Class" that opens it, the packages that class imports). `jsonl` (metrics.jsonl)
# is always written by launcher/metrics.py and needs no entry.
REGISTRY: dict[str, tuple[str, tuple[str, ...]]] = {
    "tensorboard": ("launcher.trackers.tensorboard_tracker:TensorBoardTracker", ("tensorboard",)),
    "mlflow": ("launcher.trackers.mlflow_tracker:MLflowTracker", ("mlflow",)),
    "wandb": ("launcher.trackers.wandb_tracker:WandbTracker", ("wandb",)),
}


class Tracker(Protocol):
    def log_record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (its `step` is the x axis)."""

    def finish(self, summary: dict[str, Any]) -> None:
        """The run summary; then flush and release the tracker run."""


@dataclasses.dataclass(frozen=True)
class TrackerRuns:
    """`<run>/trackers.json`: tracker name -> what identifies its run (e.g. MLflow's URI and run id)."""

    path: Path

    def get(self, tracker: str) -> dict[str, str]:
        if not self.path.is_file():
            return {}
        return dict(json.loads(self.path.read_text()).get(tracker, {}))

    def put(self, tracker: str, ids: dict[str, str]) -> None:
        every = json.loads(self.path.read_text()) if self.path.is_file() else {}
        write_text_atomic(self.path, json.dumps({**every, tracker: ids}, indent=1))


@dataclasses.dataclass(frozen=True)
class TrackerContext:
    """What a tracker opens its run with."""

    spec: JobSpec
    files: RunDir
    runs: TrackerRuns
    start_step: int  # the step this launch resumed from (0: a fresh run)
    # The last step an earlier launch logged. Past start_step when that launch died after its last
    # checkpoint: trackers that cannot delete points (MLflow, W&B) skip those steps, so each shows once.
    logged_through: int
    hparams: dict[str, Scalar]
    plan: dict[str, Any]


def required_modules(observe: ObserveSpec, tracker: str) -> tuple[str, ...]:
    """What `tracker` imports: MLflow's default sqlite store also needs SQLAlchemy and Alembic."""
    modules = REGISTRY[tracker][1] if tracker in REGISTRY else ()
    if tracker == "mlflow" and observe.mlflow_tracking_uri is None:
        modules += ("sqlalchemy", "alembic")
    return modules


def check_trackers_installed(observe: ObserveSpec) -> None:
    """Refuse, before any process starts, a tracker whose package is missing (one line, the fix)."""
    for tracker in observe.trackers:
        missing = [m for m in required_modules(observe, tracker) if not _importable(m)]
        if missing:
            raise PlanError(f"observe.trackers: {tracker} needs {', '.join(missing)}, not installed;"
                            f" pip install 'meshyard[{tracker}]' (with constraints.txt), or drop {tracker}")


def tracker_defaults(observe: ObserveSpec) -> list[str]:
    """Where the named trackers write when the user did not say, for the plan's `inferred` lines."""
    said = []
    if "mlflow" in observe.trackers and observe.mlflow_tracking_uri is None:
        said.append("observe.mlflow_tracking_uri = sqlite:///<run>/mlflow.db, artifacts in <run>/mlruns (null)")
    if "wandb" in observe.trackers and "WANDB_MODE" not in os.environ:
        said.append("W&B mode = offline, files in <run>/wandb (WANDB_MODE not set)")
    return said


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that cannot be imported, or a module set to None
        return False


def open_trackers(spec: JobSpec, plan: Plan, run_dir: Path, start_step: int) -> list[Tracker]:
    """The spec's trackers, each on its run (continued when `<run>/trackers.json` names one), with
    this launch's spec and plan already sent. Call on the logging rank only, before MetricsLogger
    drops the records past `start_step` from metrics.jsonl (they tell what an earlier launch logged)."""
    files = RunDir(run_dir)
    context = TrackerContext(
        spec=spec, files=files, runs=TrackerRuns(files.tracker_runs), start_step=start_step,
        logged_through=max((m["step"] for m in read_metrics(run_dir)), default=0),
        hparams=flatten(spec.model_dump(mode="json", by_alias=True)), plan=dataclasses.asdict(plan),
    )
    trackers: list[Tracker] = []
    for name in spec.observe.trackers:
        if name in REGISTRY:
            module, cls = REGISTRY[name][0].split(":")
            trackers.append(cast(Tracker, getattr(importlib.import_module(module), cls)(context)))
    return trackers


def end_abandoned_runs(run_dir: Path, killed: bool) -> None:
    """A launch that ended without the job's summary leaves its tracker runs as the dead rank 0 left
    them: MLflow's still RUNNING. The launcher ends them (KILLED when stopped by a signal, FAILED
    otherwise); a tracker that fails to answer is named on stderr and does not change the exit code.
    TensorBoard has no run state; W&B's offline run file is closed by the dying process itself."""
    ids = TrackerRuns(RunDir(run_dir).tracker_runs).get("mlflow")
    if not ids or not _importable("mlflow"):
        return
    from launcher.trackers.mlflow_tracker import end_abandoned_run

    try:
        end_abandoned_run(ids, "KILLED" if killed else "FAILED")
    except Exception as exc:  # noqa: BLE001  (any tracker failure: reported, the launch's own error stands)
        print(f"warning: could not mark the MLflow run {ids['run_id']} ended: {type(exc).__name__}: {exc}",
              file=sys.stderr)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers, `step` aside; true/false as 1/0, nulls (e.g. an engine's grad_norm) left out."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float))}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}; lists and nulls as JSON text (trackers
    take scalars only), empty mappings as "{}"."""
    flat: dict[str, Scalar] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat
