"""`meshyard plan`'s estimate: FLOPs against the analytic count, parameters per rank after each kind of
sharding, pipeline in-flight micro-batches, the JSON form, and the predicted step time. No processes."""
from __future__ import annotations

import json

import pytest

from launcher.cli import main
from launcher.estimate import build_estimate
from launcher.profile import Measured, load_measured, peak_flops_per_s, save_measured
from launcher.session import prepare
from launcher.steptime import attention_rate, predict_step_time
from tests.helpers import make_spec

V, D, L, T = 32, 64, 2, 128  # attention is ~25% of this transformer's FLOPs at this sequence length


def transformer_spec(tmp_path, name="lm", seq_len=T, micro=4, **sections):
    return make_spec(tmp_path, name,
                     model={"target": "launcher.models:transformer",
                            "kwargs": {"vocab_size": V, "dim": D, "n_heads": 4, "n_layers": L, "max_len": seq_len}},
                     data={"target": "launcher.data:char_corpus", "kwargs": {"n": 64, "seq_len": seq_len},
                           "micro_batch_size": micro},
                     loss="token_cross_entropy", optimizer={"name": "adam", "lr": 1e-3}, **sections)


def estimate_of(spec_path, *overrides):
    session = prepare(str(spec_path), list(overrides))
    return session.plan, build_estimate(session.spec, session.plan, session.train_set)


def block_params(width_share: int = 1) -> int:
    """One Block of the built-in transformer on tensor-parallel rank 0 of `width_share` ranks:
    q/k/v/fc1 split with their biases, o/fc2 split without theirs, layer norms whole."""
    s = width_share
    return 2 * 2 * D + 3 * (D * D + D) // s + (D * D // s + D) + (4 * D * D + 4 * D) // s + (4 * D * D // s + D)


def test_transformer_flops_match_6_params_tokens_plus_attention(tmp_path):
    spec = transformer_spec(tmp_path, resources={"procs_per_node": 2}, training={"max_steps": 1, "grad_accum_steps": 2})
    plan, estimate = estimate_of(spec)
    embeddings = V * D + T * D  # lookups, no matmul
    tokens = plan.global_batch_size * T
    analytic = 6 * (estimate.total_params - embeddings) * tokens + 12 * L * D * T * tokens  # Kaplan et al.
    assert estimate.flops_per_step == pytest.approx(analytic, rel=0.10)
    assert sum(rank.flops_per_step for rank in estimate.ranks) * plan.dp_degree == estimate.flops_per_step


