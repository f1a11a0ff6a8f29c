"""Time to first step, by phase, for each meshyard executor next to the same job started bare.

Pairs, run side by side and interleaved in every repetition (medians over repetitions):
  meshyard launch (local)       vs  torchrun benchmarks/bare/rank.py
  meshyard launch --executor ray        vs  a bare TorchTrainer script (benchmarks/bare/ray_driver.py)
  meshyard launch --executor accelerate vs  accelerate launch benchmarks/bare/rank.py
Same model (MLP 32-256-256-1), Adam, micro-batch 64 x accumulation 2, 2 ranks over gloo. The clock
starts when this script starts the command (MESHYARD_LAUNCHED_AT / BARE_LAUNCHED_AT), so `spawn`
includes the launcher's own start-up (CLI imports, spec and plan for meshyard), process start,
rendezvous and `import torch`. Goals: <= 1.15x torchrun, <= 1.05x bare Ray / bare Accelerate.

    python benchmarks/launch_overhead.py [--reps 3]   # writes results/launch_overhead.{json,png}
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

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.plotting import pyplot, save_png  # noqa: E402  (after the sys.path insert)
from launcher.startup import PHASES  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MESHYARD = str(Path(sys.executable).parent / "meshyard")
PY = sys.executable
BARE_RANK = str(REPO / "benchmarks" / "bare" / "rank.py")

SPEC = {
    "name": "launch-overhead", "seed": 0,
    "model": {"target": "launcher.models:mlp", "kwargs": {"in_dim": 32, "hidden": 256, "out_dim": 1, "depth": 2}},
    "data": {"target": "launcher.data:synthetic_regression", "kwargs": {"n": 8192, "in_dim": 32, "out_dim": 1},
             "micro_batch_size": 64},
    "optimizer": {"name": "adam", "lr": 3.0e-3, "grad_clip": 1.0},
    "training": {"max_steps": 1, "grad_accum_steps": 2},
    "strategy": {"name": "ddp"},
    "resources": {"procs_per_node": 2},
}
# label -> (command, extra environment); meshyard's commands get the spec path appended.
COMMANDS = {
    "meshyard local": ([MESHYARD, "launch"], {}),
    "bare torchrun": ([PY, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
                       BARE_RANK], {}),
    "meshyard ray": ([MESHYARD, "launch", "--executor", "ray"], {}),
    "bare TorchTrainer": ([PY, str(REPO / "benchmarks" / "bare" / "ray_driver.py")], {}),
    "meshyard accelerate": ([MESHYARD, "launch", "--executor", "accelerate"], {}),
    "bare accelerate": ([PY, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
                         "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                         "--dynamo_backend", "no", BARE_RANK],
                        {"ACCELERATE_USE_CPU": "1"}),
}
PAIRS = [("meshyard local", "bare torchrun", 1.15), ("meshyard ray", "bare TorchTrainer", 1.05),
         ("meshyard accelerate", "bare accelerate", 1.05)]


def measure(label: str, workdir: Path, rep: int) -> dict[str, float]:
    """One start of `label`; its time-to-first-step phases (seconds)."""
    argv, extra = COMMANDS[label]
    slug = label.replace(" ", "-")
    env = {**os.environ, **extra, "BARE_RESULT": str(workdir / f"{slug}-{rep}.json"),
           "BARE_STORAGE": str(workdir / "ray")}
    if label.startswith("meshyard"):
        spec = workdir / f"{slug}-{rep}.yaml"
        spec.write_text(yaml.safe_dump({**SPEC, "name": f"{slug}-{rep}", "output": {"dir": str(workdir)}}))
        argv = [*argv[:2], str(spec), *argv[2:]]
    env["MESHYARD_LAUNCHED_AT" if label.startswith("meshyard") else "BARE_LAUNCHED_AT"] = repr(time.time())
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    if label.startswith("meshyard"):
        return json.loads((workdir / f"{slug}-{rep}" / "summary.json").read_text())["startup_s"]
    return json.loads(Path(env["BARE_RESULT"]).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in COMMANDS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for label in COMMANDS:  # interleaved, so load changes hit both sides of a pair alike
                phases = measure(label, Path(tmp), rep)
                runs[label].append(phases)
                print(f"rep {rep} {label:20s} {sum(phases.values()):6.2f} s  "
                      + " ".join(f"{k} {v:.2f}" for k, v in phases.items()), flush=True)
    medians = {label: {**{p: statistics.median(r.get(p, 0.0) for r in rs) for p in PHASES},
                       "total": statistics.median(sum(r.values()) for r in rs)} for label, rs in runs.items()}
    pairs = [{"meshyard": m, "bare": b, "goal": goal, "ratio": medians[m]["total"] / medians[b]["total"]}
             for m, b, goal in PAIRS]
    for pair in pairs:
        print(f"{pair['meshyard']:20s} / {pair['bare']:18s} = {pair['ratio']:.2f} (goal <= {pair['goal']})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "launch_overhead.json"
    out.write_text(json.dumps({"benchmark": "launch_overhead", "spec": SPEC, "reps": args.reps, "runs": runs,
                               "medians": medians, "pairs": pairs}, indent=1))
    print(f"wrote {out} and {plot(medians, out)}")


def plot(medians: dict[str, dict[str, float]], out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    labels = list(medians)
    left = [0.0] * len(labels)
    for phase, color in zip(PHASES, ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red")):
        widths = [medians[label][phase] for label in labels]
        ax.barh(labels, widths, left=left, color=color, label=phase.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("median seconds from the command's start to the end of the first step (2 ranks, 2 CPU cores)")
    ax.legend(fontsize=8, loc="lower right")
    return save_png(fig, out)


if __name__ == "__main__":
    main()
