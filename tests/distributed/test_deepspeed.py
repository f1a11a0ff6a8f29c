"""DeepSpeed's engine, stages 0-3: parity with one process, its own checkpoints, resume, export."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from launcher.cli import main
from strategies.deepspeed_checkpoint import load_weights_only
from tests.fixtures.build_probe import launched_builds
from tests.helpers import (
    BASE_SPEC,
    Planted,
    assert_runs_match,
    launch_ok,
    launch_resumed,
    make_spec,
    meshyard,
    reseal,
    train_in_process,
)

pytestmark = pytest.mark.distributed

FULL_BATCH_DATA = {"kwargs": {"n": 24, "in_dim": 8, "out_dim": 1}}
# SGD with momentum, L1/L2 and clipping matches to fp32 round-off. Adam divides by sqrt(v) + eps, which
# magnifies the round-off of a differently ordered gradient sum (DeepSpeed reduces flattened buckets)
# in the first steps, where v is tiny: 1e-4, as for the torch-native ZeRO stages.
OPTIMIZERS = {
    "sgd_momentum": ({"name": "sgd", "lr": 0.05, "momentum": 0.9, "l1": 1.0e-3, "l2": 1.0e-3, "grad_clip": 1.0}, 1e-5),
    "adam": ({"name": "adam", "lr": 0.01, "l1": 1.0e-4, "l2": 1.0e-3, "grad_clip": 1.0}, 1e-4),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """optimizer name -> the 1-process run on the same global batch of 24."""
    runs = {}
    for name, (opt, _) in OPTIMIZERS.items():
        spec = make_spec(tmp_path_factory.mktemp(name), "reference", optimizer=opt, data=FULL_BATCH_DATA)
        runs[name] = train_in_process(spec)
    return runs


def _deepspeed_spec(tmp_path, optimizer: str, stage: int):
    """The reference's model (built-in MLP) through a target that reports whether it was built partitioned."""
    model = {"target": "tests.fixtures.build_probe:mlp_reporting_partitions",
             "kwargs": {**BASE_SPEC["model"]["kwargs"], "report_dir": str(tmp_path)}}
    return make_spec(tmp_path, "ds", model=model, optimizer=OPTIMIZERS[optimizer][0],
                     strategy={"name": "deepspeed", "stage": stage}, data={**FULL_BATCH_DATA, "micro_batch_size": 4},
                     training={"grad_accum_steps": 3}, resources={"procs_per_node": 2})


# Stages 1 and 3 stop at step 5 and resume from DeepSpeed's own checkpoint: the whole curve must
# still match the uninterrupted 1-process run, so the engine's partitioned state survived the round trip;
# resuming it at another world size is refused before any process starts.
# Uninterrupted parity of stages 0-3 (SGD and Adam, self-initializing models) is in test_real_models.py.
@pytest.mark.parametrize("stage,interrupted", [(1, True), (3, True)])
def test_sgd_matches_one_process(tmp_path, reference, stage, interrupted):
    spec = _deepspeed_spec(tmp_path, "sgd_momentum", stage)
    if interrupted:
        run = launch_ok(spec, "training.stop_at_step=5")
        manifest = json.loads((run / "checkpoints" / "step_00000005" / "manifest.json").read_text())
        assert manifest["format"] == "deepspeed" and manifest["world_size"] == 2
        refused = meshyard("launch", str(spec), "--set", "resources.procs_per_node=1")
        assert refused.returncode == 2
        assert "a DeepSpeed checkpoint from 2 processes resumes only at the same world size, not 1" in refused.stderr
    run = launch_resumed(spec, 5) if interrupted else launch_ok(spec)
    assert_runs_match(reference["sgd_momentum"], run, OPTIMIZERS["sgd_momentum"][1])
    # Every stage builds the constructor's whole model (no deepspeed.zero.Init, which would partition
    # parameters before a constructor that writes into them finished); the engine partitions it.
    builds = launched_builds(tmp_path)  # 2 ranks, 1 or 2 launches
    assert len(builds) == (4 if interrupted else 2) and all(build == [False] * 6 for build in builds)


@pytest.mark.parametrize("stage,offload", [(3, "cpu")])
def test_adam_matches_one_process(tmp_path, reference, stage, offload):
    run = launch_ok(_deepspeed_spec(tmp_path, "adam", stage), f"strategy.offload_optimizer={offload}")
    assert_runs_match(reference["adam"], run, OPTIMIZERS["adam"][1])
    assert main(["export", str(run)]) == 0  # one consolidated file, loadable with weights_only
    exported = torch.load(run / "export" / "model.pt", weights_only=True)
    # DeepSpeed's own consolidation (zero_to_fp32) of the same files. It memory-maps them, which needs
    # the zip format while the engine writes the legacy one: re-saved first, contents unchanged.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    copy = shutil.copytree(run / "checkpoints" / "step_00000010", tmp_path / "zip_copy")
    for engine_file in (copy / "deepspeed").glob("*.pt"):
        torch.save(load_weights_only(engine_file), engine_file)
    by_deepspeed = get_fp32_state_dict_from_zero_checkpoint(str(copy), tag="deepspeed")
    assert exported.keys() == by_deepspeed.keys()
    assert all(torch.equal(exported[k], by_deepspeed[k]) for k in exported)


def test_resume_reads_deepspeed_files_with_weights_only(tmp_path):
    """The engine's own loader would unpickle anything; ours refuses a planted callable before it runs."""
    spec = make_spec(tmp_path, "ds", strategy={"name": "deepspeed", "stage": 1}, training={"max_steps": 4})
    run = launch_ok(spec, "training.stop_at_step=2")
    optim_file = next((run / "checkpoints" / "step_00000002" / "deepspeed").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": Planted(tmp_path / "planted")}, optim_file)
    reseal(run / "checkpoints" / "step_00000002")  # past the integrity check: the reader must refuse it
    resumed = meshyard("launch", str(spec))
    assert resumed.returncode != 0
    assert "refused to load, it holds os.makedirs" in resumed.stderr, resumed.stderr[-2000:]
    assert not (tmp_path / "planted").exists()
