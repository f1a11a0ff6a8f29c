"""`strategy: auto` before launch: the candidates it builds, how it ranks them (machine profile or the
documented fallback), why each is rejected, the plan error when none fits, and the default budget.
Everything here is `meshyard plan` work: meta device and fake tensors, no processes."""
from __future__ import annotations

import json

import pytest

from launcher.autoplan import Budget, _quick
from launcher.candidates import candidates
from launcher.cli import main
from launcher.plan import make_plan
from launcher.profile import Measured, save_measured
from launcher.session import prepare
from launcher.spec import load_spec
from tests.helpers import make_spec

MiB = 2**20


def lm_spec(tmp_path, procs, budget=None, heads=6, layers=3, **sections):
    """A tiny transformer: 6 heads (tensor 4 does not divide them), 3 layers (pipeline 2 cannot split them evenly)."""
    spec = {"model": {"target": "launcher.models:transformer",
                      "kwargs": {"vocab_size": 32, "dim": 48, "n_heads": heads, "n_layers": layers, "max_len": 16}},
            "data": {"target": "launcher.data:char_corpus", "kwargs": {"n": 64, "seq_len": 16}, "micro_batch_size": 4},
            "loss": "token_cross_entropy", "optimizer": {"name": "adam", "lr": 1e-3},
            "resources": {"procs_per_node": procs, "memory_per_rank": budget}}
    return make_spec(tmp_path, "lm", **{**spec, **sections})


@pytest.fixture(autouse=True)
def no_machine_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_candidates_span_the_mesh_the_data_parallel_strategies_and_activation_checkpointing(tmp_path):
    spec = load_spec(lm_spec(tmp_path, 4, training={"max_steps": 1, "grad_accum_steps": 3}))
    found = {c.label: dict(c.settings) for c in candidates(spec, 4)}
    without = ["ddp", "zero 1", "zero 2", "zero 3", "pipeline 2 + ddp", "pipeline 2 + zero 2", "pipeline 2 + zero 3",
               "pipeline 4", "tensor 2 + ddp", "tensor 2 + zero 2", "tensor 2 + zero 3", "tensor 2 x pipeline 2",
               "tensor 4"]
    assert list(found)[::2] == without and list(found)[1::2] == [f"{label} + ac" for label in without]
    assert found["zero 3 + ac"] == {**found["zero 3"], "training.activation_checkpointing": "full"}
    # fewer data-parallel ranks accumulate more micro-batches: the global batch stays the user's
    assert found["tensor 2 x pipeline 2"] == {"parallel.tensor": 2, "parallel.pipeline": 2,
                                              "training.grad_accum_steps": 12, "strategy.name": "ddp"}
    assert found["zero 3"] == {"strategy.name": "zero", "strategy.stage": 3}
    # a mesh the user set is kept: only the data-parallel strategy varies (FSDP2's, beside tensor parallel)
    fixed = load_spec(lm_spec(tmp_path, 4, parallel={"tensor": 2}))
    assert [c.label for c in candidates(fixed, 4)] == [
        "ddp", "ddp + ac", "zero 2", "zero 2 + ac", "zero 3", "zero 3 + ac"]
    assert [c.label for c in candidates(load_spec(lm_spec(tmp_path, 1)), 1)] == ["single", "single + ac"]
    # checkpointing is not tried for a spec that sets it, nor for a model without a layer list to checkpoint
    own = load_spec(lm_spec(tmp_path, 2, training={"activation_checkpointing": "every_2"}))
    assert [c.label for c in candidates(own, 2)] == ["ddp", "zero 1", "zero 2", "zero 3", "pipeline 2", "tensor 2"]
    mlp = make_spec(tmp_path, "mlp", model={"target": "launcher.models:mlp", "kwargs": {"in_dim": 8, "depth": 1}})
    assert [c.label for c in candidates(load_spec(mlp), 1)] == ["single"]


