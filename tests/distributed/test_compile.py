"""`training.compile`: each repeated layer compiled by inductor, on one process and under DDP (2
ranks), matches the uncompiled 1-process run within fp32 SGD's tolerance. That it compiled is read
from torch's own structured trace (TORCH_TRACE: one log per process): every rank logged the C++
code inductor generated. A tiny model of two identical blocks (one graph to build, shared by both)
keeps the compile short; the inductor cache (torch's default folder) serves the second launch."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import assert_runs_match, launch_ok, make_spec, train_in_process

pytestmark = pytest.mark.distributed

TINY = {"model": {"target": "launcher.models:mlp", "kwargs": {"in_dim": 16, "hidden": 16, "out_dim": 1, "depth": 2}},
        "data": {"kwargs": {"n": 96, "in_dim": 16, "out_dim": 1}, "micro_batch_size": 12},
        "training": {"max_steps": 4, "grad_accum_steps": 2, "log_every": 1}}


def ranks_that_ran_inductor_code(trace: Path) -> int:
    """Processes whose structured trace holds inductor's generated code (the launcher compiles nothing)."""
    return sum("inductor_output_code" in log.read_text() for log in trace.glob("*.log"))


def test_compiled_layers_match_eager_on_one_process_and_on_ddp(tmp_path):
    reference = train_in_process(make_spec(tmp_path, "eager", **TINY))
    for name, procs, accum in (("compiled_single", 1, 2), ("compiled_ddp", 2, 1)):  # the same global batch of 24
        spec = make_spec(tmp_path, name, **{**TINY, "training": {**TINY["training"], "grad_accum_steps": accum}},
                         resources={"procs_per_node": procs})
        trace = tmp_path / f"{name}_trace"
        run = launch_ok(spec, "training.compile=true", env={"TORCH_TRACE": str(trace)})
        assert_runs_match(reference, run, 1e-5)
        assert ranks_that_ran_inductor_code(trace) == procs, name
