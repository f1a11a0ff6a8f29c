"""DeepSpeed checkpoint files are read with weights_only=True: a pickled callable is refused, not run."""
from __future__ import annotations

import pytest
import torch

from launcher.errors import UserError
from strategies.deepspeed_checkpoint import CHECKPOINT_TAG, consolidated_state_dict, load_weights_only
from tests.helpers import Planted


def test_a_pickled_callable_is_refused_and_never_called(tmp_path):
    planted = tmp_path / "planted"
    torch.save({"weights": torch.ones(2), "extra": Planted(planted)}, tmp_path / "model_states.pt")
    with pytest.raises(UserError, match=r"model_states.pt: refused to load, it holds os.makedirs"):
        load_weights_only(tmp_path / "model_states.pt")
    assert not planted.exists()


def test_deepspeeds_own_data_classes_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0)}, tmp_path / "optim.pt")
    loaded = load_weights_only(tmp_path / "optim.pt")
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0


def test_export_of_a_tampered_zero_checkpoint_is_refused(tmp_path):
    engine_dir = tmp_path / CHECKPOINT_TAG
    engine_dir.mkdir()
    planted = tmp_path / "planted"
    torch.save({"param_shapes": [], "buffer_names": [], "module": {}}, engine_dir / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": Planted(planted)}, engine_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UserError, match="refused to load"):
        consolidated_state_dict(tmp_path)
    assert not planted.exists()