def test_without_a_profile_data_parallel_plans_rank_first_and_every_rejection_says_why(tmp_path, capsys):
    assert main(["plan", str(lm_spec(tmp_path, 4, "1.25MiB")), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    auto, budget = report["auto"], 1.25 * MiB
    rows = {c["label"]: c for c in auto["candidates"]}
    labels = list(rows)
    assert labels[:4] == ["ddp", "zero 1", "zero 2", "zero 3"]  # data parallel first, fewest bytes moved first
    moved = [rows[label]["moved_bytes_per_step"] for label in labels[:4]]
    assert moved == sorted(moved) and "no machine profile for gloo/4" in auto["ranked_by"]
    assert auto["chosen"] == "zero 3" and labels.index("zero 3") == min(
        i for i, c in enumerate(auto["candidates"]) if c["fits"])
    assert all(c["rejected"].startswith("over budget by") and c["predicted_peak_bytes_per_rank"] > budget
               for c in auto["candidates"][:3])
    assert rows["zero 3"]["predicted_peak_bytes_per_rank"] <= budget < rows["ddp"]["predicted_peak_bytes_per_rank"]
    assert "does not divide the model's 3 layers" in rows["pipeline 2 + ddp"]["rejected"]
    assert "does not divide the model's 6 attention heads" in rows["tensor 4"]["rejected"]
    unestimated = [label for label, c in rows.items() if c["predicted_peak_bytes_per_rank"] is None]
    assert len(unestimated) == 12 and labels[-12:] == unestimated
    # the plan the ranks get is the chosen one, and the estimate printed is its estimate
    assert (report["plan"]["strategy"], report["plan"]["zero_stage"]) == ("zero", 3)
    assert report["estimate"]["predicted_peak_bytes_per_rank"] == rows["zero 3"]["predicted_peak_bytes_per_rank"]
    assert report["plan"]["inferred"][0].startswith("auto chose zero 3: strategy.name = zero, strategy.stage = 3")


def test_a_machine_profile_ranks_by_predicted_step_time(tmp_path, capsys):
    # a slow all_reduce: the plans that all-reduce gradients (ddp, zero 1) become the slowest
    save_measured(Measured(backend="gloo", world_size=2, threads_per_rank=1, device="cpu",
                           matmul_flops_per_s={"fp32": 1e10, "bf16": 4e10},
                           collective_bytes_per_s={"all_reduce": 1e6, "all_gather": 1e9, "reduce_scatter": 1e9,
                                                   "broadcast": 1e9, "send_recv": 1e9},
                           torch_version="x", measured_at="now",
                           attention_flops_per_s={"fp32/forward": {"64": 1e9}, "fp32/backward": {"64": 1e9}},
                           elementwise_bytes_per_s={"fp32/light": 1e9, "fp32/heavy": 1e9, "fp32/light/cached": 1e9,
                                                    "fp32/heavy/cached": 1e9},
                           first_touch_bytes_per_s=1e9, op_overhead_s=0.0, parallel_overhead_s={}))
    assert main(["plan", str(lm_spec(tmp_path, 2, "1GiB", heads=4, layers=2)), "--explain"]) == 0
    text = capsys.readouterr().out
    assert "ranked by        predicted step time (machine profile gloo/2" in text
    table = text[text.index("  candidate "):].splitlines()[1:7]
    times = [float(line.split(" ms")[0].split()[-1]) for line in table]
    labels = [line.split("  ")[1].strip() for line in table]
    assert times == sorted(times) and labels[0] == "zero 2" and labels.index("ddp") > labels.index("zero 3")
    assert table[0].endswith("chosen") and "fits; ranked after zero 2" in table[1]
    assert "strategy         zero stage 2" in text


def activations_heavy(tmp_path, budget, **training):
    return lm_spec(tmp_path, 2, budget, heads=4, layers=2, training={"max_steps": 1, **training},
                   data={"target": "launcher.data:char_corpus", "kwargs": {"n": 64, "seq_len": 64},
                         "micro_batch_size": 8},
                   model={"target": "launcher.models:transformer",
                          "kwargs": {"vocab_size": 32, "dim": 32, "n_heads": 4, "n_layers": 2, "max_len": 64}})


def test_checkpointing_is_chosen_only_when_nothing_fits_without_it(tmp_path, capsys):
    assert main(["plan", str(activations_heavy(tmp_path, "1MiB")), "--json"]) == 0
    auto = json.loads(capsys.readouterr().out)["auto"]
    estimated = [c for c in auto["candidates"] if c["predicted_peak_bytes_per_rank"] is not None]
    # every plan without checkpointing ranks first, and none of them fits this budget
    split = next(i for i, c in enumerate(estimated) if c["label"].endswith(" + ac"))
    assert split == 6 and all(c["label"].endswith(" + ac") for c in estimated[split:])
    assert not any(c["fits"] for c in estimated[:split])
    assert auto["chosen"] == "pipeline 2 + ac"
    assert next(c for c in estimated if c["fits"])["settings"]["training.activation_checkpointing"] == "full"
    # the estimate saw the checkpointing: it saves memory, and what fits without it is still chosen first
    rows = {c["label"]: c for c in estimated}
    peak = {label: c["predicted_peak_bytes_per_rank"] for label, c in rows.items()}
    assert peak["pipeline 2 + ac"] < peak["pipeline 2"] and peak["ddp + ac"] < peak["ddp"]
    assert main(["plan", str(activations_heavy(tmp_path, "2MiB")), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auto"]["chosen"] == "pipeline 2"


def test_nothing_fits_is_exit_2_with_the_shortfall_and_what_would_fit(tmp_path, capsys):
    assert main(["plan", str(activations_heavy(tmp_path, "800KiB")), "--explain"]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0].startswith("error: strategy auto: no plan fits 800.0 KiB per rank (resources.memory_per_rank): the"
                               " smallest predicted peak is pipeline 2 + ac's, 932.0 KiB (")
    assert lines[0].endswith(" over). What would fit:") and len(lines) <= 6
    assert any(line.startswith("  a smaller micro-batch: pipeline 2 + ac with data.micro_batch_size 4 and"
                               " training.grad_accum_steps 4 (the same global batch), predicted") for line in lines)
    assert "over budget by" in out and "chosen" not in out  # --explain still lists the candidates
    # a spec with a checkpointing policy of its own is searched without others; the hint estimates `full`
    assert main(["plan", str(activations_heavy(tmp_path, "1MiB", activation_checkpointing="every_2"))]) == 2
    assert ("  activation checkpointing: pipeline 2 + ac (training.activation_checkpointing full: each layer's forward"
            " again in backward), predicted 932.0 KiB per rank") in capsys.readouterr().err.splitlines()

    state_heavy = make_spec(tmp_path, "mlp", model={"target": "launcher.models:mlp",
                                                    "kwargs": {"in_dim": 8, "hidden": 512, "out_dim": 1, "depth": 4}},
                            optimizer={"name": "adam", "lr": 1e-3},
                            resources={"procs_per_node": 2, "memory_per_rank": "8MiB"})
    assert main(["plan", str(state_heavy)]) == 2
    err = capsys.readouterr().err
    assert "the smallest predicted peak is zero 3's" in err
    assert "  more ranks: zero 3 over 4 ranks (resources.nodes 2), predicted " in err


def test_without_a_budget_auto_keeps_ddp_unless_its_model_state_nears_the_detected_one(tmp_path):
    session = prepare(str(make_spec(tmp_path, resources={"procs_per_node": 2})), [])
    auto = session.auto
    assert (session.plan.strategy, auto.chosen, auto.outcomes) == ("ddp", "ddp", ())
    assert auto.budget.source.startswith("default: host RAM ") and auto.budget.source.endswith("x 0.8")
    assert session.plan.inferred[-1].startswith("auto kept ddp: its model state and buffers (")
    # the unsearched default holds only while the model state is under half the budget
    base = make_plan(session.spec)
    assert _quick(session.spec, base, session.train_set, Budget(10**12, "default: test")) is not None
    assert _quick(session.spec, base, session.train_set, Budget(1000, "default: test")) is None

    several_nodes = prepare(str(make_spec(tmp_path, resources={"nodes": 2, "procs_per_node": 1})), [])
    assert "each node's launcher plans alone" in several_nodes.plan.inferred[-1]
    named = prepare(str(make_spec(tmp_path, strategy={"name": "ddp"},
                                  resources={"procs_per_node": 2, "memory_per_rank": "1GiB"})), [])
    assert named.auto is None and named.plan.inferred[-1] == (
        "resources.memory_per_rank not used (strategy.name = ddp; only auto plans against it)")


@pytest.mark.parametrize("given,size", [("4GiB", 4 * 2**30), ("512MiB", 512 * MiB), ("1.5GB", 1_500_000_000),
                                        (123456, 123456)])
def test_memory_per_rank_takes_bytes_or_a_size(tmp_path, given, size):
    spec = load_spec(make_spec(tmp_path, resources={"memory_per_rank": given}))
    assert spec.resources.memory_per_rank == size
