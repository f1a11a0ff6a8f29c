"""`meshyard plan`'s estimate against what real launches measure: peak memory of rank 0 and step time.

Each configuration is a real 2-process `meshyard launch` of the built-in transformer (or an HF Llama
built from a config). Measured peak = rank 0's peak RSS minus the peak RSS of the same launch with a
tiny model of the same strategy (the process's own torch/gloo/Python footprint, which the estimate
leaves out), with glibc told to return freed memory (FACTS.md: otherwise freed collective buffers
stay in the heap and hide sharding). Step time: the estimate's prediction from a calibration taken
at the start of the benchmark (`meshyard calibrate --procs 2`), against the median step (the first
left out) of a second, longer launch that runs as a user's `meshyard launch` does: the benchmark
sets no allocator variable, so the ranks get meshyard's own (MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ 1 MiB, launcher/allocator.py), as the plan the prediction comes from assumes.
The memory launch's 64 KiB thresholds make nearly every tensor a new mapping whose pages fault in,
so its steps are slower (its median is kept beside, as `measured_step_time_returning_memory_s`).

    python benchmarks/plan_accuracy.py           # writes results/plan_accuracy.{json,png}
    python benchmarks/plan_accuracy.py ddp-ac-full   # those configurations only: printed, nothing written
"""
from __future__ import annotations

import json
import os
import shutil
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
MESHYARD = str(Path(sys.executable).parent / "meshyard")
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
TIMED_STEPS = 8  # the timing launch's median step (the first left out) over 7 steps: 3 swung by +-15% here

TRANSFORMER = {"target": "launcher.models:transformer",
               "kwargs": {"vocab_size": 256, "dim": 384, "n_heads": 6, "n_layers": 6, "max_len": 64}}
TINY_TRANSFORMER = {"target": "launcher.models:transformer",
                    "kwargs": {"vocab_size": 256, "dim": 24, "n_heads": 6, "n_layers": 2, "max_len": 64}}
LLAMA = {"target": "launcher.hf:causal_lm",
         "kwargs": {"arch": "llama", "vocab_size": 256, "hidden_size": 384, "intermediate_size": 1024,
                    "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 6,
                    "max_position_embeddings": 64}}
TINY_LLAMA = {**LLAMA, "kwargs": {**LLAMA["kwargs"], "hidden_size": 24, "intermediate_size": 32,
                                  "num_hidden_layers": 2}}
BASE = {
    "seed": 0,
    "data": {"target": "launcher.data:char_corpus", "kwargs": {"n": 256, "seq_len": 64}, "micro_batch_size": 8},
    "loss": "token_cross_entropy",
    "optimizer": {"name": "adam", "lr": 1.0e-4},  # zero stage 1 refuses adamw on torch 2.13
    "training": {"max_steps": 4, "log_every": 1},
    "resources": {"procs_per_node": 2},
}
LLAMA_DATA = {"data": {"target": "launcher.data:token_corpus", "kwargs": {"n": 256, "seq_len": 64},
                       "micro_batch_size": 8, "feed": "kwargs"}, "loss": "model"}
# name -> (spec sections over BASE, model, tiny model of the same family for the footprint baseline)
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "ddp": ({"strategy": {"name": "ddp"}}, TRANSFORMER, TINY_TRANSFORMER),
    "ddp-bf16": ({"strategy": {"name": "ddp"}, "training": {**BASE["training"], "precision": "bf16"}},
                 TRANSFORMER, TINY_TRANSFORMER),
    "ddp-ac-full": ({"strategy": {"name": "ddp"}, "training": {**BASE["training"], "activation_checkpointing": "full"}},
                    TRANSFORMER, TINY_TRANSFORMER),
    "zero1": ({"strategy": {"name": "zero", "stage": 1}}, TRANSFORMER, TINY_TRANSFORMER),
    "zero2": ({"strategy": {"name": "zero", "stage": 2}}, TRANSFORMER, TINY_TRANSFORMER),
    "zero3": ({"strategy": {"name": "zero", "stage": 3}}, TRANSFORMER, TINY_TRANSFORMER),
    "tp2": ({"parallel": {"tensor": 2}}, TRANSFORMER, TINY_TRANSFORMER),
    "pp2-1f1b": ({"parallel": {"pipeline": 2, "microbatches": 4, "schedule": "1f1b"}}, TRANSFORMER, TINY_TRANSFORMER),
    "pp2-gpipe": ({"parallel": {"pipeline": 2, "microbatches": 4, "schedule": "gpipe"}}, TRANSFORMER,
                  TINY_TRANSFORMER),
    "llama-zero3": ({"strategy": {"name": "zero", "stage": 3}, **LLAMA_DATA}, LLAMA, TINY_LLAMA),
}


