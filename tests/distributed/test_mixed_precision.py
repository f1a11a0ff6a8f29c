"""bf16 on sharded runs is FSDP2's MixedPrecisionPolicy (strategies/fsdp.py): parameters gathered and
used in bf16, gradients reduced in fp32 into fp32 shards, fp32 weights and optimizer state."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.metrics import read_metrics
from tests.helpers import curve, launch_ok, make_spec, train_in_process

pytestmark = pytest.mark.distributed

# SGD with momentum and no L1/L2/clipping: torch's first momentum buffer is a copy of the gradient
# the optimizer got, so step 1's checkpoint shows the reduced gradient as FSDP2 stored it.
SECTIONS: dict[str, Any] = {
    "data": {"kwargs": {"n": 96, "in_dim": 8, "out_dim": 1}, "micro_batch_size": 8},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "l1": 0.0, "l2": 0.0, "grad_clip": None},
    "training": {"max_steps": 6, "log_every": 1, "checkpoint_every": 1},
    "checkpoint": {"keep": 6},
}
# bf16 keeps 8 significant bits: each rounding moves a value by up to 2**-9 ~ 2e-3 relative. The
# 3-layer MLP rounds its weights and each layer's input once, so the output, and the MSE loss, move
# by a few such roundings (partly cancelling), drifting a little over 6 updates. 1e-2 relative is
# that bound (measured: 9e-4), far below the loss's own movement per step (10-80%).
BF16_LOSS_RTOL = 1e-2


def _probe_model(report_dir: Path) -> dict[str, Any]:
    return {"target": "tests.fixtures.dtype_probe:mlp_reporting_dtypes",
            "kwargs": {"report_dir": str(report_dir), "in_dim": 8, "hidden": 16, "out_dim": 1, "depth": 2}}


def _first_reduced_gradient(run: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(run / "checkpoints" / "step_00000001", tmp / "step1.pt")
    state = torch.load(tmp / "step1.pt", weights_only=True)
    return {key: value for key, value in state["optim"].items() if key.endswith("momentum_buffer")}


def test_zero3_bf16_computes_in_bf16_and_keeps_fp32_weights_gradients_and_state(tmp_path):
    reports = tmp_path / "dtypes"
    reports.mkdir()
    reference = train_in_process(make_spec(tmp_path, "fp32", **SECTIONS, model=_probe_model(reports)))
    bf16 = {**SECTIONS, "data": {**SECTIONS["data"], "micro_batch_size": 4},
            "training": {**SECTIONS["training"], "precision": "bf16"}}
    spec = make_spec(tmp_path, "zero3_bf16", **bf16, model=_probe_model(reports), strategy={"name": "zero", "stage": 3},
                     resources={"procs_per_node": 2})
    run = launch_ok(spec)

    # (a) every linear layer ran on bf16 weights (FSDP2's gathered parameters) and inputs, not under autocast
    layers = [json.loads((reports / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(seen == {"weight": "torch.bfloat16", "input": "torch.bfloat16", "autocast": False}
               for report in layers for seen in report.values()), layers
    # (b) fp32 weights and optimizer state; gradients stored like the weights (fp32, as many bytes)
    # and reduced in fp32: a bf16 reduction leaves every value exactly representable in bf16
    first = _first_reduced_gradient(run, tmp_path)
    assert first and all(buffer.dtype == torch.float32 for buffer in first.values())
    values = torch.cat([buffer.flatten() for buffer in first.values()])
    assert (values == values.bfloat16().float()).float().mean() < 0.9
    last = read_metrics(run)[-1]
    assert last["mem_grads_bytes"] == last["mem_params_bytes"] == last["mem_optim_bytes"]
    # (c) the fp32 single-process curve, within bf16's tolerance
    for got, want in zip(curve(run), curve(reference), strict=True):
        assert abs(got - want) <= BF16_LOSS_RTOL * abs(want), (curve(run), curve(reference))
