"""`meshyard` command line: launch, plan, calibrate, validate, schema, submit, jobs, render, export, quantize, env,
plot, runs.

Exit codes: 0 done; 2 bad input (one line `error: <field or file>: <what is allowed>`); 1 a rank
failed or the job hung (each rank's error or where it was stuck); 75 preempted by SIGTERM after a
checkpoint (run the same command to resume); 130 Ctrl-C (every process of the job stopped); 141 the
output's reader went away (`| head`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from launcher.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER_ERROR, LaunchError, UserError
from launcher.executors.request import LaunchOptions
from launcher.interrupts import LAUNCH_SIGNALS, Preempted
from launcher.rundir import RunDir

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command killed by it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshyard", description="One YAML job spec -> a distributed PyTorch training run."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_spec(name: str, help_text: str, first: tuple[str, list[str]] | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if first is not None:  # a positional before SPEC, e.g. `render KIND SPEC`
            sub.add_argument(first[0], choices=first[1])
        sub.add_argument("spec", help="job spec YAML file")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a spec field, e.g. --set optimizer.lr=0.01 (repeatable)")
        return sub

    add_where(with_spec("launch", "train the job: start the processes and wait for them"))
    plan = with_spec("plan", "print the plan, its per-rank memory/FLOPs/communication estimate and exactly what a"
                             " launch would run; starts nothing")
    add_where(plan)
    plan.add_argument("--json", action="store_true", help="plan and estimate as JSON (bytes as integers), for scripts")
    plan.add_argument("--explain", action="store_true",
                      help="strategy auto: every candidate plan with its predicted peak memory per rank and step"
                           " time, and why it was or was not chosen (in --json always)")
    plan.add_argument("--simulate", action="store_true",
                      help="also build every rank's sharded model and run one step's shapes at the full world size in"
                           " this process (fake process group, fake tensors); exit 2 on errors a launch would hit")
    calibrate = commands.add_parser(
        "calibrate", help="measure this machine's matmul FLOP/s per process and collective bandwidth, for the"
                          " plan's predicted step time and the metrics' MFU",
        description="start N processes on this machine, measure what one rank gets (matmul and attention FLOP/s"
                    " in fp32 and bf16, elementwise bandwidth, per-op overhead, collective bandwidth over the"
                    " backend, tensor-parallel and FSDP2 overhead) and store it per host in $XDG_CACHE_HOME/meshyard"
                    " (default ~/.cache/meshyard)")
    calibrate.add_argument("--procs", type=int, nargs="+", default=[2], metavar="N",
                           help="world sizes to measure, e.g. --procs 1 2 4 (default 2); the plan uses its own")
    calibrate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                           help="cpu (gloo) or cuda (nccl); auto: cuda if present")
    with_spec("validate", "check a spec file (fields, types, ranges, importable targets)")
    submit = with_spec("submit", "submit `meshyard launch SPEC --executor ray` as a Ray job; prints the job id")
    submit.add_argument("--address", default=None,
                        help="the cluster's job API, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    submit.add_argument("--working-dir", default=".", help="directory packaged for the job (default: the current one;"
                        " .gitignore/.rayignore honoured; dotfiles (.env, .ssh/, .git/, .venv/), private keys,"
                        " credentials*.yaml/yml/json, runs/ and caches are left out); SPEC must be inside it")
    submit.add_argument("--include", dest="includes", action="append", default=[], metavar="PATTERN",
                        help="upload paths matching PATTERN (gitignore syntax) although left out by default,"
                             " e.g. --include .github or --include .ssh/config (repeatable)")
    jobs = commands.add_parser("jobs", help="Ray jobs: list | status ID | logs ID [--follow] | stop ID",
                               description="Ray jobs on a cluster: list | status ID | logs ID [--follow] | stop ID")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?", default=None, metavar="ID")
    jobs.add_argument("--address", default=None, help="the cluster's job API (default: RAY_ADDRESS)")
    jobs.add_argument("--follow", action="store_true",
                      help="logs: stream until the job ends; exit 0 only if it SUCCEEDED")
    render = with_spec("render", "print a file that runs the job elsewhere: slurm (sbatch script), rayjob"
                                 " (KubeRay manifest) or accelerate (accelerate config)",
                       first=("kind", ["slurm", "rayjob", "accelerate"]))
    render.add_argument("--image", default=None, help="rayjob: container image with meshyard installed")
    commands.add_parser("schema", help="print the job spec's JSON Schema",
                        description="print the job spec's JSON Schema")
    env = commands.add_parser("env", help="versions, devices, backends, cores, memory and run-relevant"
                                          " environment variables, for bug reports",
                              description="print what a bug report needs about this machine (like `accelerate env`)")
    env.add_argument("--json", action="store_true", help="as JSON, for scripts")
    export = commands.add_parser(
        "export", help="write a run's newest checkpoint as one consolidated state dict",
        description="write a run's newest (possibly sharded) checkpoint as one consolidated state dict"
                    " (torch.save; load with torch.load(weights_only=True)); no process group needed")
    export.add_argument("run", help="a run directory (<output.dir>/<name>)")
    export.add_argument("--out", default=None, help="output file (default RUN/export/model.pt), or directory with"
                                                   " --format safetensors (default RUN/export/safetensors)")
    export.add_argument("--format", default="torch", choices=["torch", "safetensors"],
                        help="torch: one state dict file; safetensors: a directory that Hugging Face's"
                             " from_pretrained loads (config.json + model.safetensors) for HF models")
    plot = commands.add_parser(
        "plot", help="draw runs' loss, eval metrics, LR, throughput and memory against step into one PNG",
        description="draw loss, eval metrics, learning rate, throughput and memory against step from each run's"
                    " metrics.jsonl: one panel per quantity, one line per run")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run directories (<output.dir>/<name>)")
    plot.add_argument("--out", default=None, metavar="FILE", help="output image (default FIRST_RUN/plot.png)")
    runs = commands.add_parser(
        "runs", help="list the runs in a directory: status, steps, final loss, wall time",
        description="list the runs in DIR: status (running, finished, stopped, preempted, interrupted, failed),"
                    " steps done / max_steps, final loss and the newest launch's wall time")
    runs.add_argument("dir", nargs="?", default="runs", metavar="DIR",
                      help="the output.dir that holds the runs (default: runs)")
    runs.add_argument("--json", action="store_true", help="as JSON, for scripts")
    quantize = commands.add_parser(
        "quantize", help="post-training int8 quantization of a run's newest checkpoint, with a report",
        description="post-training int8 quantization of a run's newest checkpoint; writes RUN/quantized/"
                    " (model_fp32.pt, model_int8.pt, report.json: size, eval metric, CPU latency before/after)")
    quantize.add_argument("run", help="a run directory (<output.dir>/<name>)")
    quantize.add_argument("--method", default="dynamic_int8",
                          help="dynamic_int8 (default) or weight_only_int8 (torchao), or static_int8 (torch.ao)")
    quantize.add_argument("--calibrate", type=int, default=None, metavar="N",
                          help="static_int8 only: calibrate on N training batches (default 16)")
    return parser


def add_where(sub: argparse.ArgumentParser) -> None:
    """Where the job runs: the executor and its settings (flags win over a --cluster file)."""
    sub.add_argument("--executor", default=None, help="local (default), ray or accelerate")
    sub.add_argument("--cluster", default=None, metavar="FILE",
                     help="a cluster config, e.g. cluster_configs/ray-local.yaml")
    sub.add_argument("--nnodes", type=int, default=None, help="local: number of nodes (sets resources.nodes)")
    sub.add_argument("--node-rank", type=int, default=0, help="local: this launcher's node, 0..nnodes-1")
    sub.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                     help="local: c10d rendezvous for several nodes")
    sub.add_argument("--address", default=None,
                     help="ray: an existing cluster (default: RAY_ADDRESS, else an embedded local Ray)")
    sub.add_argument("--accelerate-config", default=None, metavar="FILE",
                     help="accelerate: your config file instead of the one generated from the spec")


def resolve_where(args: argparse.Namespace) -> tuple[LaunchOptions, list[str]]:
    """Launch options and the spec overrides they imply (cluster resources first, then --set, then --nnodes)."""
    from launcher.cluster import ClusterConfig, load_cluster, resource_overrides
    from launcher.executors import check_executor

    cluster = load_cluster(args.cluster) if args.cluster else ClusterConfig()
    options = LaunchOptions(
        executor=args.executor or cluster.executor, node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint or cluster.rdzv_endpoint, address=args.address or cluster.address,
        accelerate_config=args.accelerate_config or cluster.accelerate_config,
    )
    check_executor(options.executor)  # fail on a bad name before any work
    overrides = resource_overrides(cluster) + list(args.overrides)
    if args.nnodes is not None:
        overrides.append(f"resources.nodes={args.nnodes}")
    return options, overrides


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # inside: a Ctrl-C while it runs is an interrupt like any other
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except LaunchError as exc:
        print("\n".join([f"error: {exc}", *exc.report()]), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: every process of the job was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Preempted as exc:
        print(exc, file=sys.stderr)
        return EXIT_PREEMPTED
    except BrokenPipeError:
        # The reader went away (`meshyard plan SPEC | head`): stop quietly, as other command-line tools do.
        # stdout is pointed at /dev/null so the interpreter's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # a path the user gave cannot be used (`export --out DIR`, a full disk): say which
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


def describe_os_error(exc: OSError) -> str:
    """`path: reason` on one line (for a failed rename: `source -> destination: reason`)."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or str(exc)
    return f"{paths}: {reason}" if paths else reason


