"""The run directory `<output.dir>/<name>/`: the one place that knows what lives where in it.

docs/checkpoints.md describes the same layout for users. Checkpoint directories inside
`checkpoints/` are launcher/checkpoint.py's business; lock files are launcher/runlock.py's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def spec(self) -> Path:
        """The resolved spec every rank reads (executors hand ranks this file, never env vars)."""
        return self.path / "spec.json"

    @property
    def plan(self) -> Path:
        """The launcher's plan: ranks run it instead of planning again."""
        return self.path / "plan.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def preempted(self) -> Path:
        """Written when a launch stopped for SIGTERM: the step and its checkpoint."""
        return self.path / "preempted.json"

    @property
    def failed(self) -> Path:
        """Written by the launcher when a launch that started the job ended without the job's own end
        record (summary.json): a failed or hung rank, Ctrl-C, or SIGTERM before any checkpoint."""
        return self.path / "failed.json"

    @property
    def plot(self) -> Path:
        """`meshyard plot`'s default output."""
        return self.path / "plot.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs(self) -> Path:
        """torchrun's per-attempt error files (what the failure report is built from); Ray's log."""
        return self.path / "logs"

    @property
    def ray_log(self) -> Path:
        """Ray's own output (ray executor): its driver-side log and what its processes print,
        other than the ranks' console lines."""
        return self.logs / "ray.log"

    @property
    def consoles(self) -> Path:
        """Each rank's stdout and stderr under Ray, which the launcher relays to its own (ray executor)."""
        return self.logs / "console"

    @property
    def heartbeats(self) -> Path:
        return self.path / "heartbeats"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def quantized(self) -> Path:
        return self.path / "quantized"

    @property
    def ray_storage(self) -> Path:
        """Ray Train's RunConfig storage (ray executor)."""
        return self.path / "ray"

    @property
    def accelerate_config(self) -> Path:
        """The generated accelerate config (accelerate executor)."""
        return self.path / "accelerate_config.yaml"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (observe.trackers: tensorboard); every launch appends here."""
        return self.path / "tensorboard"

    @property
    def mlflow_db(self) -> Path:
        """MLflow's default tracking store (observe.trackers: mlflow, no mlflow_tracking_uri)."""
        return self.path / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        """Artifacts (plan.json, summary.json) of MLflow runs in the default store."""
        return self.path / "mlruns"

    @property
    def wandb(self) -> Path:
        """W&B's files (offline runs): wandb.init(dir=<run>) writes them here."""
        return self.path / "wandb"

    @property
    def tracker_runs(self) -> Path:
        """Which tracker run each tracker writes to, so a resumed launch continues it."""
        return self.path / "trackers.json"

    def profile_trace(self, rank: int) -> Path:
        """torch.profiler's Chrome trace of this rank (observe.profile)."""
        return self.path / "profile" / f"rank{rank}.json"

    def prune_report(self, rank: int) -> Path:
        return self.path / f"prune_rank{rank}.json"

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir:
        """The run a checkpoint directory (`<run>/checkpoints/step_*`) belongs to."""
        return cls(checkpoint.parent.parent)
