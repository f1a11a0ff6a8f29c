"""Built-in components train in one process: cross-entropy classifier, bf16 autocast, every optimizer."""
from __future__ import annotations

import pytest

from launcher.metrics import read_metrics
from tests.helpers import REPO, train_in_process

SHORT = ["resources.procs_per_node=1", "strategy.name=auto", "training.max_steps=40", "training.log_every=5",
         "training.eval_every=0", "checkpoint.resume=never"]


@pytest.mark.parametrize("example", ["adamw_classifier", "sgd_momentum", "rmsprop", "adam_accumulation"])
def test_example_loss_falls(tmp_path, example):
    run = train_in_process(REPO / "examples" / f"{example}.yaml", *SHORT, f"output.dir={tmp_path}")
    losses = [m["loss"] for m in read_metrics(run)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_digits_example_reaches_90_percent_eval_accuracy(tmp_path):
    """A real data set that ships inside a package (scikit-learn's digits), the example's own settings
    in one process: the README's accuracy claim."""
    run = train_in_process(REPO / "examples" / "digits.yaml", "resources.procs_per_node=1", "strategy.name=auto",
                           f"output.dir={tmp_path}")
    final = read_metrics(run)[-1]
    assert final["step"] == 300 and final["eval_accuracy"] >= 0.9, final
