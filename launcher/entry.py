"""The `meshyard` console script's entry point (pyproject's [project.scripts]).

It imports the command line inside `main`, so a Ctrl-C (or, for `launch`, a SIGTERM) that arrives
while Python is still importing it ends the command as launcher/cli.py documents (130, or 75 for a
preempted launch) with one line instead of a KeyboardInterrupt traceback: on a loaded machine those
imports take most of a second, a moment in which a user may well change their mind. This module
imports only the two standard-library-only modules it needs.
"""
from __future__ import annotations

import sys

from launcher.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
from launcher.interrupts import LAUNCH_SIGNALS, Preempted


def main() -> int:
    if sys.argv[1:2] == ["launch"]:
        LAUNCH_SIGNALS.install()  # SIGTERM = preemption from the first moment (`launch` installs it again)
    try:
        from launcher.cli import main as run_command
    except KeyboardInterrupt:
        print("interrupted before the command started: nothing ran", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Preempted as exc:
        print(exc, file=sys.stderr)
        return EXIT_PREEMPTED
    return run_command()