def cmd_env(args: argparse.Namespace) -> int:
    from launcher.environment import collect, render

    info = collect()
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from launcher.spec import JobSpec

    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from launcher.session import prepare

    session = prepare(args.spec, args.overrides)
    print(f"{args.spec}: ok ({session.plan.world_size} process(es), strategy {session.plan.strategy})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from launcher.autoplan import NoPlanFits
    from launcher.planreport import explain_text, no_plan_fits_json, plan_json, plan_text
    from launcher.session import prepare

    options, overrides = resolve_where(args)
    try:
        session = prepare(args.spec, overrides)
    except NoPlanFits as exc:  # the candidates are the explanation; the error still ends the command
        if args.json or args.explain:
            print(json.dumps(no_plan_fits_json(exc), indent=1) if args.json else explain_text(exc))
        raise
    request = session.dry_run(options)
    simulation = None
    if args.simulate:
        from launcher.simulate import simulate

        simulation = simulate(session)
    if args.json:
        extra = {"simulation": simulation.to_dict()} if simulation is not None else {}
        print(json.dumps({**plan_json(session, request), **extra}, indent=1, default=str))
    else:
        print("\n".join([plan_text(session, request, args.explain),
                         *([simulation.describe()] if simulation is not None else [])]))
    return EXIT_USER_ERROR if simulation is not None and not simulation.ok else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from launcher.calibrate import calibrate, describe
    from launcher.plan import threads_per_rank
    from launcher.profile import save_measured

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use cpu or auto")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    most = torch.cuda.device_count() if device == "cuda" else 256  # one GPU per rank
    for procs in args.procs:
        if not 1 <= procs <= most:
            raise UserError(f"--procs {procs}: allowed 1 to {most}" + (" (one GPU per process)" if device == "cuda"
                                                                        else ""))
    for procs in args.procs:
        measured = calibrate(procs, device, threads_per_rank(procs, []) if device == "cpu" else 1)
        print(describe(measured))
        print(f"wrote {save_measured(measured)}", flush=True)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    LAUNCH_SIGNALS.install()  # first: a SIGTERM/Ctrl-C at any later moment keeps the exit-code contract
    from launcher.runlock import hold_run, lock_file
    from launcher.session import prepare
    from launcher.startup import LAUNCHED_AT_ENV, process_started_at

    started = time.time()
    # Every executor's ranks time their start-up from the user's Enter: this process's start, so the
    # interpreter's start and the imports count too (or from an outer tool's clock, e.g. a benchmark's).
    os.environ.setdefault(LAUNCHED_AT_ENV, repr(process_started_at()))
    options, overrides = resolve_where(args)
    session = prepare(args.spec, overrides)
    # One launch per run: the lock is taken before anything of the run is read or written, and held through restarts.
    with hold_run(session.run_dir, lock_file(session.plan.nodes, options.node_rank)):
        return _launch_holding_the_lock(session, options, started)


def _launch_holding_the_lock(session, options: LaunchOptions, started: float) -> int:
    from launcher.executors import get_executor
    from launcher.startup import describe

    session.check_before_launch()
    print(session.plan.describe(), flush=True)
    request = session.dry_run(options)
    executor = get_executor(options.executor)
    session.write_spec()
    print(f"launching ({options.executor}): {request.headline()}", flush=True)
    try:
        LAUNCH_SIGNALS.raise_if_signalled()
        executor.run(request)
    except LaunchError as exc:
        if not LAUNCH_SIGNALS.terminated:
            _ended_early(session.run_dir, exc.exit_code, _first_failure(exc), started)
            raise
        # preempted while starting: ranks that had not taken the signal yet died of it
        _ended_early(session.run_dir, EXIT_PREEMPTED, "preempted before a checkpoint for the signal", started)
        print("preempted: the job stopped before a checkpoint for the signal; run the same command to resume"
              " from its newest checkpoint", file=sys.stderr)
        return EXIT_PREEMPTED
    # Whatever ends the launch early is recorded, so `meshyard runs` does not take an older summary for its end.
    except KeyboardInterrupt:
        _ended_early(session.run_dir, EXIT_INTERRUPTED, "interrupted (Ctrl-C)", started)
        raise
    except Preempted:
        _ended_early(session.run_dir, EXIT_PREEMPTED, "preempted before the job started", started)
        raise
    except UserError as exc:
        _ended_early(session.run_dir, EXIT_USER_ERROR, str(exc), started)
        raise
    step = session.preempted_step(since=started)
    if step is not None:
        print(f"preempted: checkpoint written at step {step}; run the same command to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    summary = RunDir(session.run_dir).summary
    if summary.is_file() and summary.stat().st_mtime >= started:
        phases = json.loads(summary.read_text()).get("startup_s")
        if phases:
            print(describe(phases))
    print(f"summary: {summary}")
    return 0


def _ended_early(run_dir: Path, exit_code: int, error: str, started: float) -> None:
    """What the launcher records for a launch that ended without the job's summary: the failure record
    `meshyard runs` reads, and the tracker runs the ranks left open, ended."""
    from launcher.runs import record_failure
    from launcher.trackers import end_abandoned_runs

    record_failure(run_dir, exit_code, error, started)
    end_abandoned_runs(run_dir, killed=exit_code in (EXIT_PREEMPTED, EXIT_INTERRUPTED))


def _first_failure(exc: LaunchError) -> str:
    """The launch error and the first failing rank's first line: what `meshyard runs` shows."""
    first = next(iter(exc.failures.items()), None)
    return str(exc) if first is None else f"{exc}: rank {first[0]}: {first[1].splitlines()[0] if first[1] else ''}"


def cmd_quantize(args: argparse.Namespace) -> int:
    from launcher.compression.quantize import quantize_run

    report = quantize_run(Path(args.run), args.method, args.calibrate)
    size, ev, lat = report["size_bytes"], report["eval"], report["latency_ms_median"]
    print(f"{args.method}: size {size['fp32']} -> {size['int8']} bytes ({report['size_ratio']:.2f}x)")
    for key in ev["fp32"]:
        print(f"eval {key}: {ev['fp32'][key]:.4f} -> {ev['int8'][key]:.4f}")
    print(f"CPU latency (median, batch {lat['batch_size']}): {lat['fp32']:.3f} -> {lat['int8']:.3f} ms")
    print(f"wrote {Path(args.run) / 'quantized'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from launcher.plot import plot_runs

    out, panels = plot_runs([Path(run) for run in args.runs], Path(args.out) if args.out else None)
    print(f"wrote {out} ({', '.join(panels)})")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from launcher.runs import list_runs, render_json, render_table

    runs = list_runs(Path(args.dir))
    if args.json:
        print(render_json(runs))
    elif not runs:
        print(f"no runs in {args.dir}")
    else:
        print(render_table(runs))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.export import export_run

    out = export_run(Path(args.run), Path(args.out) if args.out else None, args.format)
    print(f"wrote {out}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from launcher import jobs
    from launcher.packaging import summary as packaging_summary
    from launcher.session import prepare

    jobs.submission(args.spec, args.overrides, args.working_dir)  # SPEC inside the working dir, or one line
    spec = os.path.abspath(args.spec)
    working_dir = os.path.abspath(args.working_dir)
    os.chdir(working_dir)  # targets resolve against the packaged directory, as they will on the cluster
    prepare(spec, args.overrides)  # bad input fails here, not on the cluster
    package = jobs.package(spec, working_dir, args.includes)
    print(packaging_summary(package), flush=True)
    client = jobs.job_client(args.address)
    job_id, request = jobs.submit_package(client, spec, args.overrides, package)
    print(f"submitted {job_id}: {request['entrypoint']}")
    print(f"follow it with: meshyard jobs logs {job_id} --follow --address {args.address or '$RAY_ADDRESS'}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from launcher import jobs

    if args.action != "list" and not args.job_id:
        raise UserError(f"jobs {args.action}: needs a job ID (see `meshyard jobs list`)")
    client = jobs.job_client(args.address)
    if args.action == "list":
        print("\n".join(jobs.list_jobs(client)) or "no jobs")
    elif args.action == "status":
        print(jobs.status(client, args.job_id))
    elif args.action == "logs":
        jobs.print_logs(client, args.job_id, args.follow)
        if args.follow:  # the job has ended: say how, and exit like a launch would
            state = jobs.status(client, args.job_id)
            print(f"job {args.job_id}: {state}", file=sys.stderr)
            return 0 if state == "SUCCEEDED" else 1
    else:
        print(f"{args.job_id}: {'stop requested' if jobs.stop(client, args.job_id) else 'not running'}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from launcher import render
    from launcher.executors.accelerate import generated_config
    from launcher.session import prepare

    session = prepare(args.spec, args.overrides)
    name, plan = session.spec.name, session.plan
    if args.kind == "slurm":
        print(render.render_slurm(name, plan, args.spec, args.overrides), end="")
    elif args.kind == "rayjob":
        print(render.render_rayjob(name, plan, args.spec, args.overrides, args.image or render.DEFAULT_IMAGE), end="")
    else:
        print(render.render_accelerate(generated_config(session.job, machine_rank=0)), end="")
    return 0


COMMANDS = {"render": cmd_render, "submit": cmd_submit, "jobs": cmd_jobs, "export": cmd_export, "schema": cmd_schema,
            "env": cmd_env, "plot": cmd_plot, "runs": cmd_runs,
            "validate": cmd_validate, "plan": cmd_plan, "calibrate": cmd_calibrate, "launch": cmd_launch,
            "quantize": cmd_quantize}


if __name__ == "__main__":
    sys.exit(main())
