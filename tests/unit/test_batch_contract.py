"""The batch/output contract (strategies/batch.py), LM eval metrics and the threads each rank gets."""
from __future__ import annotations

import json
import math

import pytest
import torch

from launcher.evaluation import evaluate_split
from launcher.plan import make_plan
from launcher.spec import load_spec
from strategies.batch import BatchFeed, model_loss, model_output
from strategies.single import SingleProcessStrategy
from tests.helpers import make_spec


def test_outputs_of_every_kind_give_their_tensor():
    logits = torch.randn(2, 3)
    transformers = pytest.importorskip("transformers")
    hf = transformers.modeling_outputs.CausalLMOutput(loss=torch.tensor(1.5), logits=logits)
    for output in (logits, (logits, torch.zeros(1)), [logits], {"logits": logits, "loss": 0}, {"out": logits}, hf):
        assert model_output(output) is logits
    assert model_loss(hf).item() == 1.5 and model_loss({"loss": torch.tensor(2.0)}).item() == 2.0
    with pytest.raises(TypeError, match="without a `loss` tensor"):
        model_loss(logits)
    with pytest.raises(TypeError, match="expected a tensor, a tuple"):
        model_output({"loss": torch.tensor(1.0)})


def test_feeds_split_a_batch_into_args_kwargs_and_target():
    x, y = torch.ones(2, 3), torch.zeros(2)
    assert BatchFeed().split([x, y]) == ((x,), {}, y)
    batch = {"input_ids": x, "attention_mask": x, "labels": y}
    args, kwargs, target = BatchFeed("kwargs").split(batch)
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"} and target is y
    args, kwargs, target = BatchFeed("kwargs", loss_from_model=True).split(batch)
    assert kwargs == batch and target is y  # the model gets its labels; the target still scores eval accuracy
    with pytest.raises(KeyError, match="data.target_key='label' is not in the batch"):
        BatchFeed("kwargs", target_key="label").split(batch)


class Echo(torch.nn.Module):
    """Logits that put all mass on the token the batch names, so accuracy is known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = torch.nn.functional.one_hot(input_ids, 5).float() * self.scale
        return {"logits": logits, "loss": torch.tensor(0.25)}


def test_language_model_eval_reports_perplexity_and_token_accuracy_ignoring_minus_100():
    # Shifted labels (loss: model): position t's prediction (here its own input) is scored against
    # label t+1: predictions [1, 2, 3] against labels [1, 0, -100] -> one right, one wrong, one ignored.
    input_ids = torch.tensor([[1, 2, 3, 4]])
    labels = torch.tensor([[9, 1, 0, -100]])
    dataset = [{"input_ids": input_ids[0], "labels": labels[0]}]
    strategy = SingleProcessStrategy(torch.device("cpu"), "fp32", BatchFeed("kwargs", loss_from_model=True))
    strategy.model = strategy.module = Echo()
    metrics = evaluate_split(strategy, dataset, 1, None, strategy.feed)
    assert metrics["eval_loss"] == 0.25 and metrics["eval_perplexity"] == pytest.approx(math.exp(0.25))
    assert metrics["eval_token_accuracy"] == pytest.approx(1 / 2)


def test_each_rank_gets_the_users_omp_threads_or_its_share_of_the_cores(tmp_path, monkeypatch):
    spec = load_spec(make_spec(tmp_path, resources={"procs_per_node": 2}))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    plan = make_plan(spec)
    assert plan.threads_per_rank == 3 and not any("OMP" in note for note in plan.inferred)
    monkeypatch.delenv("OMP_NUM_THREADS")
    plan = make_plan(spec)
    import os

    assert plan.threads_per_rank == max(1, (os.cpu_count() or 1) // 2)
    assert any(note.startswith("OMP_NUM_THREADS = ") for note in plan.inferred)


def test_token_positions_count_token_ids_only():
    ids = torch.zeros(4, 32, dtype=torch.long)
    assert BatchFeed().token_positions((ids, ids)) == 128
    assert BatchFeed(mode="kwargs", loss_from_model=True).token_positions({"input_ids": ids, "labels": ids}) == 128
    assert BatchFeed().token_positions((torch.zeros(4, 8), torch.zeros(4, 1))) == 0  # features, not tokens


def test_a_token_model_logs_tokens_per_second_next_to_samples(tmp_path, capsys):
    from launcher.metrics import read_metrics
    from tests.helpers import train_in_process

    seq_len = 16
    spec = make_spec(tmp_path, "lm", model={"target": "launcher.models:transformer", "kwargs": {}},
                     data={"target": "launcher.data:char_corpus", "kwargs": {"n": 64, "seq_len": seq_len},
                           "micro_batch_size": 8},
                     loss="token_cross_entropy", training={"max_steps": 3, "log_every": 1})
    run = train_in_process(spec)
    records = read_metrics(run)
    assert all(m["tokens_per_s"] == pytest.approx(m["samples_per_s"] * seq_len) for m in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens_per_s"] == pytest.approx(summary["samples_per_s"] * seq_len)
    assert "tokens/s" in capsys.readouterr().out
    assert "tokens_per_s" not in read_metrics(train_in_process(make_spec(tmp_path, "mlp")))[0]
