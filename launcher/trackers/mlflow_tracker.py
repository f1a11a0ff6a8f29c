"""MLflow: one MLflow run per meshyard run, reopened by every launch (its id is in `<run>/trackers.json`).

The default store is `sqlite:///<run>/mlflow.db`, artifacts in `<run>/mlruns`: MLflow 3 refuses its
old file store (`./mlruns`) unless MLFLOW_ALLOW_FILE_STORE is set, and keeps it in maintenance mode.
"""
from __future__ import annotations

import os
import time
from typing import Any

from launcher.spec.schema import ObserveSpec
from launcher.trackers import Scalar, TrackerContext, scalars

MAX_BATCH = 100  # params or tags per log_batch call (MLflow's limit)
MAX_VALUE = 6000  # characters of a param value (MLflow's limit)


class MLflowTracker:
    def __init__(self, context: TrackerContext) -> None:
        from mlflow.tracking import MlflowClient

        observe = context.spec.observe
        uri = observe.mlflow_tracking_uri or f"sqlite:///{context.files.mlflow_db}"
        self.client = MlflowClient(tracking_uri=uri)
        self.logged_through = context.logged_through
        known = context.runs.get("mlflow")
        if known.get("tracking_uri") == uri and self._reopen(known["run_id"]):
            self.run_id = known["run_id"]
        else:
            artifacts = None if observe.mlflow_tracking_uri else context.files.mlflow_artifacts.as_uri()
            experiment_id = self._experiment(observe, artifacts)
            self.run_id = self.client.create_run(experiment_id, run_name=context.spec.name).info.run_id
            context.runs.put("mlflow", {"tracking_uri": uri, "run_id": self.run_id})
        self._log_params(context.hparams)
        self.client.log_dict(self.run_id, context.plan, "plan.json")

    def _reopen(self, run_id: str) -> bool:
        """Marks the remembered run running again; False when the store no longer has it (deleted)."""
        from mlflow.exceptions import MlflowException

        try:
            if self.client.get_run(run_id).info.lifecycle_stage != "active":
                return False
        except MlflowException:
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def _experiment(self, observe: ObserveSpec, artifacts: str | None) -> str:
        experiment = self.client.get_experiment_by_name(observe.mlflow_experiment)
        if experiment is not None:
            return str(experiment.experiment_id)
        return self.client.create_experiment(observe.mlflow_experiment, artifact_location=artifacts)

    def _log_params(self, hparams: dict[str, Scalar]) -> None:
        """Params are write-once in MLflow: a launch that changed one (e.g. --set training.stop_at_step)
        records its value as the tag `changed.<key>`."""
        from mlflow.entities import Param, RunTag

        logged = self.client.get_run(self.run_id).data.params
        values = {key: str(value)[:MAX_VALUE] for key, value in hparams.items()}
        params = [Param(k, v) for k, v in values.items() if k not in logged]
        tags = [RunTag(f"changed.{k}", v) for k, v in values.items() if k in logged and logged[k] != v]
        for start in range(0, len(params), MAX_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MAX_BATCH])
        for start in range(0, len(tags), MAX_BATCH):
            self.client.log_batch(self.run_id, tags=tags[start:start + MAX_BATCH])

    def log_record(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = record["step"]
        if step <= self.logged_through:  # MLflow cannot delete points: an earlier launch's stay
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, Any]) -> None:
        self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_terminated(self.run_id, "KILLED" if summary["preempted"] else "FINISHED")


def end_abandoned_run(ids: dict[str, str], status: str) -> None:
    """Mark the run of a launch that died before its summary (rank 0 never called `finish`) as
    `status` (FAILED, KILLED), as a dead run should show in MLflow's UI; a run that ended is left.
    Called by the launcher once, at its end: a tracking server that does not answer costs one try,
    not MLflow's default retries with back-off (minutes)."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    if client.get_run(ids["run_id"]).info.status == "RUNNING":
        client.set_terminated(ids["run_id"], status)
