"""SIGTERM and SIGINT at any moment of a launch, in the launcher and in the ranks.

The contract (launcher/cli.py): SIGTERM = preemption, exit 75 and the same command resumes; SIGINT
(Ctrl-C) = stop everything, exit 130. Signals arrive at any moment, so both sides install their
handlers before anything heavy is imported (this module imports only the standard library):

- The launcher (`LaunchSignals`): until the job's processes exist, SIGTERM raises `Preempted` and
  SIGINT `KeyboardInterrupt`, and nothing is started. The launcher also checks the flags before it
  starts them (`raise_if_signalled`), so a signal swallowed by some library's bare `except:` during
  imports is still obeyed. Once the processes exist, SIGTERM is remembered and handed to the
  executor's `relay` (at once, and again at each poll for ranks that start later): it goes to every
  rank that has installed its flag, and whatever way the job then ends, the launch ends as preempted.
- Each rank (`PreemptionFlag`): SIGTERM sets a flag the loop reads at its next step boundary, where
  the rank checkpoints and exits 0.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any


class Preempted(Exception):
    """SIGTERM reached the launcher before the job's processes existed: nothing was started."""

    def __str__(self) -> str:
        return "preempted before the job started: nothing ran; run the same command to start it"


class PreemptionFlag:
    """A rank's SIGTERM: set here, read by the loop at its next step boundary."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> PreemptionFlag:
        """Only the main thread may set signal handlers: under Ray Train the loop runs in another
        thread, and Ray itself owns the worker's signals (preemption there is Ray's business)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


class LaunchSignals:
    """The launcher's SIGTERM/SIGINT state, from the launch's first line to its last."""

    def __init__(self) -> None:
        self.terminated = False  # SIGTERM seen
        self.interrupted = False  # SIGINT seen
        self.relay: Callable[[], None] | None = None  # the job's processes exist: SIGTERM goes to them
        self._report_unraisable = sys.unraisablehook

    def install(self) -> LaunchSignals:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigint)
        if sys.unraisablehook != self._unraisable:
            self._report_unraisable = sys.unraisablehook
            sys.unraisablehook = self._unraisable
        return self

    def raise_if_signalled(self) -> None:
        """Before committing to start processes: a signal some library swallowed is obeyed here."""
        if self.interrupted:
            raise KeyboardInterrupt
        if self.terminated and self.relay is None:
            raise Preempted

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.terminated = True
        if self.relay is None:
            raise Preempted
        self.relay()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    def _unraisable(self, unraisable: Any) -> None:
        """The handlers raise wherever the main thread is, a finalizer (a __del__, a weakref callback)
        included, where Python cannot propagate the exception: it prints `Exception ignored in ...`
        with a traceback and goes on. The flags keep the signal and the launch obeys it at its next
        check (raise_if_signalled, also at each poll while the job runs), so that print is only noise."""
        if not isinstance(unraisable.exc_value, (KeyboardInterrupt, Preempted)):
            self._report_unraisable(unraisable)


LAUNCH_SIGNALS = LaunchSignals()  # the launcher process's one instance (installed by `meshyard launch`)
