"""The README is a front door that stays true: short, its links resolve, its commands exist with the
flags it prints, and the quick ones run as printed."""
from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import MESHYARD, REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
TABLE_COMMAND = re.compile(r"^\| `(meshyard [^`]+)` \|", re.MULTILINE)


def test_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    targets = [t for t in LINK.findall(page.read_text()) if "://" not in t]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.name}: {missing}"


def _commands_table() -> list[str]:
    return [c.replace("\\|", "|") for c in TABLE_COMMAND.findall(README.read_text())]


def test_every_command_in_the_table_exists_with_the_flags_it_shows():
    commands = _commands_table()
    assert len(commands) >= 10
    for command in commands:
        words = command.split()
        sub = words[1]
        shown = set(re.findall(r"--[a-z][a-z-]*", command))
        result = subprocess.run([MESHYARD, sub, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)
        assert not shown - set(re.findall(r"--[a-z][a-z-]*", result.stdout)), (command, shown)


@pytest.mark.parametrize("command", [
    "meshyard validate examples/quickstart.yaml",
    "meshyard plan examples/quickstart.yaml --set optimizer.lr=0.01",
    "meshyard render slurm examples/quickstart.yaml",
    "meshyard schema",
])
def test_quick_readme_commands_run_as_printed(command):
    assert command.split()[1] in {c.split()[1] for c in _commands_table()}
    result = subprocess.run([MESHYARD, *command.split()[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
