"""Weights & Biases: offline (files in `<run>/wandb/`, `wandb sync` uploads them) unless the user's
WANDB_MODE says otherwise; WANDB_PROJECT (default `meshyard`) and WANDB_ENTITY as W&B reads them.
Every launch resumes the one W&B run id kept in `<run>/trackers.json`."""
from __future__ import annotations

import os
import uuid
from typing import Any

from launcher.trackers import TrackerContext, flatten, scalars


class WandbTracker:
    def __init__(self, context: TrackerContext) -> None:
        import wandb

        run_id = context.runs.get("wandb").get("id") or uuid.uuid4().hex[:12]
        context.runs.put("wandb", {"id": run_id})
        self.logged_through = context.logged_through
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "meshyard"), name=context.spec.name, id=run_id, resume="allow",
            dir=str(context.files.path),  # wandb writes into <dir>/wandb/
            mode=None if "WANDB_MODE" in os.environ else "offline",
            # Leave the launch's own output alone: no console capture, W&B's start lines only.
            settings=wandb.Settings(console="off", quiet=True),
        )
        self.run.config.update({**context.hparams, **flatten(context.plan, "plan.")}, allow_val_change=True)

    def log_record(self, record: dict[str, Any]) -> None:
        if record["step"] > self.logged_through:  # W&B steps only increase: an earlier launch's stay
            self.run.log(scalars(record), step=record["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(flatten(summary))
        self.run.finish()
