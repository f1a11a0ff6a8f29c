"""What `meshyard submit` uploads: an explicit file list built here, shipped to Ray as one zip.

Ray packages a `runtime_env` working_dir itself, honouring `excludes` and the `.gitignore`/
`.rayignore` files *inside* the directory, but it uploads dotfiles, keys and credentials unless
told otherwise, ignores the `.gitignore` of an enclosing repository, and says nothing about
what it sent. So meshyard decides the file list (`build_package`), prints it as one line
(`summary`), writes exactly those files into a zip (`write_zip`) and hands Ray that zip as the
working_dir (a local .zip is uploaded as-is and unpacked at the job's working directory).

Left out by default (`DEFAULT_EXCLUDES`, gitignore syntax, plus every `.gitignore`/`.rayignore`
from the working directory down, and those of the enclosing git repository above it):
dotfiles and dot-directories (.env, .ssh/, .git/, .venv/, ...), private keys, credential files,
run outputs, virtual environments and caches, and symlinks that lead outside the directory.
`--include PATTERN` (gitignore syntax, repeatable) brings matching paths back; an excluded
directory is entered only when a pattern names a path inside it (`--include .ssh/config`) or
matches the directory itself (`--include .github`). The job's spec file is always included.
"""
from __future__ import annotations

import ipaddress
import os
import stat
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from launcher.errors import UserError

DEFAULT_EXCLUDES = [
    ".*",  # dotfiles and dot-directories at any depth: .env, .ssh/, .git/, .venv/, .aws/, .netrc
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*",  # ssh keys (and their .pub, harmless but noisy)
    "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore",
    "credentials*.yaml", "credentials*.yml", "credentials*.json",
    "runs/", "venv/", "__pycache__/",
]
IGNORE_FILES = (".gitignore", ".rayignore")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so an unchanged directory gives the same zip (Ray caches by hash)


def _pathspec(lines: Iterable[str]) -> Any:
    """Git's ignore rules: pathspec's GitIgnoreSpec (>= 0.12) when installed, else the older copy Ray
    bundles (its "gitwildmatch" patterns, a name pathspec 1.x deprecates)."""
    patterns = [line.rstrip("\n") for line in lines]
    try:
        from pathspec import GitIgnoreSpec
    except ImportError:
        try:
            from ray._private.thirdparty.pathspec import PathSpec
        except ImportError:
            raise UserError("meshyard submit needs Ray's job API: pip install 'meshyard[ray]' (ray[default])") from None
        return PathSpec.from_lines("gitwildmatch", patterns)
    return GitIgnoreSpec.from_lines(patterns)


def _verdict(spec: Any, rel: str) -> bool | None:
    """gitignore semantics within one file: the last matching pattern wins; None when none matches."""
    result = None
    for pattern in spec.patterns:
        if pattern.include is not None and pattern.regex.match(rel):
            result = pattern.include
    return result


@dataclass
class Package:
    root: Path
    files: list[str] = field(default_factory=list)      # relative POSIX paths, sorted
    excluded: list[str] = field(default_factory=list)   # relative paths left out; directories end in "/"
    size: int = 0                                       # bytes of the files (uncompressed)


class _Ignores:
    """The ignore files that govern paths under `root`: the enclosing repo's above it, then nested ones."""

    def __init__(self, root: Path, defaults: list[str], includes: list[str]) -> None:
        self.root = root
        self.defaults = _pathspec(defaults)
        self.include_lines = [p for p in includes if p.strip()]
        self.includes = _pathspec(self.include_lines)
        self.files: dict[Path, Any] = {}  # directory -> PathSpec of its ignore files
        for ancestor in reversed(_repo_ancestors(root)):
            self._load(ancestor)

    def _load(self, directory: Path) -> None:
        lines: list[str] = []
        for name in IGNORE_FILES:
            path = directory / name
            if path.is_file():
                try:
                    lines += path.read_text(errors="replace").splitlines()
                except OSError:
                    continue
        if lines:
            self.files[directory] = _pathspec(lines)

    def enter(self, directory: Path) -> None:
        if directory not in self.files:
            self._load(directory)

    def ignored(self, path: Path, is_dir: bool) -> bool:
        rel = path.relative_to(self.root).as_posix() + ("/" if is_dir else "")
        if _verdict(self.defaults, rel):
            return True
        decision = False
        for directory, spec in self.files.items():  # shallowest first: a deeper file decides last
            if directory != path and _is_within(path, directory):
                verdict = _verdict(spec, path.relative_to(directory).as_posix() + ("/" if is_dir else ""))
                if verdict is not None:
                    decision = verdict
        return decision

    def included(self, rel: str, is_dir: bool) -> bool:
        return bool(self.include_lines) and bool(_verdict(self.includes, rel + ("/" if is_dir else "")))

    def may_include_inside(self, rel: str) -> bool:
        """Whether an --include pattern names a path below directory `rel` (so it is worth entering)."""
        return any(p.lstrip("/").startswith(rel + "/") for p in self.include_lines)


