"""`meshyard calibrate` writes this host's profile, `meshyard plan` then predicts a step time, and a
2-rank launch logs model FLOPs and MFU with every record and on its end-of-run line; its measured
model state per rank is what the plan estimated, byte for byte."""
from __future__ import annotations

import json

import pytest

from launcher.cli import main
from launcher.estimate import build_estimate
from launcher.metrics import read_metrics
from launcher.session import prepare
from tests.helpers import make_spec, meshyard, run_dir

pytestmark = pytest.mark.distributed


def test_calibrate_then_plan_predicts_and_a_launch_logs_mfu(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    result = meshyard("calibrate", "--procs", "2", env={"XDG_CACHE_HOME": str(cache)})
    assert result.returncode == 0, result.stderr[-2000:]
    profile = json.loads(next((cache / "meshyard").glob("profile-*.json")).read_text())
    entry = profile["entries"]["gloo/2"]
    assert entry["matmul_flops_per_s"]["fp32"] > 0 and entry["collective_bytes_per_s"]["all_gather"] > 0
    assert entry["attention_flops_per_s"]["bf16/backward"]["64"] > 0 and entry["op_overhead_s"] > 0
    kinds = {f"{p}/{kind}{where}" for p in ("fp32", "bf16") for kind in ("light", "heavy") for where in ("", "/cached")}
    assert set(entry["elementwise_bytes_per_s"]) == kinds and entry["first_touch_bytes_per_s"] > 0

    spec = make_spec(tmp_path, "lm", model={"target": "launcher.models:transformer", "kwargs": {"n_layers": 2}},
                     data={"target": "launcher.data:char_corpus", "kwargs": {"n": 128, "seq_len": 16},
                           "micro_batch_size": 4},
                     loss="token_cross_entropy", optimizer={"name": "adam", "lr": 1e-3},
                     training={"max_steps": 3, "log_every": 1}, strategy={"name": "zero", "stage": 3},
                     resources={"procs_per_node": 2})
    assert main(["plan", str(spec)]) == 0
    assert " ms predicted = compute " in capsys.readouterr().out

    launched = meshyard("launch", str(spec), env={"XDG_CACHE_HOME": str(cache)})
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-2000:]
    session = prepare(str(spec), [])
    estimate = build_estimate(session.spec, session.plan, session.train_set)
    records = read_metrics(run_dir(spec))
    assert [r["model_flops_per_step"] for r in records] == [estimate.flops_per_step] * 3
    assert all(0 < r["mfu"] < 1 for r in records)
    done = next(line for line in launched.stdout.splitlines() if line.startswith("done: 3/3 steps"))
    assert " tokens/s | MFU " in done
    summary = json.loads((run_dir(spec) / "summary.json").read_text())
    assert 0 < summary["mfu"] < 1
    # rank 0's sharded parameters, gradients and Adam moments after a step: exactly the estimate's bytes
    last, rank = records[-1], estimate.ranks[0]
    assert (last["mem_params_bytes"], last["mem_grads_bytes"], last["mem_optim_bytes"]) == (
        rank.param_bytes, rank.grad_bytes, rank.optimizer_bytes)
