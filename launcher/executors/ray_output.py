"""What a Ray launch prints: the ranks' own lines as a local launch prints them, Ray's output in a file.

Left alone (ray 2.60), Ray Train prints every rank-0 line twice (its print patch logs each print
again, on stderr), prefixes each with a coloured `(RayTrainWorker pid=N)`, and adds its own
chatter (worker-group start, every `ray.train.report`, state-API warnings from its placement-group
cleaner when the dashboard is off, C++ core-worker logs). Instead:

- each rank's stdout and stderr go to `<run>/logs/console/rank<R>.{stdout,stderr}` while it trains
  (`rank_console`, on the worker), and the launcher copies whole lines from them to its own stdout
  and stderr, unchanged (`ConsoleRelay`): no prefix, no colour, no deduplication, each line once;
- Ray's print patch is off (`WORKER_ENV`), and Ray's own log records below WARNING stay out of a
  rank's console files (`QuietRay`; they remain in Ray's session logs, `logs/train/` there);
- everything Ray itself prints, the driver's `ray` logger and the output Ray relays from its
  processes (controller, helpers, what a worker writes to its file descriptors directly), goes to
  `<run>/logs/ray.log` (`RayLog`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

# Read from the driver's environment and propagated by Ray Train to its controller and workers.
# With the patch on, a worker's print is also logged through the root logger onto (redirected) stderr.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
RAY_PRINTER = "ray_print_logs"  # the name under which ray.init registers its printer of relayed output
OUR_PRINTER = "meshyard_ray_log"
RAY_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"  # Ray's own, for its records


@contextlib.contextmanager
def rank_console(directory: Path, rank: int) -> Iterator[None]:
    """Send this process's sys.stdout and sys.stderr to `directory/rank<R>.{stdout,stderr}` for the
    block (a rank under Ray), line-buffered so the launcher's relay sees each line as it is printed.
    Appends: a restarted worker group continues the same files."""
    directory.mkdir(parents=True, exist_ok=True)
    with (open(directory / f"rank{rank}.stdout", "a", buffering=1, encoding="utf-8") as out,
          open(directory / f"rank{rank}.stderr", "a", buffering=1, encoding="utf-8") as err,
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), QuietRay()):
        yield


class QuietRay(logging.Filter):
    """Keeps Ray's own log records below WARNING off the console handlers of this process while
    installed: Ray's handlers write to whatever sys.stderr is at the time, which under `rank_console`
    is the rank's console file. Ray's file handlers still get them. A record is Ray's by where it was
    made, as Ray names some loggers by file path (`Reporting training result ...`, one per report)."""

    def __init__(self) -> None:
        super().__init__()
        import ray

        self.package = os.path.dirname(ray.__file__) + os.sep
        self._handlers: list[logging.Handler] = []

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.package)

    def __enter__(self) -> QuietRay:
        loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                          if isinstance(logger, logging.Logger))]
        self._handlers = [handler for logger in loggers for handler in logger.handlers if _is_console(handler)]
        for handler in self._handlers:
            handler.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for handler in self._handlers:
            handler.removeFilter(self)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


class ConsoleRelay:
    """Copies the ranks' console files (`<run>/logs/console/`) to this process's stdout and stderr as
    they grow: whole lines while they run, the rest once they are done (on exit)."""

    def __init__(self, directory: Path, interval_s: float = 0.1) -> None:
        self.directory = directory
        self.interval_s = interval_s
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="meshyard-console-relay", daemon=True)

    def __enter__(self) -> ConsoleRelay:
        shutil.rmtree(self.directory, ignore_errors=True)  # this launch's lines only
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.copy(final=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.copy(final=False)

    def copy(self, final: bool) -> None:
        for path in sorted(self.directory.glob("rank*.*")):
            sink = sys.stderr if path.suffix == ".stderr" else sys.stdout
            with open(path, "rb") as file:
                file.seek(self._offsets.get(path, 0))
                data = file.read()
            self._offsets[path] = self._offsets.get(path, 0) + len(data)
            text = self._partial.pop(path, b"") + data
            if not final:  # a line still being written waits for its end
                cut = text.rfind(b"\n") + 1
                text, self._partial[path] = text[:cut], text[cut:]
            if text:
                sink.write(text.decode("utf-8", errors="replace"))
                sink.flush()


class RayLog:
    """Ray's own output into one file: the driver's `ray` logger from entry, and (after ray.init,
    `capture_relayed`) the output Ray relays from its processes, which ray.init would print with
    coloured prefixes. Both are handed back on exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None
        self._handler: logging.Handler | None = None
        self._logger = logging.getLogger("ray")
        self._handlers: list[logging.Handler] = []
        self._ray_printer: tuple[str, Callable[[dict[str, Any]], None]] | None = None

    def __enter__(self) -> RayLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        self._handlers = list(self._logger.handlers)
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter(RAY_FORMAT))
        self._logger.handlers = [self._handler]  # ray.init(configure_logging=True) keeps these, restyled
        return self

    def capture_relayed(self) -> None:
        """After ray.init: its printer of relayed output steps aside for ours."""
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        self._ray_printer = next((pair for pair in dispatcher.handlers if pair[0] == RAY_PRINTER), None)
        dispatcher.remove_handler(RAY_PRINTER)
        dispatcher.add_handler(OUR_PRINTER, self.write_batch)

    def write_batch(self, batch: dict[str, Any]) -> None:
        """One batch of lines Ray relayed from a process, as Ray would print it, without colour
        (from Ray's log thread: under the logger's lock, so lines never interleave)."""
        source = f"{batch.get('actor_name') or batch.get('task_name') or ''} pid={batch.get('pid')}".strip()
        if batch.get("ip") and batch.get("ip") != batch.get("localhost"):
            source += f", ip={batch['ip']}"
        stream = "stderr" if batch.get("is_err") else "stdout"
        if self._file is not None and self._handler is not None:
            with self._handler.lock or contextlib.nullcontext():
                self._file.writelines(f"({source}) [{stream}] {line}\n" for line in batch.get("lines", []))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        import ray
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler(OUR_PRINTER)
        if self._ray_printer is not None and ray.is_initialized():  # a Ray this launch joined and leaves running
            dispatcher.add_handler(*self._ray_printer)
        self._logger.handlers = self._handlers
        if self._file is not None:
            self._file.close()
            self._file, self._handler = None, None
