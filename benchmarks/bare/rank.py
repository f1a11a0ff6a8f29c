"""The hand-written baseline for benchmarks/launch_overhead.py: what a user would write without meshyard.

One DDP rank on torchrun's environment contract, timed by the same phases meshyard records
(spawn, pg_init, model_build, data_build, first_step). Started by bare torchrun, by bare
`accelerate launch`, or called by a bare Ray TorchTrainer (where Ray formed the process group).
Rank 0 writes the phases as JSON to $BARE_RESULT.

    torchrun --standalone --nproc-per-node 2 benchmarks/bare/rank.py
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

IN_DIM, HIDDEN, MICRO_BATCH, ACCUM = 32, 256, 64, 2


def run_rank(launched_at: float, result_file: str) -> None:
    phases, last = {"spawn": time.time() - launched_at}, time.time()

    def mark(phase: str) -> None:
        nonlocal last
        phases[phase], last = time.time() - last, time.time()

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mark("pg_init")
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN),
                                                  nn.GELU(), nn.Linear(HIDDEN, 1)))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    mark("model_build")
    inputs = torch.randn(8192, IN_DIM)
    data = TensorDataset(inputs, inputs.sum(dim=1, keepdim=True).sin())
    batches = iter(DataLoader(data, batch_size=MICRO_BATCH, sampler=DistributedSampler(data, seed=0)))
    mark("data_build")
    for micro in range(ACCUM):
        x, y = next(batches)
        if micro < ACCUM - 1:
            with model.no_sync():
                (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
        else:
            (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    mark("first_step")
    if dist.get_rank() == 0:
        with open(result_file, "w") as f:
            json.dump(phases, f)


def ray_train_loop(config: dict) -> None:
    run_rank(config["launched_at"], config["result_file"])


if __name__ == "__main__":
    run_rank(float(os.environ["BARE_LAUNCHED_AT"]), os.environ["BARE_RESULT"])
    dist.destroy_process_group()