def write_spec(workdir: Path, name: str, sections: dict[str, Any], model: dict[str, Any]) -> Path:
    raw = {**BASE, **sections, "name": name, "model": model, "output": {"dir": str(workdir)}}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def launch(spec: Path, env: dict[str, str], returning_memory: bool = True,
           overrides: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    from launcher.metrics import read_metrics
    from tests.helpers import run_dir

    shutil.rmtree(run_dir(spec), ignore_errors=True)  # the timing launch reuses the memory launch's spec
    done = subprocess.run([MESHYARD, "launch", str(spec), *overrides], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env, **(MALLOC if returning_memory else {})})
    if done.returncode:
        raise SystemExit(f"{spec.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return read_metrics(run_dir(spec))


def footprint(workdir: Path, sections: dict[str, Any], tiny: dict[str, Any], env: dict[str, str],
              cache: dict[str, int]) -> int:
    """Peak RSS of rank 0 with a tiny model of the same family and layout: torch, gloo, the strategy's
    imports, Python. One launch per strategy and mesh (precision and schedule do not change it)."""
    key = json.dumps([tiny["target"], sections.get("strategy"), sections.get("parallel", {}).get("tensor"),
                      sections.get("parallel", {}).get("pipeline")])
    if key not in cache:
        spec = write_spec(workdir, f"baseline-{len(cache)}", sections, tiny)
        cache[key] = launch(spec, env)[-1]["peak_rss_bytes"]
    return cache[key]


def run(workdir: Path, name: str, env: dict[str, str], baselines: dict[str, int]) -> dict[str, Any]:
    from launcher.planreport import step_time
    from launcher.session import prepare
    from launcher.steptime import StepTime

    sections, model, tiny = CONFIGS[name]
    spec = write_spec(workdir, name, sections, model)
    session = prepare(str(spec), [])
    estimate, predicted = session.estimate, step_time(session)
    assert not isinstance(estimate, str), estimate
    records = launch(spec, env)
    load_before = os.getloadavg()[0]
    timed = launch(spec, env, returning_memory=False, overrides=("--set", f"training.max_steps={TIMED_STEPS}"))
    baseline = footprint(workdir, sections, tiny, env, baselines)
    last, rank = records[-1], estimate.ranks[0]
    return {
        "config": name, "spec": yaml.safe_load(spec.read_text()), "params": estimate.total_params,
        "estimated_peak_bytes": rank.peak_bytes,
        "estimated_parts_bytes": {"params": rank.param_bytes, "grads": rank.grad_bytes, "optim": rank.optimizer_bytes,
                                  "activations": rank.activation_bytes, "buffers": rank.buffer_bytes},
        "measured_peak_bytes": last["peak_rss_bytes"] - baseline, "baseline_peak_rss_bytes": baseline,
        "measured_model_state_bytes": {k: last[f"mem_{k}_bytes"] for k in ("params", "grads", "optim")},
        "predicted_step_time_s": predicted.predicted_step_time_s if isinstance(predicted, StepTime) else None,
        "predicted_step_time_parts_s": {**predicted.parts, "optimizer": predicted.optimizer_s}
        if isinstance(predicted, StepTime) else None,
        "measured_step_time_s": statistics.median(r["step_time_s"] for r in timed[1:]),
        "measured_step_time_returning_memory_s": statistics.median(r["step_time_s"] for r in records[1:]),
        "timing_allocator_env": session.plan.allocator_env,  # what the timing launch's ranks got, as planned
        # other work on the machine slows the measured steps (and the calibration) unevenly: the
        # 1-minute load average around the timing launch says how quiet it was (2 ranks alone: ~2)
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "mfu": last.get("mfu"),
    }


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; expected some of {', '.join(CONFIGS)}")
    rows: list[dict[str, Any]] = []
    baselines: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        env = {"XDG_CACHE_HOME": str(workdir / "cache")}  # a fresh calibration, under today's load
        os.environ.update(env)
        subprocess.run([MESHYARD, "calibrate", "--procs", "2"], cwd=REPO, check=True, env={**os.environ, **env})
        for name in names or CONFIGS:
            row = run(workdir, name, env, baselines)
            row["memory_error"] = row["estimated_peak_bytes"] / row["measured_peak_bytes"] - 1
            if row["predicted_step_time_s"]:
                row["step_time_error"] = row["predicted_step_time_s"] / row["measured_step_time_s"] - 1
            rows.append(row)
            print(f"{name:12s} peak est {row['estimated_peak_bytes'] / 2**20:7.1f} MiB measured"
                  f" {row['measured_peak_bytes'] / 2**20:7.1f} MiB ({100 * row['memory_error']:+.0f}%)  step est"
                  f" {1000 * (row['predicted_step_time_s'] or 0):.0f} ms measured"
                  f" {1000 * row['measured_step_time_s']:.0f} ms ({100 * row.get('step_time_error', 0):+.0f}%;"
                  f" returning memory {1000 * row['measured_step_time_returning_memory_s']:.0f} ms)", flush=True)
    if names:
        return  # a subset: the results file holds every configuration
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "plan_accuracy.json"
    out.write_text(json.dumps({"benchmark": "plan_accuracy", "base_spec": BASE, "results": rows}, indent=1))
    print(f"wrote {out} and {plot(rows, out)}")


def replot() -> None:
    """The PNG again from the JSON (python -c 'from benchmarks.plan_accuracy import replot; replot()')."""
    out = RESULTS / "plan_accuracy.json"
    plot(json.loads(out.read_text())["results"], out)


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    plt = pyplot()
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, est, got, scale, unit, band in (
            (mem_ax, "estimated_peak_bytes", "measured_peak_bytes", 2**20, "MiB", 0.15),  # the goals
            (time_ax, "predicted_step_time_s", "measured_step_time_s", 1e-3, "ms", 0.25)):
        pairs = [(r[got] / scale, r[est] / scale, r["config"]) for r in rows if r[est]]
        top = max(max(x, y) for x, y, _ in pairs) * 1.15
        ax.plot([0, top], [0, top], color="gray", lw=1)
        ax.fill_between([0, top], [0, (1 - band) * top], [0, (1 + band) * top], color="gray", alpha=0.15,
                        label=f"+-{band:.0%}")
        for x, y, label in pairs:
            ax.scatter(x, y)
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"measured ({unit})")
        ax.set_ylabel(f"estimated ({unit})")
        ax.legend(fontsize=8)
    mem_ax.set_title("rank 0 peak memory above the process footprint")
    time_ax.set_title("step time (2 gloo ranks, after meshyard calibrate)")
    return save_png(fig, out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:])
