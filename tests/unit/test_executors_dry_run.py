"""Executors' pure dry runs, cluster configs and rendered artifacts (golden files); nothing starts."""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys

import pytest
import yaml

from launcher.cli import main
from launcher.executors.request import LaunchOptions
from launcher.session import prepare
from tests.helpers import REPO, make_spec

CONFIGS = REPO / "cluster_configs"
QUICKSTART = "examples/quickstart.yaml"


def dry_run(spec, **options):
    return prepare(str(spec), []).dry_run(LaunchOptions(**options))


def test_accelerate_dry_run_starts_the_worker_through_the_real_cli(tmp_path):
    spec = make_spec(tmp_path, resources={"procs_per_node": 2, "max_restarts": 2})
    request = dry_run(spec, executor="accelerate")
    run = tmp_path / "runs" / "test"
    assert request.argv[:4] == (sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch")
    assert request.argv[-3:] == ("-m", "launcher.worker", str(run / "spec.json"))
    flags = dict(zip(request.argv[4:-3:2], request.argv[5:-3:2]))
    assert flags["--num_processes"] == "2" and flags["--max_restarts"] == "2"
    assert flags["--main_process_port"] == "0" and request.env["GLOO_SOCKET_IFNAME"] == "lo"  # free port, loopback
    assert request.env["ACCELERATE_USE_CPU"] == "1"  # MULTI_GPU + this = MULTI_CPU over gloo, several processes
    # tracebacks into per-rank log files, as under torchrun: the launcher reports the failure
    assert flags["--log_dir"] == str(run / "logs") and request.env["PET_REDIRECTS"] == "0:2,1:3"
    config = yaml.safe_load(request.generated[flags["--config_file"]])
    assert config["distributed_type"] == "MULTI_GPU" and config["use_cpu"] is False and config["num_processes"] == 2
    assert not run.exists()


@pytest.mark.parametrize("body, message", [
    ("distributed_type: FSDP\n", "distributed_type FSDP is not allowed"),
    ("distributed_type: MULTI_CPU\n", "on CPU it starts ONE process"),
    ("distributed_type: MULTI_GPU\nuse_cpu: true\n", "use_cpu: true starts a single process"),
])
def test_accelerate_configs_that_change_the_strategy_or_world_are_refused(tmp_path, capsys, body, message):
    config = tmp_path / "acc.yaml"
    config.write_text(body)
    spec = make_spec(tmp_path, resources={"procs_per_node": 2})
    assert main(["plan", str(spec), "--executor", "accelerate", "--accelerate-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_ray_dry_run_maps_the_plan_onto_ray_train(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = make_spec(tmp_path, resources={"procs_per_node": 2, "max_restarts": 3},
                     training={"collective_timeout_s": 60}, checkpoint={"keep": 4})
    s = dry_run(spec, executor="ray").settings
    assert s["ray.init"]["address"] == "local" and s["ray.init"]["_node_ip_address"] == "127.0.0.1"
    assert s["ray.init"]["include_dashboard"] is False  # the embedded Ray listens on loopback only
    assert s["ray.init"]["runtime_env"] == {"worker_process_setup_hook": "launcher.executors.ray_rank.loopback_stores"}
    assert s["ScalingConfig"] == {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1}}
    assert s["TorchConfig"] == {"backend": "gloo", "timeout_s": 60}
    assert s["FailureConfig"] == {"max_failures": 3} and s["CheckpointConfig"] == {"num_to_keep": 4}
    assert s["RunConfig"]["storage_path"] == str(tmp_path / "runs" / "test" / "ray")
    # the ranks' console files (relayed as they are) and Ray's own output, apart; no print patch
    assert s["train_loop_config"]["console_dir"] == str(tmp_path / "runs" / "test" / "logs" / "console")
    assert s["ray_log"] == str(tmp_path / "runs" / "test" / "logs" / "ray.log")
    assert s["environment"] == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    joined = dry_run(spec, executor="ray", address="ray://10.0.0.1:10001").settings
    assert joined["ray.init"] == {"address": "ray://10.0.0.1:10001"} and joined["ray.shutdown"].startswith("no")


def test_single_node_local_dry_run_meets_on_loopback(tmp_path):
    """No --standalone (its stores listen on every interface): a c10d rendezvous on 127.0.0.1, port 0
    (the agent's store takes a free one), the agent's address 127.0.0.1, collectives on `lo`."""
    spec = make_spec(tmp_path, resources={"procs_per_node": 2, "max_restarts": 1})
    request = dry_run(spec)
    run = tmp_path / "runs" / "test"
    assert request.argv == (
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0", "--rdzv-id=test", "--local-addr=127.0.0.1", "--nproc-per-node=2",
        "--max-restarts=1", "--monitor-interval=0.5", "--shutdown-timeout=10", f"--log-dir={run / 'logs'}",
        "--redirects=0:2,1:3", "-m", "launcher.worker", str(run / "spec.json"))
    assert request.env["GLOO_SOCKET_IFNAME"] == "lo" and request.env["NCCL_SOCKET_IFNAME"] == "lo"
    assert not run.exists()


def test_multi_node_local_dry_run_uses_c10d(tmp_path, capsys):
    spec = make_spec(tmp_path, resources={"procs_per_node": 2})
    assert main(["plan", str(spec), "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "10.0.0.1:29400"]) == 0
    out = capsys.readouterr().out
    assert "world size       4 = 2 node(s) x 2 process(es)" in out
    assert "--nnodes=2 --node-rank=1 --rdzv-backend=c10d --rdzv-endpoint=10.0.0.1:29400 --rdzv-id=test" in out
    assert "--local-addr" not in out and "SOCKET_IFNAME" not in out  # several nodes: the addresses the user gives
    assert main(["plan", str(spec), "--nnodes", "2"]) == 2
    assert "needs --rdzv-endpoint HOST:PORT" in capsys.readouterr().err


def test_launchers_of_one_multi_node_job_write_the_shared_spec_at_once(tmp_path):
    """Every node's launcher writes <run>/spec.json into the shared run directory at the same moment."""
    session = prepare(str(make_spec(tmp_path, resources={"procs_per_node": 2})), [])
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_spec_repeatedly, args=(session,)) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert [writer.exitcode for writer in writers] == [0, 0]
    assert json.loads(session.spec_path.read_text())["name"] == "test"
    assert sorted(p.name for p in session.run_dir.iterdir()) == ["plan.json", "spec.json"]  # no temp left


def _write_spec_repeatedly(session) -> None:
    for _ in range(300):
        session.write_spec()


@pytest.mark.parametrize("config, executor", [("local", "local"), ("ray-local", "ray"), ("accelerate", "accelerate"),
                                              ("two-node", "local")])
def test_cluster_configs_pick_the_executor(config, executor, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["plan", QUICKSTART, "--cluster", str(CONFIGS / f"{config}.yaml"), "--node-rank", "0"]) == 0
    assert f"{executor} executor would run:" in capsys.readouterr().out


def test_a_bad_cluster_config_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.yaml"
    bad.write_text("executor: ray\nresources: {gpus: 2}\n")
    assert main(["plan", QUICKSTART, "--cluster", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resources.gpus: Extra inputs are not permitted; allowed: nodes" in err


@pytest.mark.parametrize("kind, extra, golden", [
    ("slurm", ["--set", "resources.nodes=2"], "slurm.sbatch"),
    ("rayjob", [], "kuberay-rayjob.yaml"),
    ("accelerate", [], "accelerate/multi-process.yaml"),
])
def test_rendered_artifacts_match_the_checked_in_files(kind, extra, golden, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["render", kind, QUICKSTART, *extra]) == 0
    assert capsys.readouterr().out == (CONFIGS / golden).read_text()


def test_slurm_script_runs_one_launcher_per_node_with_a_c10d_rendezvous():
    script = (CONFIGS / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "srun --kill-on-bad-exit=1 bash -c 'meshyard launch examples/quickstart.yaml" in script
    assert '--nnodes 2 --node-rank "$SLURM_NODEID" --rdzv-endpoint "$MESHYARD_RDZV_ENDPOINT"' in script


def test_rayjob_entrypoint_is_meshyard_launch_with_ray():
    manifest = yaml.safe_load((CONFIGS / "kuberay-rayjob.yaml").read_text())
    assert manifest["kind"] == "RayJob" and manifest["apiVersion"] == "ray.io/v1"
    assert manifest["spec"]["entrypoint"] == "meshyard launch examples/quickstart.yaml --executor ray"
    assert manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 1


def test_ray_cluster_config_passes_rays_own_validation():
    pytest.importorskip("ray")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CONFIGS / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))
    config["max_wrkers"] = 1  # and the validation is real: a typo is refused
    with pytest.raises(Exception, match="max_wrkers"):
        validate_config(prepare_config(config))


def test_launch_and_rank_start_import_no_checkpoint_machinery(tmp_path):
    """torch.distributed.checkpoint (with DTensor) costs ~1 s to import on 2 cores: the launcher
    needs it only to check a checkpoint it resumes from, a rank only at its first save or load."""
    spec = make_spec(tmp_path, resources={"procs_per_node": 2})
    probe = ("import sys; from launcher.session import prepare; import launcher.rank;"
             f" prepare({str(spec)!r}, []).check_before_launch();"
             " print(sorted(m for m in sys.modules if m.startswith('torch.distributed.checkpoint')))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