def test_parameters_per_rank_follow_each_sharding(tmp_path):
    spec = transformer_spec(tmp_path, seq_len=32, resources={"procs_per_node": 2}, training={"max_steps": 1})
    total = V * D + 32 * D + L * block_params() + 2 * D + D * V + V
    _, ddp = estimate_of(spec)
    assert ddp.total_params == total and ddp.ranks[0].params == total
    assert ddp.ranks[0].param_bytes == 4 * total and ddp.ranks[0].optimizer_bytes == 8 * total  # fp32 Adam
    assert ddp.ranks[0].collective_bytes == {"all_reduce": 4 * total}

    _, tp = estimate_of(spec, "parallel.tensor=2")
    assert tp.ranks[0].params == V * D + 32 * D + L * block_params(2) + 2 * D + D * V + V
    assert tp.ranks[0].parallel_calls == {"tp_linear": 6 * L} and tp.ranks[0].dtensor_params  # q k v o fc1 fc2

    _, pp = estimate_of(spec, "parallel.pipeline=2")
    assert [r.params for r in pp.ranks] == [V * D + 32 * D + block_params(), block_params() + 2 * D + D * V + V]

    _, zero3 = estimate_of(spec, "strategy.name=zero", "strategy.stage=3")
    # FSDP2 keeps torch.chunk(p, 2, dim=0)[0] of every parameter: the larger half of dim 0
    shapes = [(p.shape[0] + 1) // 2 * p[0].numel() if p.ndim else 1 for p in _meta_parameters(spec)]
    assert zero3.ranks[0].params == sum(shapes) < total
    assert zero3.ranks[0].optimizer_bytes == 8 * sum(shapes)
    assert set(zero3.ranks[0].collective_bytes) == {"all_gather", "reduce_scatter"}


def _meta_parameters(spec_path):
    from launcher.plan import meta_model

    return list(meta_model(prepare(str(spec_path), []).spec).parameters())


def test_pipeline_ranks_hold_the_schedules_in_flight_micro_batches(tmp_path):
    spec = transformer_spec(tmp_path, seq_len=32, micro=8, resources={"procs_per_node": 2}, training={"max_steps": 1},
                            parallel={"pipeline": 2, "microbatches": 4})
    _, gpipe = estimate_of(spec, "parallel.schedule=gpipe")
    _, one_f_one_b = estimate_of(spec, "parallel.schedule=1f1b")
    assert [r.micro_batches_in_flight for r in gpipe.ranks] == [4, 4]  # every micro-batch forward before any backward
    assert [r.micro_batches_in_flight for r in one_f_one_b.ranks] == [2, 1]  # p - stage
    assert gpipe.traced_samples == 2  # one pipeline micro-batch
    assert [g.activation_bytes for g in gpipe.ranks] == [2 * o.activation_bytes for o in one_f_one_b.ranks[:1]] + [
        4 * one_f_one_b.ranks[1].activation_bytes]


def test_gradients_count_on_top_of_activations_only_when_they_outlive_a_micro_batch(tmp_path):
    spec = make_spec(tmp_path, resources={"procs_per_node": 2}, training={"max_steps": 1})
    (_, one), (_, two) = estimate_of(spec), estimate_of(spec, "training.grad_accum_steps=2")
    for rank, live in ((one.ranks[0], max), (two.ranks[0], lambda a, g: a + g)):
        assert rank.activation_bytes and rank.grad_bytes
        assert rank.peak_bytes == rank.param_bytes + rank.optimizer_bytes + rank.buffer_bytes + live(
            rank.activation_bytes, rank.grad_bytes)


def test_plan_prints_counts_and_bytes_per_rank_and_json_has_integer_bytes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no machine profile
    spec = make_spec(tmp_path, resources={"procs_per_node": 2}, strategy={"name": "zero", "stage": 2})
    assert main(["plan", str(spec)]) == 0
    text = capsys.readouterr().out
    assert "parameters       433 in the model" in text
    assert "every rank       225 params: params 900 B" in text  # dim 0 halved, rounded up per tensor
    assert "run `meshyard calibrate --procs 2`" in text

    assert main(["plan", str(spec), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    estimate = report["estimate"]
    rank = estimate["ranks"][0]
    sizes = [v for k, v in rank.items() if k.endswith("_bytes") and k != "collective_bytes"]
    sizes += list(rank["collective_bytes"].values())
    assert sizes and all(type(v) is int for v in sizes)
    assert type(estimate["predicted_peak_bytes_per_rank"]) is int
    assert estimate["predicted_peak_bytes_per_rank"] == rank["peak_bytes"] > rank["param_bytes"] + rank["grad_bytes"]
    assert report["plan"]["strategy"] == "zero" and "calibrate" in report["step_time"]["unavailable"]


def test_profile_round_trip_gpu_peaks_and_step_time(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    measured = Measured(backend="gloo", world_size=2, threads_per_rank=1, device="cpu",
                        matmul_flops_per_s={"fp32": 1e10, "bf16": 4e10},
                        collective_bytes_per_s={"all_reduce": 1e8, "all_gather": 2e8, "reduce_scatter": 1e8},
                        torch_version="x", measured_at="now",
                        attention_flops_per_s={"fp32/forward": {"64": 1e9, "256": 4e9},
                                               "fp32/backward": {"64": 5e8, "256": 5e8}},
                        elementwise_bytes_per_s={"fp32/light": 2e9, "fp32/heavy": 5e8, "fp32/light/cached": 4e9,
                                                 "fp32/heavy/cached": 1e9}, first_touch_bytes_per_s=1e8,
                        op_overhead_s=1e-5,
                        parallel_overhead_s={"tp_linear": 1e-4, "fsdp_unit": 2e-4, "dtensor_op": 3e-5})
    assert save_measured(measured).parent == tmp_path / "cache" / "meshyard"
    assert load_measured("gloo", 2) == measured and load_measured("gloo", 4) is None
    assert peak_flops_per_s("cpu", "bf16", "gloo", 2) == (4e10, "calibrated (gloo/2, now)")
    assert peak_flops_per_s("NVIDIA H100 80GB HBM3", "bf16", "nccl", 8)[0] == 989e12
    assert peak_flops_per_s("NVIDIA A100-SXM4-40GB", "fp32", "nccl", 8)[0] == 19.5e12
    assert peak_flops_per_s("Some New GPU", "bf16", "nccl", 8) is None
    # attention between calibrated lengths: interpolated in log length; outside them: the nearest
    assert [attention_rate(measured, f"fp32/forward/{n}") for n in (32, 128, 1024)] == pytest.approx([1e9, 2e9, 4e9])

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1024")  # the user's, for the ranks' glibc (launcher/allocator.py)
    plan, estimate = estimate_of(make_spec(tmp_path, resources={"procs_per_node": 2}))
    step = predict_step_time(estimate, plan, "fp32")
    rank = estimate.ranks[0]
    work = rank.work
    assert work.flops == pytest.approx(rank.flops_per_step) and work.attention_flops == {}  # an MLP
    parts = step.parts
    assert parts["matmul"] == pytest.approx(work.matmul_flops["fp32"] / 1e10)
    assert parts["elementwise"] == pytest.approx(work.elementwise_bytes["fp32/light"] / 2e9
                                                 + work.elementwise_bytes.get("fp32/heavy", 0) / 5e8)
    assert parts["op_overhead"] == pytest.approx(work.ops * 1e-5) and parts["pipeline_bubble"] == 0
    # the allocations the ranks' glibc maps anew (at or above its threshold) fault in at the first-touch rate
    assert parts["first_touch"] == pytest.approx(work.first_touch_bytes(1024) / 1e8) and parts["first_touch"] > 0
    assert step.compute_s == pytest.approx(parts["matmul"] + parts["elementwise"] + parts["first_touch"]
                                           + parts["op_overhead"])
    payload = rank.collective_bytes["all_reduce"]
    assert step.communication_s == pytest.approx(payload / 1e8 + 6 * payload / 2e9)  # DDP's three bucket passes
    optimizer = rank.optimizer_work
    assert step.optimizer_s == pytest.approx(optimizer.elementwise_bytes["fp32/light"] / 4e9  # in the caches
                                             + optimizer.elementwise_bytes["fp32/heavy"] / 1e9 + optimizer.ops * 1e-5
                                             + optimizer.first_touch_bytes(1024) / 1e8)
    assert step.predicted_step_time_s == pytest.approx(step.compute_s + step.communication_s + step.optimizer_s)
    assert "compute = matmul " in step.describe() and set(step.to_dict()["parts"]) == set(parts)

    # ZeRO-3 (FSDP2): each unit (the MLP's layers and the root) pays its overhead; optimizer ops run on DTensors
    plan, estimate = estimate_of(make_spec(tmp_path, resources={"procs_per_node": 2}), "strategy.name=zero",
                                 "strategy.stage=3")
    zero3, rank = predict_step_time(estimate, plan, "fp32"), estimate.ranks[0]
    units = rank.parallel_calls["fsdp_unit"]
    assert units == 2 + 1 and rank.dtensor_params  # depth 2, one micro-batch per step
    assert zero3.parts["parallel_overhead"] == pytest.approx(units * 2e-4)
    assert zero3.optimizer_s - step.optimizer_s > rank.optimizer_work.ops * 3e-5 * 0.99
    # FSDP2's copies in and out of the buffers it allocates (launcher/buffers.py; counted in test_buffers.py)
    gathered, scattered = rank.collective_bytes["all_gather"], rank.collective_bytes["reduce_scatter"]
    copies = rank.buffer_work
    assert zero3.communication_s == pytest.approx(gathered / 2e8 + scattered / 1e8 + copies.elementwise_bytes[
        "fp32/light"] / 2e9 + copies.first_touch_bytes(1024) / 1e8)


@pytest.mark.parametrize("argv,message", [(["--procs", "0"], "error: --procs 0: allowed 1 to 256"),
                                          (["--device", "cuda"], "error: --device cuda: no CUDA device is visible")])
def test_calibrate_refuses_bad_arguments_in_one_line(capsys, argv, message):
    import torch

    if argv[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["calibrate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.splitlines()) == 1


def test_calibrate_gives_the_ranks_their_environment_only_while_they_start(monkeypatch):
    import os

    from launcher.calibrate import _environment

    # `calibrate --procs 1 2` once measured 2 ranks x 2 threads: the 1-process run's OMP_NUM_THREADS stayed behind
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with _environment({"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}):
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MALLOC_MMAP_THRESHOLD_"] == "1048576"
    assert os.environ["OMP_NUM_THREADS"] == "3" and "MALLOC_MMAP_THRESHOLD_" not in os.environ


def traced(spec_path, *overrides):
    """The estimate and the micro-batch trace it was made from (the rank-local one: no tensor parallel here)."""
    session = prepare(str(spec_path), list(overrides))
    traces: dict = {}
    estimate = build_estimate(session.spec, session.plan, session.train_set, traces=traces)
    ((_, trace),) = traces.values()
    return session.plan, estimate, trace


def test_activation_checkpointing_keeps_layer_inputs_and_recomputes_one_layer_at_a_time(tmp_path):
    spec = transformer_spec(tmp_path, resources={"procs_per_node": 2}, training={"max_steps": 1})
    _, none, trace = traced(spec)
    _, full, _ = traced(spec, "training.activation_checkpointing=full")
    boundary = 4 * T * D * 4  # micro-batch x sequence x width, fp32: what each layer takes in
    assert trace.input_bytes == (boundary,) * L
    layers = trace.saved_bytes[1:-1]
    assert none.ranks[0].activation_bytes == sum(trace.saved_bytes)
    # every layer keeps its input; the largest layer's activations come back while its backward recomputes them
    assert full.ranks[0].activation_bytes == (trace.saved_bytes[0] + L * boundary + max(layers)
                                              + trace.saved_bytes[-1]) < none.ranks[0].activation_bytes
    # one more forward of every layer: matmuls 2 x 12 D^2 and attention 4 T D per token (Kaplan et al.)
    extra = full.ranks[0].flops_per_step - none.ranks[0].flops_per_step
    assert extra == sum(trace.forward_flops[1:-1])
    assert extra == pytest.approx(4 * T * L * (2 * 12 * D * D + 4 * T * D), rel=0.10)
    assert full.flops_per_step == none.flops_per_step  # model FLOPs (MFU) do not count the recompute
    # the step time prices the recompute: the layers' forward kernels once more, counted per layer in the trace
    recomputed = full.ranks[0].work - none.ranks[0].work
    assert recomputed.flops == pytest.approx(extra) and recomputed.ops == sum(w.ops for w in trace.forward_work[1:-1])
    assert recomputed.elementwise_bytes == pytest.approx(
        {k: sum(w.elementwise_bytes.get(k, 0) for w in trace.forward_work[1:-1]) for k in recomputed.elementwise_bytes})
    assert sum(w.ops for w in trace.forward_work) < none.ranks[0].work.ops  # the backward's are not in it

    # every_2 checkpoints the 2nd of the 2 layers: it keeps its input, and its activations come back in backward
    _, every_2, _ = traced(spec, "training.activation_checkpointing=every_2")
    assert every_2.ranks[0].activation_bytes == (sum(trace.saved_bytes) - layers[1]) + boundary + layers[1]

    # pipeline stages: each holds its in-flight micro-batches' checkpointed inputs, plus one recompute
    pipe = ("parallel.pipeline=2", "parallel.microbatches=4", "parallel.schedule=1f1b")
    _, pp, chunk = traced(spec, *pipe, "training.activation_checkpointing=full")
    stage_inputs = [chunk.saved_bytes[0] + chunk.input_bytes[0], chunk.input_bytes[1] + chunk.saved_bytes[-1]]
    assert [r.activation_bytes for r in pp.ranks] == [
        in_flight * inputs + saved for in_flight, inputs, saved in zip((2, 1), stage_inputs, chunk.saved_bytes[1:-1])]
