"""Size / accuracy / latency trade-offs of meshyard's compression on the built-in classifier.

Trains, in this process (1 rank): a dense classifier; the same pruned to 50% and 80% global sparsity
during training; int8 dynamic and static quantizations of the dense one; an 8x narrower student
trained alone on all data, and on 512 examples alone and distilled from the dense one. All latencies are medians of
forward passes measured side by side, in one process, on one batch.

    python benchmarks/compression.py        # writes results/compression.{json,png}
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.plotting import pyplot, save_png  # noqa: E402  (after the sys.path insert)

RESULTS = REPO / "benchmarks" / "results"

DATA = {"target": "launcher.data:synthetic_classification", "micro_batch_size": 64,
        "kwargs": {"n": 16384, "in_dim": 32, "num_classes": 10}, "eval_kwargs": {"n": 2048, "seed": 1}}
BASE = {"seed": 0, "data": DATA, "loss": "cross_entropy", "optimizer": {"name": "adam", "lr": 2.0e-3},
        "training": {"max_steps": 400, "log_every": 100}}
DENSE = {"target": "launcher.models:classifier",
         "kwargs": {"in_dim": 32, "hidden": 256, "num_classes": 10, "depth": 2}}
BATCH = 256
STUDENT = {"target": "launcher.models:classifier",
           "kwargs": {"in_dim": 32, "hidden": 32, "num_classes": 10, "depth": 2}}


def train(workdir: Path, name: str, **sections) -> Path:
    from launcher.session import prepare
    from launcher.trainer import train as run_training

    spec_file = workdir / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump({**BASE, "name": name, "output": {"dir": str(workdir)}, **sections}))
    session = prepare(str(spec_file), [])
    session.write_spec()
    run_training(session.spec, session.plan, session.run_dir)
    return session.run_dir


def main() -> None:
    from launcher.compression.quantize import load_quantized, quantize_run
    from launcher.export import load_run_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = {"dense": train(work, "dense", model=DENSE)}
        for amount in (0.5, 0.8):
            prune = {"amount": amount, "schedule": {"start_step": 100, "end_step": 300, "every": 25}}
            runs[f"pruned {int(amount * 100)}%"] = train(work, f"pruned{int(amount * 100)}", model=DENSE,
                                                        compression={"prune": prune})
        runs["student alone"] = train(work, "student", model=STUDENT)
        # Distillation pays where labels are scarce: the student sees 512 examples, the teacher saw all.
        few = {**DATA, "kwargs": {**DATA["kwargs"], "n": 512}}
        runs["student, 512 examples"] = train(work, "student512", model=STUDENT, data=few)
        runs["student, 512 examples, distilled"] = train(work, "distilled512", model=STUDENT, data=few, compression={
            "distill": {"teacher": {"checkpoint": str(runs["dense"])}, "temperature": 2.0, "alpha": 0.7}})

        models, rows = {}, {}
        for label, run in runs.items():
            models[label] = load_run_model(run)[1]
            summary = json.loads((run / "summary.json").read_text())
            torch.save(models[label].state_dict(), work / "size.pt")
            rows[label] = {"eval_accuracy": summary["eval_accuracy"], "eval_loss": summary["eval_loss"],
                           "size_bytes": (work / "size.pt").stat().st_size,
                           "nonzero_params": sum(int((p != 0).sum()) for p in models[label].parameters())}
        for method in ("dynamic_int8", "static_int8"):
            report = quantize_run(runs["dense"], method, 16 if method == "static_int8" else None)
            label = f"dense {method}"
            models[label] = load_quantized(runs["dense"])
            rows[label] = {"eval_accuracy": report["eval"]["int8"]["accuracy"],
                           "eval_loss": report["eval"]["int8"]["loss"],
                           "size_bytes": report["size_bytes"]["int8"],
                           "nonzero_params": rows["dense"]["nonzero_params"]}
        batch = torch.randn(BATCH, 32)
        for label, latency in latencies(models, batch).items():
            rows[label]["latency_ms"] = latency

    result = {"benchmark": "compression", "batch_size": BATCH, "variants": rows, "base_spec": BASE,
              "models": {"dense": DENSE, "student": STUDENT}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "compression.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"| variant | eval accuracy | eval loss | size on disk | non-zero params | CPU latency (batch {BATCH}) |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['eval_accuracy']:.3f} | {r['eval_loss']:.4f} | {r['size_bytes'] / 1024:.0f} KiB"
              f" | {r['nonzero_params']:,} | {r['latency_ms']:.3f} ms |")
    print(f"wrote {out} and {plot(rows, out)}")


@torch.no_grad()
def latencies(models: dict, batch: torch.Tensor, repeats: int = 200) -> dict[str, float]:
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(repeats):
        for label, model in models.items():
            tick = time.perf_counter()
            model(batch)
            times[label].append(1000 * (time.perf_counter() - tick))
    return {label: statistics.median(t[repeats // 10:]) for label, t in times.items()}


def plot(rows: dict, out: Path) -> Path:
    plt = pyplot()
    labels = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, title in zip(axes, ("eval_accuracy", "size_bytes", "latency_ms"),
                              ("eval accuracy", "size on disk (KiB)", f"CPU latency, batch {BATCH} (ms)")):
        values = [rows[label][key] / (1024 if key == "size_bytes" else 1) for label in labels]
        ax.barh(labels, values)
        ax.set_title(title)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    return save_png(fig, out, dpi=110)


if __name__ == "__main__":
    main()
