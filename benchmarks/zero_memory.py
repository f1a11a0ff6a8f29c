"""Per-rank model-state bytes by ZeRO stage and world size, measured vs theory, plus step time.

Each configuration is a real `meshyard launch` of a 12.6M-parameter MLP (fp32, Adam) on N local
gloo processes; the trainer's per-step memory accounting (summed local storage of parameters,
gradients and optimizer state) is read back from metrics.jsonl. Collective bytes per step are the
textbook volumes per parameter (gloo exposes no byte counters): DDP all-reduce 2(N-1)/N x 4,
ZeRO-1 adds a parameter broadcast (N-1)/N x 4, ZeRO-2 reduce-scatter + all-gather 2(N-1)/N x 4,
ZeRO-3 all-gather twice + reduce-scatter 3(N-1)/N x 4.

    python benchmarks/zero_memory.py        # writes results/zero_memory.{json,png}
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.plotting import pyplot, save_png  # noqa: E402  (after the sys.path insert)

RESULTS = REPO / "benchmarks" / "results"
MESHYARD = str(Path(sys.executable).parent / "meshyard")

SPEC = {
    "name": "zero-memory", "seed": 0,
    "model": {"target": "launcher.models:mlp", "kwargs": {"in_dim": 1024, "hidden": 1024, "out_dim": 1, "depth": 12}},
    "data": {"target": "launcher.data:synthetic_regression", "kwargs": {"n": 512, "in_dim": 1024, "out_dim": 1},
             "micro_batch_size": 8},
    "optimizer": {"name": "adam", "lr": 1.0e-4},
    "training": {"max_steps": 6, "log_every": 1},
}
STRATEGIES = {"ddp": {"name": "ddp"}, "zero1": {"name": "zero", "stage": 1},
              "zero2": {"name": "zero", "stage": 2}, "zero3": {"name": "zero", "stage": 3}}
COLLECTIVE_FACTOR = {"ddp": 2, "zero1": 3, "zero2": 2, "zero3": 3}  # x (N-1)/N x 4 bytes per parameter


def run(workdir: Path, label: str, procs: int) -> dict:
    from launcher.memory import theory_bytes_per_param
    from launcher.metrics import read_metrics
    from launcher.spec import validate_spec

    strategy = STRATEGIES[label]
    raw = {**SPEC, "name": f"{label}-{procs}", "strategy": strategy, "resources": {"procs_per_node": procs},
           "output": {"dir": str(workdir)}}
    spec_file = workdir / f"{label}-{procs}.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    subprocess.run([MESHYARD, "launch", str(spec_file)], cwd=REPO, check=True, capture_output=True)
    records = read_metrics(workdir / raw["name"])
    last = records[-1]
    num_params = 12 * (1024 * 1024 + 1024) + 1024 + 1
    theory = theory_bytes_per_param(strategy["name"], strategy.get("stage"), procs, validate_spec(raw).optimizer)
    return {
        "strategy": label, "world_size": procs, "num_params": num_params,
        "measured_bytes": {k: last[f"mem_{k}_bytes"] for k in ("params", "grads", "optim")},
        "theory_bytes": {k: v * num_params for k, v in theory.items()},
        "peak_rss_bytes": last["peak_rss_bytes"],
        "step_time_s_median": statistics.median(r["step_time_s"] for r in records[1:]),
        "collective_bytes_per_step_theory": COLLECTIVE_FACTOR[label] * (procs - 1) / procs * 4 * num_params,
    }


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (2, 4):
            for label in STRATEGIES:
                row = run(Path(tmp), label, procs)
                measured, theory = sum(row["measured_bytes"].values()), sum(row["theory_bytes"].values())
                row["ratio_measured_to_theory"] = measured / theory
                rows.append(row)
                print(f"N={procs} {label:6s} measured {measured / 2**20:7.1f} MiB  theory {theory / 2**20:7.1f} MiB"
                      f"  ratio {row['ratio_measured_to_theory']:.3f}  step {1000 * row['step_time_s_median']:.0f} ms"
                      f"  peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "zero_memory.json"
    out.write_text(json.dumps({"benchmark": "zero_memory", "spec": SPEC, "results": rows}, indent=1))
    print(f"wrote {out} and {plot(rows, out)}")


def plot(rows: list[dict], out: Path) -> Path:
    plt = pyplot()
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{r['strategy']}\nN={r['world_size']}" for r in rows]
    xs = range(len(rows))
    bottom = [0.0] * len(rows)
    for part, color in (("params", "tab:blue"), ("grads", "tab:orange"), ("optim", "tab:green")):
        values = [r["measured_bytes"][part] / 2**20 for r in rows]
        mem_ax.bar(xs, values, 0.6, bottom=bottom, color=color, label=f"measured {part}")
        bottom = [b + v for b, v in zip(bottom, values)]
    mem_ax.scatter(xs, [sum(r["theory_bytes"].values()) / 2**20 for r in rows], color="black", marker="_", s=600,
                   label="ZeRO theory", zorder=3)
    mem_ax.set_xticks(list(xs), labels, fontsize=8)
    mem_ax.set_ylabel("model-state MiB per rank")
    mem_ax.set_title("12.6M-param MLP, fp32 Adam")
    mem_ax.legend(fontsize=8)
    time_ax.bar(xs, [1000 * r["step_time_s_median"] for r in rows], 0.6, color="tab:gray")
    time_ax.set_xticks(list(xs), labels, fontsize=8)
    time_ax.set_ylabel("median step time (ms), gloo on 2 CPU cores")
    return save_png(fig, out, dpi=110)


if __name__ == "__main__":
    main()
