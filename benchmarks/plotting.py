"""Headless matplotlib for the benchmarks: every script writes a PNG beside its JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, result_file: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    png = result_file.with_suffix(".png")
    fig.savefig(png, dpi=dpi)
    return png
