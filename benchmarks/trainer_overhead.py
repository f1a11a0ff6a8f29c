"""meshyard's trainer loop vs a hand-written DDP loop: same model, data, optimizer, process count.

Both loops run inside ONE torchrun job, interleaved round by round (alternating which goes first, so
neither always runs on a warmer or colder process), so machine noise hits both alike.
Per round we compare the mean step time (data loading + forward/backward + clip + step), the same
region for both loops; the reported number is the median of the per-round ratios (goal <= 1.03).

    python benchmarks/trainer_overhead.py            # launches 2 ranks, writes results/trainer_overhead.{json,png}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.plotting import pyplot, save_png  # noqa: E402  (after the sys.path insert)

RESULTS = REPO / "benchmarks" / "results"
SPEC = {
    "name": "overhead", "seed": 0,
    "model": {"target": "launcher.models:mlp", "kwargs": {"in_dim": 64, "hidden": 512, "out_dim": 1, "depth": 3}},
    "data": {"target": "launcher.data:synthetic_regression", "kwargs": {"n": 65536, "in_dim": 64, "out_dim": 1},
             "micro_batch_size": 64, "shuffle": True},
    "optimizer": {"name": "adam", "lr": 1e-3, "grad_clip": 1.0},
    "training": {"max_steps": 60, "grad_accum_steps": 2, "log_every": 20},
    "strategy": {"name": "ddp"},
    "resources": {"procs_per_node": 2},
    "checkpoint": {"resume": "never"},
}


def hand_written_loop(steps: int, log_every: int) -> float:
    """The nanoGPT-style loop a user would write; returns mean seconds per step."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from launcher.data import synthetic_regression
    from launcher.models import mlp

    torch.manual_seed(0)
    model = DistributedDataParallel(mlp(**SPEC["model"]["kwargs"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
    dataset = synthetic_regression(**SPEC["data"]["kwargs"])
    sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)
    loader = iter(DataLoader(dataset, batch_size=64, sampler=sampler, drop_last=True))
    accum, elapsed = SPEC["training"]["grad_accum_steps"], 0.0
    for step in range(1, steps + 1):
        tick = time.perf_counter()
        for micro in range(accum):
            x, y = next(loader)
            context = model.no_sync() if micro < accum - 1 else torch.enable_grad()
            with context:
                loss = torch.nn.functional.mse_loss(model(x), y)
                (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - tick
        if step % log_every == 0:  # the logging all-reduce, outside the timed region as in meshyard
            value = loss.detach().clone()
            dist.all_reduce(value)
    return elapsed / steps


def meshyard_loop(workdir: Path) -> float:
    """meshyard's trainer on the same job; mean seconds per step from its own step timer."""
    from launcher.metrics import read_metrics
    from launcher.plan import make_plan
    from launcher.rank import rank_info_from_env
    from launcher.spec import validate_spec
    from launcher.trainer import RankInfo, train

    spec = validate_spec({**SPEC, "output": {"dir": str(workdir)}})
    ranks: RankInfo = rank_info_from_env()
    run_dir = workdir / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    train(spec, make_plan(spec), run_dir, ranks)
    records = read_metrics(run_dir) if ranks.rank == 0 else []
    # Each record's step_time_s averages the steps since the previous record.
    steps = [r["step"] for r in records]
    spans = [b - a for a, b in zip([0] + steps[:-1], steps)]
    return sum(r["step_time_s"] * n for r, n in zip(records, spans)) / max(1, sum(spans))


def worker(rounds: int, out: Path, workdir: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rows = []
    for index in range(rounds):
        def hand_loop() -> float:
            return hand_written_loop(SPEC["training"]["max_steps"], SPEC["training"]["log_every"])

        def our_loop() -> float:
            # one directory all ranks share, as in a launch; called in this iteration, so `index` is this round's
            return meshyard_loop(workdir / f"round{index}")  # noqa: B023

        if index % 2:
            ours, hand = our_loop(), hand_loop()
        else:
            hand, ours = hand_loop(), our_loop()
        if dist.get_rank() == 0:
            rows.append({"round": index, "hand_written_s_per_step": hand, "meshyard_s_per_step": ours,
                         "ratio": ours / hand})
            print(f"round {index}: hand {1000 * hand:.2f} ms/step, meshyard {1000 * ours:.2f} ms/step, "
                  f"ratio {ours / hand:.3f}", flush=True)
    if dist.get_rank() == 0:
        result = {"benchmark": "trainer_overhead", "world_size": dist.get_world_size(), "rounds": rows,
                  "median_ratio": statistics.median(r["ratio"] for r in rows), "goal": 1.03, "spec": SPEC}
        out.write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


def plot(result_file: Path) -> Path:
    plt = pyplot()
    result = json.loads(result_file.read_text())
    rounds = result["rounds"]
    xs = range(len(rounds))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([x - 0.2 for x in xs], [1000 * r["hand_written_s_per_step"] for r in rounds], 0.4,
           label="hand-written DDP loop")
    ax.bar([x + 0.2 for x in xs], [1000 * r["meshyard_s_per_step"] for r in rounds], 0.4, label="meshyard trainer")
    ax.set_xlabel("round (interleaved in one torchrun job)")
    ax.set_ylabel("ms / optimizer step")
    ax.set_title(f"trainer overhead: median ratio {result['median_ratio']:.3f} (goal <= {result['goal']})")
    ax.legend()
    return save_png(fig, result_file, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "trainer_overhead.json")
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.rounds, args.out, args.workdir)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as workdir:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        __file__, "--worker", "--rounds", str(args.rounds), "--out", str(args.out),
                        "--workdir", workdir], cwd=REPO, env=env, check=True)
    print(f"wrote {args.out} and {plot(args.out)}")


if __name__ == "__main__":
    main()
