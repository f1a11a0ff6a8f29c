"""Checkpoints are complete or invisible: partial directories are never loaded and get cleaned."""
from __future__ import annotations

import json

import torch

from launcher.checkpoint import Checkpointer, find_latest
from launcher.spec import load_spec
from launcher.trainer import resume_path
from tests.helpers import make_spec, train_in_process


class StateHolder:
    """The two Strategy methods a DCP checkpoint uses, over one tensor."""

    native_checkpoint = None

    def __init__(self, value: float) -> None:
        self.state = {"model": {"w": torch.full((3,), float(value))}}

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def _save(root, step, value):
    holder = StateHolder(value)
    ckpt = Checkpointer(root, keep=2, rank=0, world_size=1, barrier=lambda: None, strategy=holder)
    ckpt.save(step, {"step": step})
    return ckpt, holder


def test_latest_complete_wins_and_keep_prunes(tmp_path):
    for step in (1, 2, 3):
        ckpt, holder = _save(tmp_path, step, step)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert find_latest(tmp_path).name == "step_00000003"
    holder.state["model"]["w"].zero_()
    assert ckpt.load(find_latest(tmp_path)) == {"step": 3}
    assert torch.equal(holder.state["model"]["w"], torch.full((3,), 3.0))


def test_partial_directory_is_ignored_and_removed(tmp_path):
    ckpt, _ = _save(tmp_path, 1, 1)
    partial = tmp_path / ".partial-step_00000002"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half a file")
    assert find_latest(tmp_path).name == "step_00000001"
    ckpt.remove_partials()
    assert not partial.exists()


def test_stale_latest_pointer_falls_back_to_newest_complete(tmp_path):
    _save(tmp_path, 1, 1)
    (tmp_path / "latest").write_text("step_00000009")  # points at something that never completed
    assert find_latest(tmp_path).name == "step_00000001"


def _fake_checkpoint(directory, step):
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"step": step, "world_size": 1, "format": "dcp"}))
    return directory


def test_resume_takes_the_newer_of_the_orchestrators_checkpoint_and_the_run_directorys(tmp_path):
    """Ray hands a restarted group the newest checkpoint its controller registered, which can lag the run directory."""
    spec = load_spec(make_spec(tmp_path))
    run_dir = tmp_path / "runs" / "test"
    assert resume_path(spec, run_dir, None) is None
    from_ray = _fake_checkpoint(tmp_path / "ray" / "step_00000004", 4)
    assert resume_path(spec, run_dir, from_ray) == from_ray
    ours = _fake_checkpoint(run_dir / "checkpoints" / "step_00000004", 4)
    assert resume_path(spec, run_dir, from_ray) == from_ray  # a tie: the orchestrator's
    assert resume_path(spec, run_dir, None) == ours
    newer = _fake_checkpoint(run_dir / "checkpoints" / "step_00000008", 8)
    assert resume_path(spec, run_dir, from_ray) == newer
    never = load_spec(make_spec(tmp_path, checkpoint={"resume": "never"}))
    assert resume_path(never, run_dir, None) is None  # a launch's first attempt
    # A restart within the launch continues from its newest checkpoint, whatever the first attempt was told.
    assert resume_path(never, run_dir, None, attempt=1) == newer
    assert resume_path(never, run_dir, from_ray) == newer
    given = load_spec(make_spec(tmp_path, checkpoint={"resume": str(from_ray)}))
    assert resume_path(given, run_dir, None) == from_ray and resume_path(given, run_dir, None, attempt=1) == newer


def test_checkpoint_final_false_writes_only_the_interval_checkpoints(tmp_path):
    """67 small runs took 761 MB of final checkpoints: `final: false` leaves only checkpoint_every's."""
    spec = make_spec(tmp_path, "nofinal", training={"max_steps": 10, "checkpoint_every": 4},
                     checkpoint={"final": False})
    run = train_in_process(spec)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000008"]
    stopped = train_in_process(make_spec(tmp_path, "stopped", training={"max_steps": 10, "checkpoint_every": 4},
                                         checkpoint={"final": False}), "training.stop_at_step=6")
    assert (stopped / "checkpoints" / "step_00000006").is_dir()  # a stop is always resumable
