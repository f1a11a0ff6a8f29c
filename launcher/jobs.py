"""Ray job submission: `meshyard submit` and `meshyard jobs list|status|logs|stop`.

A submitted job packages a working directory and runs `meshyard launch SPEC --executor ray` as its entrypoint
on the cluster, where Ray sets RAY_ADDRESS so the launch joins that cluster. Ray's token
authentication stays on: the client runs with RAY_AUTH_MODE=token unless told otherwise, and
finds the token as Ray does (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); a token
bound for a plain http:// address that is not loopback gets a one-line warning on stderr.

What is uploaded is decided by `launcher.packaging`, not by Ray: an explicit file list (the
directory's .gitignore/.rayignore honoured; dotfiles, keys, credentials, run outputs left out;
`--include` brings paths back), printed as one line and shipped to Ray as one zip.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from launcher import packaging
from launcher.errors import UserError


def job_client(address: str | None) -> Any:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address: required (the Ray dashboard's job API, e.g. http://127.0.0.1:8265),"
                        " or set RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    warn_plain_http(address)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise UserError("meshyard submit/jobs need Ray's job API: pip install 'meshyard[ray]' (ray[default])") from None
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, ValueError, auth errors: one line, exit 2
        raise UserError(f"--address {address}: cannot reach a Ray job API there ({_first_line(exc)})") from None


def entrypoint(spec: str, overrides: list[str]) -> str:
    """The command the job runs on the cluster (`python -m` so the cluster's PATH picks the interpreter)."""
    sets = [part for override in overrides for part in ("--set", override)]
    return shlex.join(["python", "-m", "launcher.cli", "launch", spec, "--executor", "ray", *sets])


def warn_plain_http(address: str) -> None:
    """One line on stderr when the Ray client would send its token in clear text to another host."""
    line = packaging.plain_http_warning(address, packaging.token_source())
    if line:
        print(line, file=sys.stderr, flush=True)


def package(spec: str, working_dir: str, includes: list[str] | None = None) -> packaging.Package:
    """The files `submit` uploads from `working_dir` (the spec always among them)."""
    return packaging.build_package(working_dir, includes or [], always=[spec])


def submission(spec: str, overrides: list[str], working_dir: str,
               package_zip: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What `submit` hands to Ray (pure): the entrypoint and the runtime environment.

    `package_zip`: the zip `packaging.write_zip` made of the package (what the working_dir becomes).
    """
    root, spec_file = Path(working_dir).resolve(), Path(spec).resolve()
    if not spec_file.is_relative_to(root):
        raise UserError(f"{spec}: outside the packaged working directory {root}; move it there or pass --working-dir")
    return {"entrypoint": entrypoint(str(spec_file.relative_to(root)), overrides),
            "runtime_env": {"working_dir": str(package_zip if package_zip is not None else root)}}


def submit(client: Any, request: dict[str, Any]) -> str:
    try:
        return client.submit_job(**request)
    except Exception as exc:
        raise UserError(f"submit: the cluster refused the job ({_first_line(exc)})") from None


def submit_package(client: Any, spec: str, overrides: list[str], pkg: packaging.Package) -> tuple[str, dict[str, Any]]:
    """Zip exactly `pkg.files`, submit with that zip as the working_dir, remove the zip; (job id, request)."""
    with tempfile.TemporaryDirectory(prefix="meshyard-submit-") as scratch:
        archive = packaging.write_zip(pkg, Path(scratch) / "working_dir.zip")
        request = submission(spec, overrides, str(pkg.root), archive)
        return submit(client, request), request


def status(client: Any, job_id: str) -> str:
    try:
        return str(client.get_job_status(job_id).value)
    except Exception as exc:
        raise UserError(f"jobs status {job_id}: {_first_line(exc)}") from None


def print_logs(client: Any, job_id: str, follow: bool) -> None:
    try:
        if not follow:
            print(client.get_job_logs(job_id), end="", flush=True)
            return
        asyncio.run(_tail(client, job_id))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"jobs logs {job_id}: {_first_line(exc)}") from None


async def _tail(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):  # ends when the job does
        print(lines, end="", flush=True)


def list_jobs(client: Any) -> list[str]:
    rows = []
    for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
        rows.append(f"{job.submission_id or job.job_id}  {job.status.value:<9}  {job.entrypoint}")
    return rows


def stop(client: Any, job_id: str) -> bool:
    try:
        return bool(client.stop_job(job_id))
    except Exception as exc:
        raise UserError(f"jobs stop {job_id}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
