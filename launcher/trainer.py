"""The one training loop every strategy drives.

Distributed concerns are single calls into the strategy; this file never calls `.backward()` and
never asks which strategy it is running.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from launcher.checkpoint import Checkpointer, find_latest, read_manifest
from launcher.components import batch_feed, build_collate, build_datasets, build_loss, model_recipe
from launcher.compression.hooks import Compression
from launcher.evaluation import evaluate_split
from launcher.guards import NonFiniteError, StepAgreement
from launcher.heartbeat import Heartbeat
from launcher.interrupts import PreemptionFlag
from launcher.memory import cuda_peak_bytes, current_rss_bytes, model_state_bytes, peak_rss_bytes
from launcher.metrics import MetricsLogger, read_metrics
from launcher.optim import build_scheduler, optimizer_factory
from launcher.plan import Plan
from launcher.profiling import StepProfiler
from launcher.rng import capture_rng, restore_rng, seed_all
from launcher.rundir import RunDir
from launcher.sampler import BatchLayout, StepBatchSampler
from launcher.spec.schema import JobSpec
from launcher.startup import StartupClock
from launcher.stragglers import RankTimer, StragglerWatch
from launcher.trackers import open_trackers
from strategies import Strategy, build_strategy


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    attempt: int = 0  # restarts of the worker group within this launch (torch elastic's restart count)


@dataclass(frozen=True)
class CheckpointExchange:
    """Checkpoints shared with an orchestrator around the loop (Ray Train): the one it hands back to
    a restarted worker group, and a call on every rank as each new one is complete."""

    restored: Path | None = None  # resumed from unless the run directory holds a newer one (checkpoint.resume: auto)
    published: Callable[[int, Path], None] | None = None


def train(spec: JobSpec, plan: Plan, run_dir: Path, ranks: RankInfo = RankInfo(),
          preemption: PreemptionFlag | None = None, clock: StartupClock | None = None,
          exchange: CheckpointExchange = CheckpointExchange(), heartbeat: Heartbeat | None = None) -> dict[str, Any]:
    """Run (or resume) the job on this rank; return the run summary. The heartbeat is the caller's
    when it started one before importing torch (launcher/worker.py), else it lives here."""
    started = time.perf_counter()
    own_heartbeat = heartbeat is None
    heartbeat = heartbeat or Heartbeat(run_dir, ranks.rank).start()
    heartbeat.update(0, "setup")
    try:
        return _train(spec, plan, run_dir, ranks, preemption, heartbeat, started, clock or StartupClock(), exchange)
    finally:
        if own_heartbeat:
            heartbeat.stop()


def _train(spec: JobSpec, plan: Plan, run_dir: Path, ranks: RankInfo, preemption: PreemptionFlag | None,
           heartbeat: Heartbeat, started: float, clock: StartupClock, exchange: CheckpointExchange) -> dict[str, Any]:
    device = _device(plan, ranks.local_rank)
    seed_all(spec.seed)  # identical initial weights on every rank
    feed = batch_feed(spec)
    strategy = build_strategy(plan.strategy, device, spec.training.precision, plan.zero_stage, plan.deepspeed_config,
                              plan.layout, feed, spec.model.layers, spec.strategy.find_unused_parameters,
                              spec.strategy.static_graph)
    task_loss = build_loss(spec.loss)
    compression = Compression(spec.compression, device)
    rss_before_model = current_rss_bytes()  # what the rank's peak RSS grows from because of the model
    strategy.setup(model_recipe(spec), optimizer_factory(spec.optimizer), compression.wrap_loss(task_loss))
    compression.attach(strategy)
    scheduler = build_scheduler(strategy.optimizer, spec.schedule, spec.training.max_steps)
    clock.mark("model_build")
    train_set, eval_set = build_datasets(spec.data)
    clock.mark("data_build")

    files = RunDir(run_dir)
    checkpointer = Checkpointer(files.checkpoints, spec.checkpoint.keep, ranks.rank, ranks.world_size,
                                _barrier, strategy, async_save=spec.checkpoint.async_save,
                                on_published=exchange.published)
    checkpointer.remove_partials()
    resume_from = resume_path(spec, run_dir, exchange.restored, ranks.attempt)
    if resume_from is not None:
        start_step = _restore(checkpointer, resume_from, strategy, scheduler, compression)
    else:
        start_step = 0
        seed_all(spec.seed + ranks.rank)  # runtime randomness (dropout) differs per rank

    training = spec.training
    end_step = training.stop_at_step or training.max_steps
    layout = BatchLayout(len(cast(Sized, train_set)), spec.data.micro_batch_size, training.grad_accum_steps,
                         strategy.dp_rank, strategy.dp_size, spec.seed, spec.data.shuffle)
    collate = build_collate(spec.data)
    loader = DataLoader(train_set, batch_sampler=StepBatchSampler(layout, start_step, end_step),
                        num_workers=spec.data.num_workers, collate_fn=collate)
    batches = iter(loader)
    trackers = open_trackers(spec, plan, run_dir, start_step) if strategy.is_logging_rank else []
    logger = MetricsLogger(run_dir, strategy.is_logging_rank, start_step, training.max_steps, trackers)
    profiler = StepProfiler(spec.observe.profile, ranks.rank, files, plan.device)
    if resume_from is not None:
        logger.say(f"resumed from {resume_from} at step {start_step}")

    def evaluate() -> dict[str, float]:
        assert eval_set is not None  # called only when there is an eval split
        return evaluate_split(strategy, eval_set, spec.data.micro_batch_size, task_loss, feed, collate)

    record: dict[str, Any] = {}
    agreement = StepAgreement(preemption)
    timer, stragglers = RankTimer(), StragglerWatch(spec.observe.straggler_threshold, device)
    elapsed, timed_steps, timed_tokens, step, preempted = 0.0, 0, 0, start_step, False
    # MFU's numerator is traced (on meta tensors) only where its denominator is known: a GPU's datasheet
    # peak or a calibrated CPU (meshyard calibrate). The trace costs ~1-2 s, so it runs on the logging
    # rank, and not in the launcher, which would add it to every launch's start-up.
    peak = all_ranks_peak_flops(plan, device, training.precision) if strategy.is_logging_rank else None
    flops = model_flops_per_step(spec, plan, train_set) if peak else None
    throughput = Throughput(layout.global_batch_size, flops, peak)  # the whole launch's, for the summary
    for step in range(start_step + 1, end_step + 1):
        heartbeat.update(step - 1, "step")
        profiler.step_begins(step)
        eval_due = eval_set is not None and (
            (training.eval_every and step % training.eval_every == 0) or step == training.max_steps
        )
        log_due = step % training.log_every == 0 or step in (start_step + 1, end_step) or eval_due
        timer.start()
        micro_batches = [next(batches) for _ in range(training.grad_accum_steps)]
        timer.data_ready()
        window = compression.prepare_window(micro_batches)
        step_tokens = strategy.dp_size * sum(feed.token_positions(micro_batch) for micro_batch in window)
        timed_tokens += step_tokens
        loss = strategy.forward_backward(window)
        penalty = strategy.regularize(spec.optimizer.l1, spec.optimizer.l2)
        grad_norm = strategy.clip_grad_norm(spec.optimizer.grad_clip)  # None: the engine clips in its step
        lr = scheduler.get_last_lr()[0]
        # Measured before the step zeroes the gradients, and only when logged: it walks every tensor.
        memory = _memory(strategy) if log_due else {}
        verdict = agreement.verdict(step, loss, grad_norm)
        if verdict.nonfinite:
            if training.on_nonfinite == "stop":
                raise NonFiniteError(f"step {step}: the loss or gradient norm is not finite "
                                     "(training.on_nonfinite=stop; `skip` drops such updates)")
            strategy.discard_grads()
            logger.say(f"step {step}: non-finite loss or gradient norm, update skipped (training.on_nonfinite=skip)")
        else:
            step_norm = strategy.optimizer_step()
            grad_norm = step_norm if grad_norm is None else grad_norm
        scheduler.step()  # the schedule's clock is the step count, skipped updates included
        compression.after_step(step, evaluate if eval_set is not None else None)
        step_s = timer.stop()
        elapsed, timed_steps = elapsed + step_s, timed_steps + 1
        throughput.add(step_s, step_tokens)
        logger.advance()
        if step == start_step + 1:
            clock.mark("first_step")  # from the end of data build: checkpoint restore and loader start count here

        if log_due or verdict.preempt:
            spread, straggler_news = stragglers.check(timer)  # every rank: it gathers their timings
            record = {
                "step": step, "loss": strategy.reduce_mean(loss).item(), "penalty": penalty.item(),
                "lr": lr, "grad_norm": None if grad_norm is None else grad_norm.item(), "skipped": verdict.nonfinite,
                "samples_per_s": layout.global_batch_size * timed_steps / elapsed,
                "step_time_s": elapsed / timed_steps, **memory, "peak_rss_bytes": peak_rss_bytes(),
                "rss_before_model_bytes": rss_before_model, **cuda_peak_bytes(device), **spread,
            }
            if timed_tokens:  # token inputs: every data-parallel rank's micro-batches hold as many
                record["tokens_per_s"] = timed_tokens / elapsed
            if flops and peak:  # flops is traced only where the peak is known
                record["model_flops_per_step"] = flops
                record["mfu"] = flops * timed_steps / elapsed / peak
            if eval_due:
                heartbeat.update(step, "eval")
                record.update(evaluate())
            logger.log(record)
            if straggler_news is not None:
                logger.say(straggler_news)
            elapsed, timed_steps, timed_tokens = 0.0, 0, 0
        if checkpoint_due(spec, step, end_step) or verdict.preempt:
            heartbeat.update(step, "checkpoint")
            checkpointer.save(step, _rank_state(step, scheduler, compression))
        profiler.step_ends(step)
        if verdict.preempt:
            preempted = True
            break
    heartbeat.update(step, "finishing")
    profiler.close()
    agreement.finish()
    checkpointer.wait()
    logger.close()
    memory_by_rank = _rss_by_rank(rss_before_model, device)
    if not record and strategy.is_logging_rank:  # resumed at the end: nothing left to train
        record = (read_metrics(run_dir) or [{}])[-1]

    summary = {
        "name": spec.name, "steps": step, "max_steps": training.max_steps, "preempted": preempted,
        "final_loss": record.get("loss"), "eval_loss": record.get("eval_loss"),
        "eval_accuracy": record.get("eval_accuracy"), "eval_perplexity": record.get("eval_perplexity"),
        "global_batch_size": layout.global_batch_size, "world_size": ranks.world_size, **throughput.rates(),
        "model_flops_per_step": flops,
        "wall_s": time.perf_counter() - started, "startup_s": clock.phases, **memory_by_rank,
        "checkpoint": str(find_latest(files.checkpoints)),
        **compression.finish(run_dir, ranks.rank),
    }
    if strategy.is_logging_rank:
        files.summary.write_text(json.dumps(summary, indent=1))
        if (line := compression.describe(summary)) is not None:
            logger.say(line)
        if preempted:
            files.preempted.write_text(json.dumps({"step": step, "checkpoint": summary["checkpoint"]}))
    logger.finish_trackers(summary)
    strategy.close()
    return summary


def checkpoint_due(spec: JobSpec, step: int, end_step: int) -> bool:
    """Every `checkpoint_every` steps, and where a launch ends: always at stop_at_step (a later launch
    resumes there), at max_steps unless `checkpoint.final: false`."""
    every = spec.training.checkpoint_every
    if every and step % every == 0:
        return True
    return step == end_step and (spec.checkpoint.final or end_step != spec.training.max_steps)


def model_flops_per_step(spec: JobSpec, plan: Plan, train_set: Any) -> int | None:
    """All ranks' model FLOPs per optimizer step from launcher/estimate.py's trace; None if it cannot trace."""
    from launcher.estimate import EstimateUnavailable, build_estimate

    try:
        return build_estimate(spec, plan, train_set).flops_per_step
    except EstimateUnavailable:
        return None


def all_ranks_peak_flops(plan: Plan, device: torch.device, precision: str) -> float | None:
    """The world's peak FLOP/s that MFU divides by: a GPU's datasheet number, or this host's calibrated
    matmul rate per process on CPU (launcher/profile.py); None when unknown."""
    from launcher.profile import peak_flops_per_s

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops_per_s(name, precision, plan.backend, plan.world_size)
    return None if peak is None else peak[0] * plan.world_size


@dataclass
class Throughput:
    """Samples (and token positions, for token inputs) per second over a launch's trained steps, and
    the model FLOP utilization when the FLOPs per step and the peak are known."""

    global_batch_size: int
    flops_per_step: int | None = None
    peak_flops_per_s: float | None = None  # all ranks together
    seconds: float = 0.0
    steps: int = 0
    tokens: int = 0

    def add(self, step_s: float, tokens: int) -> None:
        self.seconds, self.steps, self.tokens = self.seconds + step_s, self.steps + 1, self.tokens + tokens

    def rates(self) -> dict[str, float | None]:
        if not self.seconds:
            return {"samples_per_s": None, "tokens_per_s": None, "mfu": None}
        flops, peak = self.flops_per_step, self.peak_flops_per_s
        return {"samples_per_s": self.global_batch_size * self.steps / self.seconds,
                "tokens_per_s": self.tokens / self.seconds if self.tokens else None,
                "mfu": flops * self.steps / self.seconds / peak if flops and peak else None}


def _memory(strategy: Strategy) -> dict[str, int]:
    # Pipeline stages on one rank may share modules: count each parameter once.
    parameters = list({id(p): p for part in strategy.model_parts for p in part.parameters()}.values())
    state = model_state_bytes(parameters, strategy.local_optimizer_state)
    return {f"mem_{part}_bytes": size for part, size in state.items()}


def _rss_by_rank(rss_before_model: int, device: torch.device) -> dict[str, list[int]]:
    """Every rank's peak RSS and its RSS before the model, for the summary: one all-gather at the end
    (metrics.jsonl has the logging rank's only, and ZeRO-1's shards are uneven)."""
    mine = torch.tensor([peak_rss_bytes(), rss_before_model], dtype=torch.int64, device=device)
    gathered = [mine]
    if dist.is_initialized():
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
    return {"peak_rss_bytes_by_rank": [int(g[0]) for g in gathered],
            "rss_before_model_bytes_by_rank": [int(g[1]) for g in gathered]}


def _device(plan: Plan, local_rank: int) -> torch.device:
    if plan.device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resume_path(spec: JobSpec, run_dir: Path, restored: Path | None, attempt: int = 0) -> Path | None:
    """`auto`: the newer of the orchestrator's checkpoint and this run's newest complete one (the
    orchestrator's on a tie), if any; a path: that checkpoint; `never`: none.

    `never` and a path govern only a launch's first attempt: a restarted worker group (torch
    elastic's attempt > 0, or Ray handing back a checkpoint) continues from the newest checkpoint
    this launch wrote, as with `auto`, instead of going back to step 0 or to the given path.

    Ray registers a reported checkpoint only when its controller next polls the workers (every 2 s),
    so a group that fails right after a save gets back an older one than the run directory holds.
    """
    resume = "auto" if attempt > 0 or restored is not None else spec.checkpoint.resume
    if resume == "never":
        return None
    if resume != "auto":
        return Path(resume)
    latest = find_latest(RunDir(run_dir).checkpoints)
    if restored is None or (latest is not None and read_manifest(latest)["step"] > read_manifest(restored)["step"]):
        return latest
    return restored


def _restore(checkpointer: Checkpointer, path: Path, strategy: Strategy, scheduler: Any,
             compression: Compression) -> int:
    extra = checkpointer.load(path)
    # LambdaLR's state carries the lambda object; ours is rebuilt from the spec, so only counters travel.
    scheduler.load_state_dict({**extra["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    for group, lr in zip(strategy.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # not every strategy's optimizer state carries its param groups (ZeRO-1)
    restore_rng(extra["rng"])
    compression.load_state_dict(extra.get("compression", {}))
    return int(extra["step"])


def _rank_state(step: int, scheduler: Any, compression: Compression) -> dict[str, Any]:
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    return {"step": step, "scheduler": sched, "rng": capture_rng(), "compression": compression.state_dict()}

