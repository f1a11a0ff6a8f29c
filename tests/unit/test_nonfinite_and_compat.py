"""A NaN step is skipped (or stops the run); a resume that does not fit the spec's model is refused."""
from __future__ import annotations

import math

import pytest
import torch

from launcher.cli import main
from launcher.guards import NonFiniteError
from launcher.metrics import read_metrics
from tests.helpers import final_params, make_spec, train_in_process

# With shuffle off and a global batch of 24, item 30 is consumed by step 2 (items [24, 48)).
NAN_DATA = {"target": "tests.fixtures.faulty:SlowDataset", "shuffle": False,
            "kwargs": {"n": 96, "in_dim": 8, "out_dim": 1, "delay_s": 0.0, "nan_items": [30]}}


def test_skip_drops_the_update_and_training_goes_on(tmp_path):
    spec = make_spec(tmp_path, data=NAN_DATA, training={"max_steps": 6, "log_every": 1, "on_nonfinite": "skip"})
    run = train_in_process(spec)
    records = read_metrics(run)
    # 4 steps per epoch with shuffle off: step 6 sees items [24, 48) again, item 30 included.
    assert [r["skipped"] for r in records] == [False, True, False, False, False, True]
    assert math.isnan(records[1]["loss"]) and all(math.isfinite(r["loss"]) for r in records[2:5])
    assert all(torch.isfinite(p).all() for p in final_params(run).values())


def test_stop_raises_naming_the_step(tmp_path):
    spec = make_spec(tmp_path, data=NAN_DATA, training={"max_steps": 6, "on_nonfinite": "stop"})
    with pytest.raises(NonFiniteError, match="step 2: the loss or gradient norm is not finite"):
        train_in_process(spec)


def test_resume_with_a_different_model_shape_is_refused_and_nothing_is_touched(tmp_path, capsys):
    spec = make_spec(tmp_path, training={"max_steps": 3})
    run = train_in_process(spec)
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    code = main(["launch", str(spec), "--set", "model.kwargs.hidden=32"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "blocks.0.0.weight is [16, 8] there but [32, 8] in the spec's model" in err
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")} == before
