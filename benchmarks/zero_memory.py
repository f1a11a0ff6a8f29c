"""Real per-rank memory by ZeRO stage and world size, next to the ZeRO theory, plus step time.

Each configuration is a real `meshyard launch` of a 100.7M-parameter MLP (fp32, Adam) on N local
gloo processes, in the environment the launcher gives its ranks (on CPU: glibc malloc told to
return freed buffers, docs/strategies.md "Memory on CPU"). What a rank really uses for the model is
its peak RSS minus its RSS just before the model was built, both taken by that rank in the same run
(`peak_rss_bytes_by_rank`, `rss_before_model_bytes_by_rank` in the run's summary.json); the largest
rank is reported. The theory is the plan's (`launcher/memory.py`: fp32 Adam DDP 16 B/param, ZeRO-1
4+4+8/N, ZeRO-2 4+12/N, ZeRO-3 16/N). The goal, per stage: measured saving against DDP >= 0.8 x the
theoretical saving. The strategy's own accounting (`mem_*_bytes`, what it stores) is kept beside
the measurement. Step time: median of the logged steps after the first, as a ratio to DDP's at the
same N, in the same benchmark run.

A configuration is a label and the spec sections it changes (CONFIGS), run at the world sizes
WORLD_SIZES allows; its theory comes from its plan. Each row is compared with its baseline (BASELINE:
DDP at the same N; activation checkpointing on against off) measured in the same invocation, and
records the baseline's numbers it was compared with. The activation-checkpointing rows train a
transformer LM whose activations outweigh its model state (sequence 256, micro-batch 8), since
the 100.7M MLP's activations at micro-batch 8 are a few MiB.

    python benchmarks/zero_memory.py                      # writes results/zero_memory.{json,png}
    python benchmarks/zero_memory.py --only hsdp ac_full  # runs those and their baselines; merges into the JSON
    python benchmarks/zero_memory.py --procs 2 --only ddp zero3 --env MALLOC_ARENA_MAX=2 --out /tmp/x.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.plotting import pyplot, save_png  # noqa: E402  (after the sys.path insert)

RESULTS = REPO / "benchmarks" / "results"
MIB = 2**20
IN_DIM, HIDDEN, DEPTH = 2048, 2048, 24  # 24 blocks of 4.2M parameters: a transformer's tensor sizes, not one slab
NUM_PARAMS = DEPTH * (HIDDEN * HIDDEN + HIDDEN) + HIDDEN + 1  # in_dim == hidden; head to 1 output
SPEC: dict[str, Any] = {
    "seed": 0,
    "model": {"target": "launcher.models:mlp",
              "kwargs": {"in_dim": IN_DIM, "hidden": HIDDEN, "out_dim": 1, "depth": DEPTH}},
    "data": {"target": "launcher.data:synthetic_regression", "kwargs": {"n": 256, "in_dim": IN_DIM, "out_dim": 1},
             "micro_batch_size": 8},
    "optimizer": {"name": "adam", "lr": 1.0e-4},
    "training": {"max_steps": 4, "log_every": 1},
    "checkpoint": {"final": False},
}
LM = {  # 25.2M parameters; activations ~16 x micro-batch x seq_len x dim floats per layer
    "model": {"target": "launcher.models:transformer",
              "kwargs": {"vocab_size": 32, "dim": 512, "n_heads": 8, "n_layers": 8, "max_len": 256}},
    "data": {"target": "launcher.data:char_corpus", "kwargs": {"n": 128, "seq_len": 256}, "micro_batch_size": 8},
    "loss": "token_cross_entropy",
}
CONFIGS: dict[str, dict[str, Any]] = {
    "ddp": {"strategy": {"name": "ddp"}},
    "zero1": {"strategy": {"name": "zero", "stage": 1}},
    "zero2": {"strategy": {"name": "zero", "stage": 2}},
    "zero3": {"strategy": {"name": "zero", "stage": 3}},
    "hsdp": {"strategy": {"name": "zero", "stage": 3}, "parallel": {"data_replicate": 2, "data_shard": 2}},
    "deepspeed1": {"strategy": {"name": "deepspeed", "stage": 1}},
    "deepspeed2": {"strategy": {"name": "deepspeed", "stage": 2}},
    "deepspeed3": {"strategy": {"name": "deepspeed", "stage": 3}},
    "ac_none": {**LM, "strategy": {"name": "ddp"}},
    "ac_full": {**LM, "strategy": {"name": "ddp"},
                "training": {**SPEC["training"], "activation_checkpointing": "full"}},
}
WORLD_SIZES = {"hsdp": (4,), "ac_none": (2,), "ac_full": (2,)}  # the others run at every --procs
BASELINE = {"ddp": None, "ac_none": None, "ac_full": "ac_none"}  # the others: ddp
GOAL = 0.8  # measured saving vs DDP / theoretical saving


def launch(workdir: Path, label: str, procs: int, env: dict[str, str]) -> dict[str, Any]:
    from launcher.metrics import read_metrics

    name = f"{label}-{procs}"
    raw = {**SPEC, **CONFIGS[label], "name": name, "resources": {"procs_per_node": procs},
           "output": {"dir": str(workdir)}}
    spec_file = workdir / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "launch", str(spec_file)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    run = workdir / name
    summary = json.loads((run / "summary.json").read_text())
    theory = json.loads((run / "plan.json").read_text())["model_state_theory"]
    records = read_metrics(run)
    peaks, baselines = summary["peak_rss_bytes_by_rank"], summary["rss_before_model_bytes_by_rank"]
    used = [peak - base for peak, base in zip(peaks, baselines)]
    num_params = count_params(spec_file)
    return {
        "strategy": label, "world_size": procs, "num_params": num_params,
        "measured_bytes": max(used),  # the largest rank's peak RSS above its own before-model RSS
        "measured_bytes_by_rank": used,
        "peak_rss_bytes_by_rank": peaks, "rss_before_model_bytes_by_rank": baselines,
        "theory_bytes": sum(theory.values()) * num_params,
        "accounted_bytes": {k: records[-1][f"mem_{k}_bytes"] for k in ("params", "grads", "optim")},
        "step_time_s_median": statistics.median(r["step_time_s"] for r in records[1:]),
    }


def count_params(spec_file: Path) -> int:
    from launcher.plan import meta_model
    from launcher.spec import load_spec

    return sum(p.numel() for p in meta_model(load_spec(spec_file)).parameters())


def baseline_of(label: str) -> str | None:
    return BASELINE.get(label, "ddp")


def launches(asked: list[str], world_sizes: list[int]) -> list[tuple[int, str]]:
    """(N, label) of every launch: the asked configurations at the N they run at, and their baselines there."""
    plan = []
    for procs in world_sizes:
        wanted = {label for label in asked if procs in WORLD_SIZES.get(label, (procs,))}
        wanted |= {base for base in map(baseline_of, wanted) if base is not None}
        plan += [(procs, label) for label in CONFIGS if label in wanted]
    return plan


def compare(rows: list[dict[str, Any]]) -> None:
    """Each row against its baseline at the same N, both from this invocation: measured saving; against
    DDP also the theoretical saving, their ratio and the goal; step time over the baseline's."""
    runs = {(r["strategy"], r["world_size"]): r for r in rows}
    for row in rows:
        if row["strategy"] == "ddp":
            row["step_time_vs_ddp"] = 1.0
        if (name := baseline_of(row["strategy"])) is None:
            continue
        base = runs[(name, row["world_size"])]
        row["baseline"] = {"strategy": name, "measured_bytes": base["measured_bytes"],
                           "step_time_s_median": base["step_time_s_median"]}
        row["saving_measured_bytes"] = base["measured_bytes"] - row["measured_bytes"]
        row[f"step_time_vs_{'ddp' if name == 'ddp' else 'baseline'}"] = (
            row["step_time_s_median"] / base["step_time_s_median"])
        if name == "ddp":
            row["saving_theory_bytes"] = base["theory_bytes"] - row["theory_bytes"]
            row["saving_ratio"] = row["saving_measured_bytes"] / row["saving_theory_bytes"]
            row["goal_met"] = row["saving_ratio"] >= GOAL


