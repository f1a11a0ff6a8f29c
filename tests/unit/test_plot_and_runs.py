"""`meshyard plot` draws real runs' metrics into a PNG, one colour per run; `meshyard runs` tells
finished, stopped, preempted, failed and running runs apart from what their directories hold."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from launcher import plot
from launcher.interrupts import PreemptionFlag
from launcher.runlock import hold_run
from launcher.session import prepare
from tests.helpers import REPO, make_spec, meshyard, run_dir, train_in_process

EVAL = {"eval_kwargs": {"n": 96, "seed": 1}}
PANELS = ["loss", "eval_loss", "lr", "samples_per_s", "peak_rss_bytes",
          "mem_grads_bytes", "mem_optim_bytes", "mem_params_bytes"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plot")
    return [train_in_process(make_spec(tmp, name, optimizer={"lr": lr}, data=EVAL, training={"eval_every": 5}))
            for name, lr in (("fast", 0.05), ("slow", 0.005))]


def colour_pixels(png, colour: str) -> int:
    """Pixels of exactly the colour cycle's `colour` (line centres; antialiased edges are blends)."""
    rgb = np.round(imread(png)[..., :3] * 255).astype(int)
    return int((rgb == np.round(np.array(to_rgb(colour)) * 255).astype(int)).all(axis=-1).sum())


def test_plot_draws_each_quantity_with_one_line_per_run(two_runs, tmp_path):
    out = tmp_path / "x.png"
    result = meshyard("plot", *map(str, two_runs), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out} ({', '.join(PANELS)})"
    height, width = imread(out).shape[:2]
    rows = math.ceil(len(PANELS) / plot.COLUMNS)
    expected_inches = (plot.COLUMNS * plot.PANEL_INCHES[0], rows * plot.PANEL_INCHES[1] + plot.LEGEND_INCHES)
    assert (width, height) == (round(expected_inches[0] * plot.DPI), round(expected_inches[1] * plot.DPI))
    # Both runs' lines are drawn across the panels: far more of each colour than a legend swatch holds.
    assert colour_pixels(out, "C0") > 1000 and colour_pixels(out, "C1") > 1000

    alone = meshyard("plot", str(two_runs[0]))
    assert alone.returncode == 0, alone.stderr
    default = two_runs[0] / "plot.png"
    assert alone.stdout.startswith(f"wrote {default} (")
    assert colour_pixels(default, "C0") > 1000 and colour_pixels(default, "C1") == 0


def test_plot_refuses_what_is_not_a_run(two_runs, tmp_path):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    cases = [
        (["plot", str(two_runs[0]), str(not_a_run)], f"error: {not_a_run}: not a run directory (no metrics.jsonl"),
        (["plot", str(two_runs[0]), "--out", str(tmp_path / "x.jpeg2k")], f"error: --out {tmp_path / 'x.jpeg2k'}:"),
        (["plot", str(two_runs[0]), "--out", str(tmp_path / "missing" / "x.png")], "error: "),
        (["runs", str(tmp_path / "missing")], f"error: {tmp_path / 'missing'}: no such directory"),
    ]
    for args, first_words in cases:
        result = meshyard(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(first_words) and len(result.stderr.splitlines()) == 1, (args, result.stderr)


def test_help_lists_the_commands_and_the_cli_does_not_import_matplotlib():
    listing = meshyard("--help").stdout
    assert "plot " in listing and "runs " in listing
    probe = "import sys, launcher.cli; launcher.cli.build_parser(); print('matplotlib' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "False", imported.stderr


def test_runs_tells_each_ending_from_the_run_directory(tmp_path):
    train_in_process(make_spec(tmp_path, "done"))
    train_in_process(make_spec(tmp_path, "paused", training={"stop_at_step": 4}))
    requested = PreemptionFlag()
    requested.requested = True  # as SIGTERM sets it: the loop checkpoints at the next vote and stops
    train_in_process(make_spec(tmp_path, "preempted"), preemption=requested)
    preempted_at = json.loads((tmp_path / "runs" / "preempted" / "preempted.json").read_text())["step"]
    # Finishes in-process (no RANK), then a longer relaunch's rank 0 fails on its first item: the
    # older summary.json must not read as the run's end.
    crashing = make_spec(tmp_path, "crashed", data={"target": "tests.fixtures.faulty:SlowDataset", "kwargs": {
        "n": 480, "in_dim": 8, "out_dim": 1, "delay_s": 0.0, "crash": "exception", "crash_rank": 0,
        "crash_at_call": 1}})
    train_in_process(crashing)
    relaunch = meshyard("launch", str(crashing), "--set", "training.max_steps=20")
    assert relaunch.returncode == 1, relaunch.stderr[-2000:]
    live = prepare(str(make_spec(tmp_path, "live")), [])
    live.write_spec()

    with hold_run(live.run_dir):  # the lock a launch holds while it runs, held by this (live) process
        listed = meshyard("runs", str(tmp_path / "runs"), "--json")
        table = meshyard("runs", str(tmp_path / "runs"))
    assert listed.returncode == 0 and table.returncode == 0, listed.stderr + table.stderr
    runs = {r["name"]: r for r in json.loads(listed.stdout)}
    assert {name: (r["status"], r["steps"], r["max_steps"]) for name, r in runs.items()} == {
        "crashed": ("failed", 10, 20), "done": ("finished", 10, 10), "live": ("running", 0, 10),
        "paused": ("stopped", 4, 10), "preempted": ("preempted", preempted_at, 10)}
    assert "injected failure" in runs["crashed"]["error"]
    assert runs["done"]["final_loss"] == json.loads((run_dir(make_spec(tmp_path, "done")) / "summary.json")
                                                    .read_text())["final_loss"]

    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "STEPS", "LOSS", "WALL"]
    status_column = lines[0].index("STATUS")
    assert [line[status_column:].split()[0] for line in lines[1:6]] == [
        "failed", "finished", "running", "stopped", "preempted"]
    assert lines[6].startswith("crashed: ") and "injected failure" in lines[6]

    after = {r["name"]: r["status"] for r in json.loads(meshyard("runs", str(tmp_path / "runs"), "--json").stdout)}
    assert after["live"] == "failed"  # the lock's holder let go without a summary: that launch ended early
