"""`meshyard submit` packaging: what is uploaded, the one-line summary, and the plain-http token warning.

No Ray cluster and no network: the file list comes from the function the submit path uses
(`jobs.package`), the zip from `packaging.write_zip`, unpacked with Ray's own `unzip_package`
(what a node does with a GCS-stored working_dir zip); the warning is decided by a pure function.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from launcher import jobs, packaging

SECRETS = {".env", "id_rsa", "id_rsa.pub", "deploy.pem", "credentials.yaml", "conf/credentials-prod.json"}


def make_workdir(root: Path) -> Path:
    files = {
        "train.py": "print('train')\n",
        "job.yaml": "name: job\n",
        "pkg/__init__.py": "",
        "pkg/model.py": "X = 1\n",
        "conf/base.yaml": "a: 1\n",
        "conf/credentials-prod.json": "{\"key\": \"s3cr3t\"}\n",
        "data/big.bin": "x" * 4096,          # ignored by .gitignore
        "data/keep.txt": "kept\n",           # re-included by a negation in .gitignore
        "notes/scratch.log": "log\n",        # ignored by a nested .gitignore
        "notes/readme.md": "hi\n",
        ".env": "AWS_SECRET_ACCESS_KEY=abc\n",
        "id_rsa": "-----BEGIN OPENSSH PRIVATE KEY-----\n",
        "id_rsa.pub": "ssh-rsa AAAA\n",
        "deploy.pem": "-----BEGIN PRIVATE KEY-----\n",
        "credentials.yaml": "token: abc\n",
        ".ssh/config": "Host *\n",
        ".ssh/id_ed25519": "key\n",
        ".git/HEAD": "ref: refs/heads/main\n",
        ".venv/lib/site.py": "",
        "runs/job/metrics.jsonl": "{}\n",
        "pkg/__pycache__/model.cpython-311.pyc": "",
        ".gitignore": "data/*\n!data/keep.txt\n",
        "notes/.gitignore": "*.log\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


EXPECTED = ["conf/base.yaml", "data/keep.txt", "job.yaml", "notes/readme.md", "pkg/__init__.py",
            "pkg/model.py", "train.py"]


def test_default_package_leaves_out_secrets_ignored_files_and_outputs(tmp_path):
    work = make_workdir(tmp_path / "work")
    pkg = jobs.package(str(work / "job.yaml"), str(work))
    assert pkg.files == EXPECTED
    assert SECRETS <= set(pkg.excluded)
    assert {".ssh/", ".git/", ".venv/", "runs/", "pkg/__pycache__/", "data/big.bin", "notes/scratch.log",
            ".gitignore", "notes/.gitignore"} <= set(pkg.excluded)
    assert not set(pkg.files) & set(pkg.excluded)
    assert pkg.size == sum((work / f).stat().st_size for f in EXPECTED)


def test_include_brings_paths_back(tmp_path):
    work = make_workdir(tmp_path / "work")
    pkg = jobs.package(str(work / "job.yaml"), str(work), [".ssh/config", "data/big.bin"])
    assert pkg.files == sorted(EXPECTED + [".ssh/config", "data/big.bin"])
    assert ".ssh/id_ed25519" in pkg.excluded and ".env" in pkg.excluded  # only what was named came back
    whole_dir = jobs.package(str(work / "job.yaml"), str(work), ["/runs/"])
    assert "runs/job/metrics.jsonl" in whole_dir.files and "id_rsa" not in whole_dir.files


def test_spec_is_always_packaged_and_links_out_are_not_followed(tmp_path):
    work = make_workdir(tmp_path / "work")
    (work / ".hidden.yaml").write_text("name: job\n")
    outside = tmp_path / "outside_key"
    outside.write_text("secret\n")
    (work / "innocent.txt").symlink_to(outside)
    (work / "alias.txt").symlink_to(work / ".env")
    (work / "model_link.py").symlink_to(work / "pkg" / "model.py")
    pkg = jobs.package(str(work / ".hidden.yaml"), str(work))
    assert ".hidden.yaml" in pkg.files and "model_link.py" in pkg.files
    assert {"innocent.txt", "alias.txt"} <= set(pkg.excluded)
    assert "innocent.txt" not in pkg.files and "alias.txt" not in pkg.files


def test_enclosing_repository_gitignore_is_honoured(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".gitignore").write_text("*.ckpt\nsub/secret_dir/\n")
    work = repo / "sub"
    (work / "secret_dir").mkdir(parents=True)
    (work / "secret_dir" / "a.txt").write_text("a")
    (work / "weights.ckpt").write_text("w")
    (work / "job.yaml").write_text("name: job\n")
    pkg = jobs.package(str(work / "job.yaml"), str(work))
    assert pkg.files == ["job.yaml"]
    assert set(pkg.excluded) == {"secret_dir/", "weights.ckpt"}


def test_summary_line(tmp_path):
    work = make_workdir(tmp_path / "work")
    pkg = jobs.package(str(work / "job.yaml"), str(work))
    line = packaging.summary(pkg)
    assert "\n" not in line
    assert line.startswith(f"packaging {work.resolve()}: 7 files, 0.00 MiB (excluded {len(pkg.excluded)}: ")
    assert pkg.excluded[0] in line and line.endswith("; --include PATTERN brings a path back)")
    assert packaging.summary(pkg, shown=100).count(", ") >= len(pkg.excluded) - 1
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "job.yaml").write_bytes(b"x" * (3 * 2**20 // 2))
    assert packaging.summary(jobs.package(str(clean / "job.yaml"), str(clean))) == \
        f"packaging {clean.resolve()}: 1 files, 1.50 MiB"


def test_the_zip_holds_exactly_the_package_and_ray_unpacks_it_at_the_root(tmp_path):
    work = make_workdir(tmp_path / "work")
    os.chmod(work / "train.py", 0o755)
    pkg = jobs.package(str(work / "job.yaml"), str(work))
    first = packaging.write_zip(pkg, tmp_path / "a.zip")
    second = packaging.write_zip(pkg, tmp_path / "b.zip")
    assert first.read_bytes() == second.read_bytes()  # same directory, same zip: Ray's cache hits
    with zipfile.ZipFile(first) as archive:
        assert sorted(archive.namelist()) == EXPECTED
    request = jobs.submission(str(work / "job.yaml"), ["training.max_steps=3"], str(work), first)
    assert request["runtime_env"] == {"working_dir": str(first)}
    assert request["entrypoint"].endswith("launch job.yaml --executor ray --set training.max_steps=3")
    ray_packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    unpacked = tmp_path / "node"
    unpacked.mkdir()
    ray_packaging.unzip_package(str(first), str(unpacked), remove_top_level_directory=False, unlink_zip=False)
    on_node = sorted(p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*") if p.is_file())
    assert on_node == EXPECTED
    assert (unpacked / "train.py").read_text() == "print('train')\n"
    assert os.stat(unpacked / "train.py").st_mode & 0o777 == 0o755


def test_submit_package_hands_ray_the_zip_and_removes_it(tmp_path):
    work = make_workdir(tmp_path / "work")
    pkg = jobs.package(str(work / "job.yaml"), str(work))
    seen = {}

    class Client:
        def submit_job(self, entrypoint, runtime_env):
            path = Path(runtime_env["working_dir"])
            with zipfile.ZipFile(path) as archive:
                seen["names"] = sorted(archive.namelist())
            seen["path"] = path
            return "raysubmit_1"

    job_id, request = jobs.submit_package(Client(), str(work / "job.yaml"), [], pkg)
    assert job_id == "raysubmit_1" and seen["names"] == EXPECTED
    assert not seen["path"].exists()


@pytest.mark.parametrize("address, warned", [
    ("http://10.0.0.5:8265", True),
    ("10.0.0.5:8265", True),                  # Ray's default scheme is http
    ("http://head.example.com:8265", True),   # a name is not resolved, so not known to be loopback
    ("http://[2001:db8::1]:8265", True),
    ("http://127.0.0.1:8265", False),
    ("http://127.0.0.2:8265", False),
    ("http://localhost:8265", False),
    ("http://[::1]:8265", False),
    ("https://10.0.0.5:8265", False),
    ("HTTPS://head.example.com", False),
])
def test_plain_http_warning(address, warned):
    line = packaging.plain_http_warning(address, "RAY_AUTH_TOKEN")
    assert (line is not None) == warned
    if warned:
        assert "\n" not in line and address in line and "plain http" in line
    assert packaging.plain_http_warning(address, None) is None  # no token, nothing to warn about


def test_token_source_finds_tokens_as_ray_does(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert packaging.token_source({}, home) is None
    assert packaging.token_source({"RAY_AUTH_TOKEN": "t"}, home) == "RAY_AUTH_TOKEN"
    assert packaging.token_source({"RAY_AUTH_TOKEN": "t", "RAY_AUTH_MODE": "disabled"}, home) is None
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("t")
    assert packaging.token_source({}, home) == str(home / ".ray" / "auth_token")


def test_job_client_warns_on_stderr_before_connecting(monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    jobs.warn_plain_http("http://10.0.0.5:8265")
    jobs.warn_plain_http("http://127.0.0.1:8265")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "10.0.0.5" in err


def test_cli_submit_prints_the_summary_warns_and_uploads_only_the_package(tmp_path, monkeypatch, capsys):
    from launcher.cli import main
    from tests.helpers import make_spec

    work = make_workdir(tmp_path / "work")
    spec = make_spec(work, "clijob")
    job_submission = pytest.importorskip("ray.job_submission")
    seen = {}

    class FakeClient:  # stands in for the cluster: nothing is contacted
        def __init__(self, address):
            seen["address"] = address

        def submit_job(self, entrypoint, runtime_env):
            with zipfile.ZipFile(runtime_env["working_dir"]) as archive:
                seen["names"] = sorted(archive.namelist())
            return "raysubmit_2"

    monkeypatch.setattr(job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    monkeypatch.chdir(tmp_path)  # restored after cmd_submit's chdir
    assert main(["submit", str(spec), "--address", "http://10.0.0.5:8265", "--working-dir", str(work),
                 "--include", ".ssh/config"]) == 0
    out, err = capsys.readouterr()
    assert seen["names"] == sorted(EXPECTED + ["clijob.yaml", ".ssh/config"])
    summary = [line for line in out.splitlines() if line.startswith("packaging ")]
    assert summary == [f"packaging {work.resolve()}: 9 files, 0.00 MiB (excluded 15: .env, .git/, .gitignore,"
                       " .ssh/id_ed25519, .venv/, conf/credentials-prod.json, credentials.yaml, data/big.bin, ...;"
                       " --include PATTERN"
                       " brings a path back)"]
    assert "submitted raysubmit_2" in out
    assert err.count("plain http") == 1 and "10.0.0.5" in err