def merge(earlier: list[dict[str, Any]], rows: list[dict[str, Any]], asked: list[str]) -> list[dict[str, Any]]:
    """The earlier results with this invocation's rows of `asked` configurations in place of theirs; a
    baseline run only to compare with is added where the file has none (each new row records the
    baseline numbers it was compared with, so earlier rows keep their own baseline)."""
    def key(row: dict[str, Any]) -> tuple[str, int]:
        return row["strategy"], row["world_size"]

    new = {key(row): row for row in rows if row["strategy"] in asked or key(row) not in map(key, earlier)}
    kept = [row for row in earlier if key(row) not in new]
    order = list(CONFIGS)
    return sorted([*kept, *new.values()], key=lambda row: (row["world_size"], order.index(row["strategy"])))


def describe(row: dict[str, Any]) -> str:
    ratio = row.get("step_time_vs_ddp", row.get("step_time_vs_baseline", 1.0))
    base = baseline_of(row["strategy"]) or row["strategy"]
    line = (f"N={row['world_size']} {row['strategy']:10s} measured {row['measured_bytes'] / MIB:6.0f} MiB"
            f"  theory {row['theory_bytes'] / MIB:6.0f} MiB  step {row['step_time_s_median']:.2f} s"
            f" ({ratio:.2f} x {base})")
    if "saving_ratio" in row:
        line += (f"  saving {row['saving_measured_bytes'] / MIB:5.0f} of {row['saving_theory_bytes'] / MIB:5.0f} MiB"
                 f" = {row['saving_ratio']:.2f} {'ok' if row['goal_met'] else 'BELOW GOAL'}")
    elif "saving_measured_bytes" in row:
        line += f"  saving {row['saving_measured_bytes'] / MIB:5.0f} MiB vs {base}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS),
                        help="configurations to run (with their baselines), merged into --out's earlier results")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="set in the launcher's environment (e.g. an allocator setting to compare)")
    parser.add_argument("--out", type=Path, default=RESULTS / "zero_memory.json")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    asked = args.only or list(CONFIGS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs, label in launches(asked, args.procs):
            rows.append(launch(Path(tmp), label, procs, env))
            print(f"N={procs} {label}: {rows[-1]['measured_bytes'] / MIB:.0f} MiB,"
                  f" {rows[-1]['step_time_s_median']:.2f} s/step", flush=True)
    compare(rows)
    for row in rows:
        print(describe(row))
    if args.only and args.out.exists():
        rows = merge(json.loads(args.out.read_text())["results"], rows, asked)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "zero_memory", "spec": SPEC, "configs": CONFIGS, "env": env,
                                    "goal_saving_ratio": GOAL, "results": rows}, indent=1))
    print(f"wrote {args.out} and {plot(rows, args.out)}")


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    plt = pyplot()
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{r['strategy'].replace('deepspeed', 'ds')}\nN={r['world_size']}" for r in rows]
    ratios = [r.get("step_time_vs_ddp", r.get("step_time_vs_baseline", 1.0)) for r in rows]
    xs = list(range(len(rows)))
    mem_ax.bar([x - 0.2 for x in xs], [r["measured_bytes"] / MIB for r in rows], 0.4, color="tab:blue",
               label="measured: peak RSS - RSS before the model (largest rank)")
    mem_ax.bar([x + 0.2 for x in xs], [r["theory_bytes"] / MIB for r in rows], 0.4, color="tab:gray",
               label="ZeRO theory (params + grads + Adam)")
    for x, row in zip(xs, rows):
        if "saving_ratio" in row:
            mem_ax.annotate(f"{row['saving_ratio']:.2f}", (x - 0.2, row["measured_bytes"] / MIB), ha="center",
                            va="bottom", fontsize=7, color="tab:green" if row["goal_met"] else "tab:red")
        elif "saving_measured_bytes" in row:  # against a baseline other than DDP: the MiB saved
            mem_ax.annotate(f"-{row['saving_measured_bytes'] / MIB:.0f}", (x - 0.2, row["measured_bytes"] / MIB),
                            ha="center", va="bottom", fontsize=7, color="tab:green")
    mem_ax.set_xticks(xs, labels, fontsize=7)
    mem_ax.set_ylabel("MiB per rank")
    mem_ax.set_title(f"{NUM_PARAMS / 1e6:.1f}M-param MLP, fp32 Adam (number: measured saving vs DDP"
                     f" / theoretical saving, goal >= {GOAL});\nac_*: 25.2M-param LM, seq 256, DDP, activation"
                     " checkpointing off/full", fontsize=9)
    mem_ax.set_ylim(0, 1.25 * max(r["measured_bytes"] / MIB for r in rows))
    mem_ax.legend(fontsize=8, loc="upper left")
    time_ax.bar(xs, ratios, 0.6, color="tab:orange")
    time_ax.axhline(1.0, color="black", linewidth=0.8)
    time_ax.set_xticks(xs, labels, fontsize=7)
    time_ax.set_ylabel("median step time / baseline's (DDP; ac_full: ac_none)")
    time_ax.set_title("step time (gloo, 2 shared CPU cores)", fontsize=9)
    return save_png(fig, out, dpi=110)


if __name__ == "__main__":
    main()
