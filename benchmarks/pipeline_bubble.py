"""Pipeline bubble: measured idle fraction per rank vs the (p-1)/(m+p-1) theory, GPipe and 1F1B.

Each of p=2 ranks holds one stage whose work is made uniform and independent of the (shared,
noisy) CPU: a forward sleeps F ms and its backward sleeps B ms, through a tiny autograd function.
The schedules are meshyard's own (`strategies.pipeline.build_schedule`, torch.distributed.pipelining
over gloo). Per pipeline step (all ranks start together after a barrier and the step ends when the
last rank finishes, another barrier) a rank's busy time is the time spent inside its stage's
forward and backward; idle = 1 - busy / step time, which counts pipeline fill/drain and
communication. The same hooks count micro-batches in flight (forwards done minus backwards done)
per stage: GPipe holds all m, 1F1B at most p - stage.

    python benchmarks/pipeline_bubble.py     # 2 ranks; writes results/pipeline_bubble.{json,png}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.plotting import pyplot, save_png  # noqa: E402  (after the sys.path insert)

RESULTS = REPO / "benchmarks" / "results"
FORWARD_S, BACKWARD_S = 0.02, 0.04
SCHEDULES = ("gpipe", "1f1b")
MICROBATCHES = (2, 4, 8)
STEPS, WARMUP = 5, 1
GOAL = 0.05


def theory(p: int, m: int) -> float:
    return (p - 1) / (m + p - 1)


class Meter:
    """Busy seconds and micro-batches in flight on this rank's stage."""

    def __init__(self) -> None:
        self.busy, self.in_flight, self.peak = 0.0, 0, 0

    def reset(self) -> None:
        self.busy, self.in_flight, self.peak = 0.0, 0, 0


def fixed_cost_stage(meter: Meter, dim: int = 4):
    import torch

    class FixedCost(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            tick = time.perf_counter()
            time.sleep(FORWARD_S)
            meter.in_flight += 1
            meter.peak = max(meter.peak, meter.in_flight)
            meter.busy += time.perf_counter() - tick
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            tick = time.perf_counter()
            time.sleep(BACKWARD_S)
            meter.in_flight -= 1
            meter.busy += time.perf_counter() - tick
            return grad

    class Stage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(dim, dim)

        def forward(self, x):
            return FixedCost.apply(self.linear(x))

    return Stage()


def measure(schedule_name: str, m: int) -> dict:
    import torch
    import torch.distributed as dist

    from strategies.layout import MeshLayout
    from strategies.pipeline import build_schedule

    rank, p = dist.get_rank(), dist.get_world_size()
    meter = Meter()
    layout = MeshLayout(dp_degree=1, pp_degree=p, schedule=schedule_name, microbatches=m)
    schedule = build_schedule(layout, [fixed_cost_stage(meter)], rank, torch.device("cpu"), dist.group.WORLD,
                              lambda out, target: ((out - target) ** 2).mean(), m)
    x, y = torch.randn(m, 4), torch.randn(m, 4)
    idle, peaks = [], []
    for step in range(WARMUP + STEPS):
        meter.reset()
        dist.barrier()
        tick = time.perf_counter()
        schedule.step(*((x,) if rank == 0 else ()), target=y if rank == p - 1 else None,
                      losses=[] if rank == p - 1 else None, return_outputs=False)
        dist.barrier()
        wall = time.perf_counter() - tick
        if step >= WARMUP:
            idle.append(1 - meter.busy / wall)
            peaks.append(meter.peak)
    gathered: list = [None] * p
    dist.all_gather_object(gathered, {"idle": statistics.median(idle), "peak_in_flight": max(peaks)})
    return {"schedule": schedule_name, "p": p, "m": m, "theory_idle": theory(p, m),
            "idle_per_rank": [g["idle"] for g in gathered],
            "peak_in_flight_per_stage": [g["peak_in_flight"] for g in gathered]}


def worker(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rows = [measure(name, m) for name in SCHEDULES for m in MICROBATCHES]
    if dist.get_rank() == 0:
        for row in rows:
            row["max_abs_error"] = max(abs(i - row["theory_idle"]) for i in row["idle_per_rank"])
            print(f"{row['schedule']:5s} m={row['m']}: idle per rank "
                  + ", ".join(f"{i:.3f}" for i in row["idle_per_rank"])
                  + f" | theory {row['theory_idle']:.3f} | peak in flight per stage {row['peak_in_flight_per_stage']}",
                  flush=True)
        result = {"benchmark": "pipeline_bubble", "forward_s": FORWARD_S, "backward_s": BACKWARD_S,
                  "steps": STEPS, "goal_max_abs_error": GOAL, "results": rows,
                  "within_goal": all(r["max_abs_error"] <= GOAL for r in rows)}
        out.write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


def plot(result_file: Path) -> Path:
    plt = pyplot()
    rows = json.loads(result_file.read_text())["results"]
    fig, (idle_ax, peak_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in zip(SCHEDULES, ("tab:blue", "tab:orange")):
        mine = [r for r in rows if r["schedule"] == name]
        ms = [r["m"] for r in mine]
        for stage, marker in ((0, "o"), (1, "s")):
            idle_ax.plot(ms, [r["idle_per_rank"][stage] for r in mine], marker, color=color, linestyle="",
                         label=f"{name} rank {stage} (measured)")
        peak_ax.plot(ms, [r["peak_in_flight_per_stage"][0] for r in mine], "o-", color=color, label=f"{name} stage 0")
        peak_ax.plot(ms, [r["peak_in_flight_per_stage"][1] for r in mine], "s--", color=color, label=f"{name} stage 1")
    fine = [m / 10 for m in range(15, 85)]
    idle_ax.plot(fine, [theory(2, m) for m in fine], "k-", linewidth=1, label="(p-1)/(m+p-1), p=2")
    idle_ax.set_xlabel("micro-batches m")
    idle_ax.set_ylabel("idle fraction of the pipeline step")
    idle_ax.set_xticks(list(MICROBATCHES))
    idle_ax.legend(fontsize=7)
    idle_ax.set_title(f"bubble, uniform stages (F {FORWARD_S * 1000:.0f} ms, B {BACKWARD_S * 1000:.0f} ms)")
    peak_ax.set_xlabel("micro-batches m")
    peak_ax.set_ylabel("peak micro-batches in flight")
    peak_ax.set_xticks(list(MICROBATCHES))
    peak_ax.legend(fontsize=7)
    peak_ax.set_title("activation memory proxy")
    return save_png(fig, result_file, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "pipeline_bubble.json")
    args = parser.parse_args()
    if args.worker:
        worker(args.out)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    __file__, "--worker", "--out", str(args.out)], cwd=REPO, env=env, check=True)
    print(f"wrote {args.out} and {plot(args.out)}")


if __name__ == "__main__":
    main()
