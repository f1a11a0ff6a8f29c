"""Kill a random rank (SIGKILL, by PID) at a random step, many times: does every run recover bit-exact?

Each trial starts `meshyard launch` on the SLOW fault-test job (2 ranks, DDP, checkpoint every 4
steps, max_restarts 1), kills a seeded-random rank at a seeded-random step, and compares the
finished run with an uninterrupted one (metrics and parameters, bit for bit). Also records how much
wall time a recovery costs against the uninterrupted run.

    python benchmarks/fault_recovery.py --trials 20   # writes results/fault_recovery.{json,png}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.plotting import pyplot, save_png  # noqa: E402  (after the sys.path insert)

RESULTS = REPO / "benchmarks" / "results"


def main() -> None:
    from tests.faults import SLOW, kill_random_rank_trial, reference_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=100, help="seeds differ from the test suite's 0-4")
    parser.add_argument("--out", type=Path, default=RESULTS / "fault_recovery.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        reference = reference_run(Path(tmp))
        reference_wall = time.monotonic() - started
        trials = []
        for seed in range(args.first_seed, args.first_seed + args.trials):
            result = kill_random_rank_trial(Path(tmp), seed, reference)
            result.pop("stderr_tail")
            trials.append(result)
            print(json.dumps(result), flush=True)
    ok = [t for t in trials if t["exit_code"] == 0 and t["bit_exact"] and t["resumed"] == t["expected_resume"]]
    summary = {
        "benchmark": "fault_recovery", "trials": len(trials), "recovered_bit_exact": len(ok),
        "reference_wall_s": reference_wall,
        "median_recovery_overhead_s": statistics.median(t["wall_s"] - reference_wall for t in trials),
        "spec": SLOW, "results": trials,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"{len(ok)}/{len(trials)} runs recovered bit-exact; wrote {args.out} and {plot(summary, args.out)}")


def plot(summary: dict, out: Path) -> Path:
    plt = pyplot()
    trials = summary["results"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colors = ["tab:green" if t["bit_exact"] else "tab:red" for t in trials]
    ax.scatter([t["kill_step"] for t in trials], [t["wall_s"] - summary["reference_wall_s"] for t in trials], c=colors)
    ax.set_xlabel("step at which a rank was SIGKILLed")
    ax.set_ylabel("extra wall time vs uninterrupted (s)")
    ax.set_title(f"{summary['recovered_bit_exact']}/{summary['trials']} recovered bit-exact (green)")
    return save_png(fig, out, dpi=120)


if __name__ == "__main__":
    main()
