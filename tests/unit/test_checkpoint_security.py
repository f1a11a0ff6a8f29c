"""Checkpoints never run code, and damaged ones are skipped (launcher.safe_dcp, launcher.checkpoint).

Every test starts from a real checkpoint of a short real run. A tampered checkpoint is resealed
(its manifest gets the new sizes and SHA-256), as an attacker who can write the files would do, so
that what refuses it is the safe reader, not the integrity check. The payload is
`tests.helpers.Planted`: unpickling it creates a marker directory.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from launcher.checkpoint import Checkpointer, CheckpointRefused, find_latest, load_model_weights
from launcher.models import mlp
from launcher.safe_dcp import read_metadata_file
from launcher.session import prepare
from launcher.trainer import train
from tests.helpers import Planted, make_spec, meshyard, reseal, train_in_process

SMALL = {"training": {"max_steps": 4, "log_every": 1, "checkpoint_every": 2}}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One real run (checkpoints at steps 2 and 4), trained once; tests work on copies."""
    return train_in_process(make_spec(tmp_path_factory.mktemp("pristine"), "orig", **SMALL))


@pytest.fixture
def run(tmp_path, pristine) -> tuple[Path, Path]:
    """(spec, run directory): a copy of the pristine run under this test's own output.dir."""
    spec = make_spec(tmp_path, "orig", **SMALL)
    run_dir = tmp_path / "runs" / "orig"
    shutil.copytree(pristine, run_dir)
    spec_json = json.loads((run_dir / "spec.json").read_text())
    spec_json["output"]["dir"] = str(tmp_path / "runs")
    (run_dir / "spec.json").write_text(json.dumps(spec_json))
    return spec, run_dir


def newest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step_00000004"


def plant_in_metadata(checkpoint: Path, marker: Path) -> None:
    metadata = read_metadata_file(checkpoint / ".metadata")  # our own, untampered file
    metadata.planner_data["innocuous"] = Planted(marker)  # plain pickle.load runs it, then loads normally
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    reseal(checkpoint)


# the learning rate of the first parameter (optimizer state is flattened per parameter; strategies/single.py)
LR_ENTRY = "optim.param_groups.blocks.0.0.weight.lr"


def plant_in_bytes_entry(checkpoint: Path, marker: Path, fqn: str = LR_ENTRY) -> None:
    """Replace one non-tensor entry of a .distcp file by a pickled payload, moving later entries."""
    metadata = read_metadata_file(checkpoint / ".metadata")
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    buffer = io.BytesIO()
    torch.save(Planted(marker), buffer)
    payload = buffer.getvalue()
    shard = checkpoint / info.relative_path
    data = shard.read_bytes()
    shard.write_bytes(data[: info.offset] + payload + data[info.offset + info.length:])
    for other in metadata.storage_data.values():
        if other.relative_path == info.relative_path and other.offset > info.offset:
            other.offset += len(payload) - info.length
    info.length = len(payload)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    reseal(checkpoint)


def refused_in_one_line(result, marker: Path, names: str) -> None:
    output = (result.stdout + result.stderr).strip()
    assert not marker.exists(), "the planted payload ran"
    assert result.returncode != 0, output
    assert "Traceback" not in output and len(output.splitlines()) <= 3, output
    assert names in output, output


@pytest.mark.parametrize("resume", ["auto", "path"])
def test_metadata_payload_is_refused_by_launch(run, tmp_path, resume):
    spec, run_dir = run
    marker = tmp_path / "marker"
    plant_in_metadata(newest(run_dir), marker)
    overrides = [] if resume == "auto" else ["--set", f"checkpoint.resume={newest(run_dir)}"]
    result = meshyard("launch", str(spec), "--set", "training.max_steps=6", *overrides)
    refused_in_one_line(result, marker, f"{newest(run_dir)}/.metadata: refused to load: its pickle names os.makedirs")


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_metadata_payload_is_refused_by_export_and_quantize(run, tmp_path, command):
    _, run_dir = run
    marker = tmp_path / "marker"
    plant_in_metadata(newest(run_dir), marker)
    result = meshyard(command, str(run_dir))
    refused_in_one_line(result, marker, f"{newest(run_dir)}/.metadata: refused to load")
    assert not (run_dir / "export").exists() and not (run_dir / "quantized").exists()


def test_teacher_payload_is_refused_before_a_distillation_starts(run, tmp_path):
    _, teacher = run
    marker = tmp_path / "marker"
    plant_in_metadata(newest(teacher), marker)
    student = make_spec(tmp_path, "student", **SMALL,
                        compression={"distill": {"teacher": {"checkpoint": str(teacher)}}})
    result = meshyard("launch", str(student))
    refused_in_one_line(result, marker, f"{newest(teacher)}/.metadata: refused to load")
    assert not (tmp_path / "runs" / "student" / "metrics.jsonl").exists()


def test_bytes_entry_payload_is_refused_by_launch(run, tmp_path):
    spec, run_dir = run
    marker = tmp_path / "marker"
    plant_in_bytes_entry(newest(run_dir), marker)
    result = meshyard("launch", str(spec), "--set", "training.max_steps=6")
    refused_in_one_line(result, marker,
                        f"{newest(run_dir)}/__0_0.distcp (entry {LR_ENTRY}): refused to load")


