"""What `training.compile` does to step time: compiled vs eager, side by side in one benchmark run.

Each round launches the same job twice with `meshyard launch`, eager and with `training.compile:
true` (which goes first alternates by round, so neither always meets a busier machine), on one
process and on 2 DDP ranks. Step time is taken over each launch's logged steps after the first two,
two ways: the median, and the first quartile ("quiet"), because other work on a shared machine only
ever slows a step down, in bursts that hit one launch and not the other. The ratios compiled / eager
are per round and configuration; the reported numbers are their medians over rounds. The compile
cost is compiled step 1 minus eager step 1: in round 0 with an empty inductor cache (the whole
compile), in later rounds with the cache round 0 filled (what a relaunch of the same model pays:
graph capture and cache loads).

    python benchmarks/compile_speed.py [--rounds 3]   # writes results/compile_speed.{json,png}
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
SPEC: dict[str, Any] = {  # a small GPT-style LM: layer norms, attention, GELU MLPs (what inductor fuses)
    "seed": 0,
    "model": {"target": "launcher.models:transformer",
              "kwargs": {"vocab_size": 32, "dim": 256, "n_heads": 4, "n_layers": 4, "max_len": 128}},
    "data": {"target": "launcher.data:char_corpus", "kwargs": {"n": 512, "seq_len": 128}, "micro_batch_size": 16},
    "loss": "token_cross_entropy",
    "optimizer": {"name": "adam", "lr": 1.0e-3},
    "training": {"max_steps": 24, "log_every": 1},
    "checkpoint": {"final": False},
}
CONFIGS = {"single": {"resources": {"procs_per_node": 1}},  # the global batch is 16 x processes
           "ddp2": {"resources": {"procs_per_node": 2}}}
SKIPPED_STEPS = 2  # the first (compile) and second (any recompile) steps are not steady state


def launch(workdir: Path, name: str, config: str, compiled: bool) -> list[float]:
    """Step times of one launch (seconds, one per step)."""
    from launcher.metrics import read_metrics

    training = {**SPEC["training"], "compile": compiled}
    raw = {**SPEC, **CONFIGS[config], "training": training, "name": name, "output": {"dir": str(workdir)}}
    spec_file = workdir / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(workdir / f"{config}-inductor")}  # empty in round 0
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "launch", str(spec_file)], cwd=REPO,
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return [record["step_time_s"] for record in read_metrics(workdir / name)]


def one_round(workdir: Path, index: int, config: str) -> dict[str, Any]:
    modes = [False, True] if index % 2 == 0 else [True, False]
    times = {compiled: launch(workdir, f"{config}-r{index}-{'compiled' if compiled else 'eager'}", config, compiled)
             for compiled in modes}
    eager, compiled = (statistics.median(times[mode][SKIPPED_STEPS:]) for mode in (False, True))
    quiet_eager, quiet_compiled = (statistics.quantiles(times[mode][SKIPPED_STEPS:])[0] for mode in (False, True))
    return {"config": config, "round": index, "first": "compiled" if modes[0] else "eager",
            "eager_step_s": eager, "compiled_step_s": compiled, "ratio": compiled / eager,
            "quiet_eager_step_s": quiet_eager, "quiet_compiled_step_s": quiet_compiled,
            "quiet_ratio": quiet_compiled / quiet_eager,
            "eager_first_step_s": times[False][0], "compiled_first_step_s": times[True][0],
            "compile_cost_s": times[True][0] - times[False][0], "inductor_cache": "empty" if index == 0 else "warm",
            "step_times_s": {"eager": times[False], "compiled": times[True]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "compile_speed.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            for config in CONFIGS:
                rows.append(one_round(Path(tmp), index, config))
                row = rows[-1]
                print(f"round {index} {config}: eager {1000 * row['eager_step_s']:.1f} ms/step, compiled"
                      f" {1000 * row['compiled_step_s']:.1f} ms/step, ratio {row['ratio']:.2f} (quiet"
                      f" {row['quiet_ratio']:.2f}), compile cost {row['compile_cost_s']:.0f} s", flush=True)
    summary = {config: {"median_ratio": statistics.median(r["ratio"] for r in rows if r["config"] == config),
                        "median_quiet_ratio": statistics.median(r["quiet_ratio"] for r in rows
                                                                if r["config"] == config),
                        "compile_cost_s_empty_cache": next(r["compile_cost_s"] for r in rows if r["config"] == config),
                        "compile_cost_s_warm_cache": [r["compile_cost_s"] for r in rows
                                                      if r["config"] == config and r["round"] > 0]}
               for config in CONFIGS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "compile_speed", "spec": SPEC, "configs": CONFIGS,
                                    "skipped_steps": SKIPPED_STEPS, "summary": summary, "rounds": rows}, indent=1))
    print(json.dumps(summary))
    print(f"wrote {args.out} and {plot(rows, summary, args.out)}")


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = list(range(len(rows)))
    ax.bar([x - 0.2 for x in xs], [1000 * r["eager_step_s"] for r in rows], 0.4, label="eager")
    ax.bar([x + 0.2 for x in xs], [1000 * r["compiled_step_s"] for r in rows], 0.4, label="training.compile")
    ax.set_xticks(xs, [f"{r['config']}\nround {r['round']}" for r in rows], fontsize=7)
    ax.set_ylabel("median ms / step (steps 3+)")
    ratios = ", ".join(f"{config} {s['median_ratio']:.2f} (quiet {s['median_quiet_ratio']:.2f})"
                       for config, s in summary.items())
    ax.set_title(f"compiled / eager, median over rounds: {ratios}", fontsize=9)
    ax.legend(fontsize=8)
    return save_png(fig, out, dpi=120)


if __name__ == "__main__":
    main()
