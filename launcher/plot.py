"""`meshyard plot`: runs' metrics.jsonl against step, one panel per quantity, one line per run.

matplotlib is imported here only, when the command runs (the CLI stays quick to start), and only
its object API: a Figure rendered by the Agg canvas, no pyplot and no display.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.metrics import read_metrics
from launcher.rundir import RunDir

COLUMNS = 3
PANEL_INCHES = (4.0, 2.6)  # width, height of one panel
LEGEND_INCHES = 0.45  # the strip above the panels that names the runs
DPI = 100
BYTE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
TITLES = {"loss": "loss", "lr": "learning rate", "samples_per_s": "samples/s", "tokens_per_s": "tokens/s",
          "peak_rss_bytes": "peak RSS", "cuda_max_allocated_bytes": "CUDA peak allocated",
          "cuda_max_reserved_bytes": "CUDA peak reserved"}


def plot_runs(runs: list[Path], out: Path | None = None) -> tuple[Path, list[str]]:
    """Draw `runs` into `out` (default: the first run's plot.png); the file and the panels drawn."""
    for run in runs:
        if not RunDir(run).metrics.is_file():
            raise UserError(f"{run}: not a run directory (no metrics.jsonl; give <output.dir>/<name>)")
    figure_class = _figure_class()
    out = out or RunDir(runs[0]).plot
    supported = figure_class().canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in supported:
        raise UserError(f"--out {out}: the name must end in one of {', '.join('.' + k for k in sorted(supported))}")
    curves = {label: read_metrics(run) for label, run in zip(run_labels(runs), runs)}
    panels = panel_keys(list(curves.values()))
    if not panels:
        raise UserError(f"{', '.join(map(str, runs))}: nothing logged yet (metrics.jsonl has no records)")
    _draw(figure_class, curves, panels).savefig(out)
    return out, panels


def run_labels(runs: list[Path]) -> list[str]:
    """Each run's name (its directory's), or the path as given where two runs share a name."""
    names = [run.resolve().name for run in runs]
    return [name if names.count(name) == 1 else str(run) for name, run in zip(names, runs)]


def panel_keys(curves: list[list[dict[str, Any]]]) -> list[str]:
    """The quantities some run logged a number for, in reading order: loss, eval metrics, learning rate,
    throughput, memory."""
    logged = {key for records in curves for record in records for key, value in record.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool)}
    evals = sorted(k for k in logged if k.startswith("eval_"))
    model_state = sorted(k for k in logged if k.startswith("mem_") and k.endswith("_bytes"))
    order = ["loss", *evals, "lr", "samples_per_s", "tokens_per_s", "peak_rss_bytes", "cuda_max_allocated_bytes",
             "cuda_max_reserved_bytes", *model_state]
    return [key for key in order if key in logged]


def figure_inches(panels: int) -> tuple[float, float]:
    rows = math.ceil(panels / COLUMNS)
    return COLUMNS * PANEL_INCHES[0], rows * PANEL_INCHES[1] + LEGEND_INCHES


def title(key: str) -> str:
    if key in TITLES:
        return TITLES[key]
    if key.startswith("mem_"):
        return f"{key.removeprefix('mem_').removesuffix('_bytes')} memory"
    return key.replace("_", " ")


def byte_unit(largest: float) -> tuple[str, int]:
    """The largest unit in which `largest` bytes is at least 1 (a 10k-parameter test model and a 7B one
    both read as numbers, not as 0.0016 or 2.8e10)."""
    return next(((name, size) for name, size in BYTE_UNITS if largest >= size), ("bytes", 1))


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("meshyard plot needs matplotlib: pip install 'meshyard[plot]'") from None
    return Figure


def _draw(figure_class: Any, curves: dict[str, list[dict[str, Any]]], panels: list[str]) -> Any:
    figure = figure_class(figsize=figure_inches(len(panels)), dpi=DPI, layout="constrained")
    rows = math.ceil(len(panels) / COLUMNS)
    axes = figure.subplots(rows, COLUMNS, sharex=True, squeeze=False).flatten()
    for ax, key in zip(axes, panels):
        series = [[(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                  for records in curves.values()]
        label, scale = title(key), 1
        if key.endswith("_bytes"):
            unit, scale = byte_unit(max(value for points in series for _, value in points))
            label += f" ({unit})"
        for index, points in enumerate(series):
            if points:
                steps, values = zip(*points)
                # Sparse curves (eval every N steps, short runs) get markers: one point draws no line.
                ax.plot(steps, [v / scale for v in values], color=f"C{index}",
                        marker="." if len(points) <= 30 else None)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8, labelbottom=True)
    for ax in axes[len(panels):]:
        ax.remove()
    for ax in axes[max(0, len(panels) - COLUMNS):len(panels)]:
        ax.set_xlabel("step", fontsize=9)
    handles = [axes[0].plot([], [], color=f"C{index}")[0] for index in range(len(curves))]
    figure.legend(handles, list(curves), loc="outside upper center", ncols=min(len(curves), 4), fontsize=9,
                  frameon=False)
    return figure