def test_bytes_entry_payload_is_refused_in_the_rank(run, tmp_path):
    """A rank resuming (train -> Checkpointer.load -> DCP) refuses on its own, without the launcher's check."""
    spec, run_dir = run
    marker = tmp_path / "marker"
    plant_in_bytes_entry(newest(run_dir), marker)
    session = prepare(str(spec), ["training.max_steps=6"])
    with pytest.raises(CheckpointRefused, match=rf"__0_0\.distcp \(entry {re.escape(LR_ENTRY)}\): refused to load"):
        train(session.spec, session.plan, session.run_dir)
    assert not marker.exists()
    # The same through the weights loader that export, quantize and a distillation teacher use.
    with pytest.raises(CheckpointRefused):
        load_model_weights(mlp(**session.spec.model.kwargs), newest(run_dir))
    assert not marker.exists()


def test_a_metadata_payload_is_refused_in_the_rank(run, tmp_path):
    spec, run_dir = run
    marker = tmp_path / "marker"
    plant_in_metadata(newest(run_dir), marker)
    session = prepare(str(spec), ["training.max_steps=6", f"checkpoint.resume={newest(run_dir)}"])
    with pytest.raises(CheckpointRefused, match=r"\.metadata: refused to load: its pickle names os\.makedirs"):
        train(session.spec, session.plan, session.run_dir)
    assert not marker.exists()


def test_truncated_shard_resumes_from_the_previous_checkpoint(run):
    spec, run_dir = run
    shard = newest(run_dir) / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    result = meshyard("launch", str(spec), "--set", "training.max_steps=6")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    warnings = [line for line in output.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {shard}: 100 bytes, the manifest says {_listed_size(newest(run_dir), shard)};"
                        " skipped step_00000004, an older complete checkpoint is used if there is one"], output
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} at step 2" in output
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # records after the resumed step are dropped, then steps 3-6 retrained


def _listed_size(checkpoint: Path, file: Path) -> int:
    return json.loads((checkpoint / "manifest.json").read_text())["files"][file.name]["size"]


def test_same_size_damage_is_found_by_hash_and_skipped(run, capsys):
    _, run_dir = run
    shard = newest(run_dir) / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert find_latest(run_dir / "checkpoints") == run_dir / "checkpoints" / "step_00000002"
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {shard}: contents differ from the manifest's SHA-256; skipped step_00000004, an older complete"
        " checkpoint is used if there is one"]
    with pytest.raises(CheckpointRefused, match="contents differ from the manifest's SHA-256"):
        Checkpointer(run_dir / "checkpoints", keep=3, rank=0, world_size=1, barrier=lambda: None,
                     strategy=_NoStrategy()).load(newest(run_dir))


class _NoStrategy:
    native_checkpoint = None


def test_missing_file_corrupt_manifest_and_latest_are_skipped_without_a_traceback(run, capsys):
    _, run_dir = run
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "latest").write_bytes(b"\xff\xfe../../etc")
    assert find_latest(checkpoints) == newest(run_dir)  # `latest` is not what readers go by
    (newest(run_dir) / "rank0.pt").unlink()
    assert find_latest(checkpoints) == checkpoints / "step_00000002"
    assert "rank0.pt: missing (the manifest lists it)" in capsys.readouterr().err
    (checkpoints / "step_00000002" / "manifest.json").write_bytes(b"\x00{not json")
    with pytest.raises(CheckpointRefused, match="every complete checkpoint is damaged"):
        find_latest(checkpoints)
    # step_00000004's verdict stands (reported once per process); step_00000002's is new.
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {checkpoints}/step_00000002/manifest.json: unreadable manifest (JSONDecodeError); skipped"
        " step_00000002, an older complete checkpoint is used if there is one"]


def test_manifest_records_every_file_with_size_and_hash(pristine):
    checkpoint = newest(pristine)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    on_disk = {p.name for p in checkpoint.iterdir()} - {"manifest.json", ".verified"}
    assert set(manifest["files"]) == on_disk == {".metadata", "__0_0.distcp", "rank0.pt"}
    for rel, entry in manifest["files"].items():
        data = (checkpoint / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_old_manifest_without_hashes_is_checked_by_size(run, capsys):
    _, run_dir = run
    checkpoint = newest(run_dir)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"] = {rel: entry["size"] for rel, entry in manifest["files"].items()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    (checkpoint / ".verified").unlink()
    assert find_latest(run_dir / "checkpoints") == checkpoint
    shard = checkpoint / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes() + b"x")
    assert find_latest(run_dir / "checkpoints") == run_dir / "checkpoints" / "step_00000002"
    assert "__0_0.distcp: " in capsys.readouterr().err


def test_when_every_checkpoint_is_damaged_launch_refuses_instead_of_starting_over(run):
    spec, run_dir = run
    for step in (2, 4):
        shard = run_dir / "checkpoints" / f"step_{step:08d}" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:-1])
    result = meshyard("launch", str(spec), "--set", "training.max_steps=6")
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(lines) == 3 and "Traceback" not in result.stderr, lines
    assert lines[0].startswith("warning: ") and "step_00000004/__0_0.distcp" in lines[0]
    assert lines[1].startswith("warning: ") and "step_00000002/__0_0.distcp" in lines[1]
    assert lines[2] == f"error: {run_dir / 'checkpoints'}: every complete checkpoint is damaged (see the warnings);" \
                       " repair or remove them, or use another name or output.dir"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4  # nothing trained