def _is_within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _repo_ancestors(root: Path) -> list[Path]:
    """Directories above `root` up to its git repository's top (nearest first); [] outside a repo."""
    chain = []
    for parent in root.parents:
        chain.append(parent)
        if (parent / ".git").exists():
            return chain
    return []


def build_package(working_dir: str | os.PathLike[str], includes: list[str] | None = None,
                  always: list[str | os.PathLike[str]] | None = None,
                  defaults: list[str] | None = None) -> Package:
    """The files `meshyard submit` uploads from `working_dir` (see the module docstring).

    `always`: paths (e.g. the job's spec) included whatever the patterns say.
    """
    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise UserError(f"--working-dir {working_dir}: not a directory")
    rules = _Ignores(root, DEFAULT_EXCLUDES if defaults is None else defaults, includes or [])
    forced = set()
    for path in always or []:
        resolved = Path(path).resolve()
        if resolved.is_file() and resolved.is_relative_to(root):
            forced.add(resolved.relative_to(root).as_posix())
    package = Package(root)

    def walk(directory: Path, inside_excluded: bool) -> None:
        rules.enter(directory)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise UserError(f"--working-dir: cannot read {directory} ({exc.strerror})") from None
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            if entry.is_dir(follow_symlinks=False):
                if rules.included(rel, True):
                    walk(path, False)
                elif inside_excluded or rules.ignored(path, True):
                    if rules.may_include_inside(rel):
                        walk(path, True)  # what stays out in there is listed file by file
                    else:
                        package.excluded.append(rel + "/")
                else:
                    walk(path, False)
                continue
            if entry.is_symlink():  # uploaded as the file it leads to, so judge that file too
                target = path.resolve()
                escapes = not target.is_file() or not target.is_relative_to(root) or (
                    target != path and rules.ignored(target, False))
                if escapes and not (target.is_file() and (rel in forced or rules.included(rel, False))):
                    package.excluded.append(rel)  # a link out of the directory, to a secret, or to a directory
                    continue
            elif not entry.is_file():
                continue  # sockets, fifos, devices
            keep = rel in forced or rules.included(rel, False) or not (inside_excluded or rules.ignored(path, False))
            if keep:
                package.files.append(rel)
                package.size += path.stat().st_size
            else:
                package.excluded.append(rel)

    walk(root, False)
    package.files.sort()
    return package


def summary(package: Package, shown: int = 8) -> str:
    """One line: `packaging DIR: N files, X MiB (excluded M: .env, id_rsa, ...)`."""
    line = f"packaging {package.root}: {len(package.files)} files, {package.size / 2**20:.2f} MiB"
    if package.excluded:
        names = ", ".join(package.excluded[:shown]) + (", ..." if len(package.excluded) > shown else "")
        line += f" (excluded {len(package.excluded)}: {names}; --include PATTERN brings a path back)"
    return line


def write_zip(package: Package, destination: Path) -> Path:
    """Exactly `package.files` into a zip at `destination` (deterministic: sorted, fixed times)."""
    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for rel in package.files:
            source = package.root / rel
            info = zipfile.ZipInfo(rel, date_time=_ZIP_TIME)
            info.external_attr = (stat.S_IFREG | (source.stat().st_mode & 0o777)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(source, "rb") as handle, archive.open(info, "w") as out:
                while chunk := handle.read(1 << 20):
                    out.write(chunk)
    return destination


# --- tokens over plain http -------------------------------------------------------------------

def token_source(environ: dict[str, str] | None = None, home: Path | None = None) -> str | None:
    """Where the Ray client would find a token (as Ray looks), or None when it sends none."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE", "token").lower() != "token":
        return None
    if env.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH") and Path(env["RAY_AUTH_TOKEN_PATH"]).is_file():
        return env["RAY_AUTH_TOKEN_PATH"]
    default = (Path.home() if home is None else home) / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: not resolved here (resolving would contact a DNS server)


def plain_http_warning(address: str, token: str | None) -> str | None:
    """The one-line warning when a token would travel in clear text, else None. Contacts nothing."""
    if not token:
        return None
    url = address if "://" in address else f"http://{address}"  # Ray's default for a bare host:port
    parts = urlsplit(url)
    if parts.scheme.lower() != "http":
        return None
    host = parts.hostname or ""
    if is_loopback_host(host):
        return None
    return (f"warning: the Ray token ({token}) goes to {address} over plain http (readable on the network);"
            f" use https:// or a tunnel to 127.0.0.1")
