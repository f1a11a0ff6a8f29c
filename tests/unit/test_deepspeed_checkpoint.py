"""DeepSpeed checkpoint files are read with weights_only=True: a pickled callable is refused, not run."""
from __future__ import annotations

import json

import pytest
import torch

from launcher.cli import main
from launcher.session import prepare
from strategies.deepspeed_checkpoint import (
    CHECKPOINT_TAG,
    UnreadableCheckpoint,
    consolidated_state_dict,
    load_weights_only,
)
from tests.helpers import Planted, make_spec, reseal


def test_a_pickled_callable_is_refused_and_never_called(tmp_path):
    planted = tmp_path / "planted"
    torch.save({"weights": torch.ones(2), "extra": Planted(planted)}, tmp_path / "model_states.pt")
    with pytest.raises(UnreadableCheckpoint, match=r"model_states.pt: refused to load, it holds os.makedirs"):
        load_weights_only(tmp_path / "model_states.pt")
    assert not planted.exists()


def test_deepspeeds_own_data_classes_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0)}, tmp_path / "optim.pt")
    loaded = load_weights_only(tmp_path / "optim.pt")
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0


def test_export_of_a_tampered_zero_checkpoint_is_refused(tmp_path, capsys):
    session = prepare(str(make_spec(tmp_path, strategy={"name": "deepspeed", "stage": 1})), [])
    session.write_spec()
    checkpoint = session.run_dir / "checkpoints" / "step_00000001"
    (checkpoint / CHECKPOINT_TAG).mkdir(parents=True)
    (checkpoint / "manifest.json").write_text(json.dumps({"step": 1, "world_size": 1, "format": "deepspeed"}))
    planted = tmp_path / "planted"
    torch.save({"param_shapes": [], "buffer_names": [], "module": {}},
               checkpoint / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": Planted(planted)},
               checkpoint / CHECKPOINT_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UnreadableCheckpoint, match="refused to load"):
        consolidated_state_dict(checkpoint)
    assert main(["export", str(session.run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "optim_states.pt: refused to load, it holds os.makedirs" in err
    assert len(err.strip().splitlines()) == 1
    assert not planted.exists() and not (session.run_dir / "export").exists()


def test_launch_refuses_a_tampered_deepspeed_checkpoint_before_any_rank_starts(tmp_path, capsys):
    """The manifest resealed over the tampered file: what refuses it is the launcher's pickle check,
    one line, before ranks would have refused it in their tracebacks."""
    spec = make_spec(tmp_path, strategy={"name": "deepspeed", "stage": 1})
    session = prepare(str(spec), [])
    checkpoint = session.run_dir / "checkpoints" / "step_00000001"
    (checkpoint / CHECKPOINT_TAG).mkdir(parents=True)
    planted = tmp_path / "planted"
    torch.save({"optimizer_state_dict": Planted(planted)},
               checkpoint / CHECKPOINT_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    files = {f"{CHECKPOINT_TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt": {}}
    (checkpoint / "manifest.json").write_text(json.dumps({"step": 1, "world_size": 1, "format": "deepspeed",
                                                          "files": files}))
    reseal(checkpoint)
    (session.run_dir / "checkpoints" / "latest").write_text("step_00000001")
    assert main(["launch", str(spec)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "optim_states.pt: refused to load, it holds os.makedirs" in err
    assert not planted.exists() and not (session.run_dir / "heartbeats").exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_the_launchers_pickle_scan_reads_both_formats_without_running_them(tmp_path, zip_format):
    """DeepSpeed writes the legacy (non-zip) format; the scan names what a file's pickle would call."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from strategies.deepspeed_checkpoint import check_pickled_globals

    clean, tampered, planted = tmp_path / "clean.pt", tmp_path / "tampered.pt", tmp_path / "planted"
    torch.save({"w": torch.ones(3), "stage": ZeroStageEnum.gradients}, clean, _use_new_zipfile_serialization=zip_format)
    torch.save({"w": torch.ones(3), "x": Planted(planted)}, tampered, _use_new_zipfile_serialization=zip_format)
    check_pickled_globals(clean)
    with pytest.raises(UnreadableCheckpoint, match="tampered.pt: refused to load, it holds os.makedirs"):
        check_pickled_globals(tampered)
    assert not planted.exists()
