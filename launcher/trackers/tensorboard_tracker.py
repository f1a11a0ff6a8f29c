"""TensorBoard: one event directory per run, `<run>/tensorboard/`, that every launch appends to."""
from __future__ import annotations

import json
from typing import Any

from launcher.trackers import TrackerContext, scalars


class TensorBoardTracker:
    def __init__(self, context: TrackerContext) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        start = context.start_step
        # A launch that died past its last checkpoint logged steps this one trains again: purge_step
        # makes readers drop every event from the first step trained here on, so each step shows once.
        self.writer = SummaryWriter(str(context.files.tensorboard), purge_step=start + 1)
        # Into this run's own event file (add_hparams would open another directory and log its metric
        # values as scalars), declaring `loss` as the metric the HParams view shows.
        for summary in hparams(context.hparams, {"loss": None}):
            self.writer._get_file_writer().add_summary(summary, start)
        self.writer.add_text("plan", _as_code(context.plan), start)
        self.writer.flush()

    def log_record(self, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()  # a rank that dies later still leaves what metrics.jsonl has

    def finish(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", _as_code(summary), summary["steps"])
        self.writer.close()


def _as_code(value: dict[str, Any]) -> str:
    """JSON as a markdown code block (TensorBoard's text view renders markdown)."""
    return "\n".join("    " + line for line in json.dumps(value, indent=1, default=str).splitlines())
