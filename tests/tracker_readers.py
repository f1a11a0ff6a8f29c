"""Read back what each tracker wrote into a run directory, through the tracker's own reader where it
has one (TensorBoard's event accumulator, MLflow's client), as {key: [(step, value), ...]}."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from launcher.rundir import RunDir

Curves = dict[str, list[tuple[int, float]]]


def jsonl_curves(records: list[dict[str, Any]]) -> Curves:
    """metrics.jsonl's numbers in the same shape (true/false as 1/0, nulls left out, as trackers get them)."""
    curves: Curves = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                curves.setdefault(key, []).append((record["step"], float(value)))
    return curves


@dataclass
class TensorBoardRun:
    scalars: Curves
    texts: list[str]
    hparams: dict[str, Any]


def read_tensorboard(run: Path) -> TensorBoardRun:
    """What TensorBoard shows: its accumulator applies purge_step (a resumed launch's restart point)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = EventAccumulator(str(RunDir(run).tensorboard), size_guidance={SCALARS: 0, TENSORS: 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in tags["scalars"]}
    session = plugin_data_pb2.HParamsPluginData.FromString(
        accumulator.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).session_start_info
    hparams = {key: json.loads(_proto_json(value)) for key, value in session.hparams.items()}
    return TensorBoardRun(scalars, tags["tensors"], hparams)


def _proto_json(value: Any) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(value)


@dataclass
class MLflowRun:
    run_ids: list[str]
    status: str
    metrics: Curves
    params: dict[str, str]
    artifacts: dict[str, Any]


def read_mlflow(run: Path, experiment: str = "meshyard") -> MLflowRun:
    """The experiment's runs in the run directory's default store; metrics, params and JSON artifacts of the first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{RunDir(run).mlflow_db}")
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    first = found[0]
    metrics = {key: sorted((m.step, m.value) for m in client.get_metric_history(first.info.run_id, key))
               for key in first.data.metrics}
    stored = Path(urlparse(first.info.artifact_uri).path)  # a local file: URI in the default store
    artifacts = {a.path: json.loads((stored / a.path).read_text()) for a in client.list_artifacts(first.info.run_id)}
    return MLflowRun([r.info.run_id for r in found], first.info.status, metrics, first.data.params, artifacts)


@dataclass
class WandbRun:
    """Every offline run file of a run directory, in the order written."""

    run_ids: list[str] = field(default_factory=list)
    history: Curves = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def read_wandb(run: Path) -> WandbRun:
    from wandb.proto import wandb_internal_pb2

    found = WandbRun()
    for path in sorted(RunDir(run).wandb.glob("offline-run-*/run-*.wandb")):
        for data in _wandb_records(path):
            record = wandb_internal_pb2.Record.FromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found.run_ids.append(record.run.run_id)
            elif kind == "history":
                items = {_key(item): json.loads(item.value_json) for item in record.history.item}
                for key, value in items.items():
                    if not key.startswith("_"):
                        found.history.setdefault(key, []).append((record.history.step.num, value))
            elif kind in ("config", "summary"):
                updates = getattr(record, kind).update
                getattr(found, kind).update({_key(item): json.loads(item.value_json) for item in updates})
    return found


def _key(item: Any) -> str:
    """W&B stores a key either whole or as its path (`nested_key`)."""
    return item.key or ".".join(item.nested_key)


BLOCK, HEADER = 32768, 7  # the .wandb file: LevelDB's log format (32 KiB blocks, 7-byte record headers)
FULL, LAST = 1, 4  # record kinds that end a record (FIRST 2 and MIDDLE 3 continue it)


def _wandb_records(path: Path) -> list[bytes]:
    """The protobuf records of a .wandb file, reassembled from the blocks they were split across."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", HEADER  # the file starts with its own 7-byte header
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            records.append(pending)
            pending = b""
    return records
