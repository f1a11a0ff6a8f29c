"""Bare Ray Train baseline: an embedded local Ray and a TorchTrainer over benchmarks/bare/rank.py."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402
from ray.train import RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402

from benchmarks.bare.rank import ray_train_loop  # noqa: E402

if __name__ == "__main__":
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2)
    TorchTrainer(ray_train_loop,
                 train_loop_config={"launched_at": float(os.environ["BARE_LAUNCHED_AT"]),
                                    "result_file": os.environ["BARE_RESULT"]},
                 scaling_config=ScalingConfig(num_workers=2), torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name="bare", storage_path=os.environ["BARE_STORAGE"])).fit()
    ray.shutdown()
