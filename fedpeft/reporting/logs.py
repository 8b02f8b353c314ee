"""Where a run's output goes: fedpeft's own lines to the console, everything to the run's ``run.log``.

Every library's log (Flower's DEBUG lines, Ray, alembic, transformers' warnings and progress bars,
Python warnings) goes to ``run.log`` only, from the driver (:func:`setup_logging`) and from every
Ray worker (:func:`worker_setup`, Ray's ``worker_process_setup_hook``); ``verbose=true`` puts it
back on the console.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import flwr.common.logger  # noqa: F401  (it adds its console handler on import: quiet_libraries removes it)
from transformers.utils import logging as hf_logging

RUN_LOG = "run.log"
FILE_FORMAT = "[%(asctime)s][%(processName)s %(process)d][%(name)s][%(levelname)s] - %(message)s"
# Read by :func:`worker_setup` in every Ray worker (workers inherit the driver's environment).
ENV_RUN_LOG, ENV_VERBOSE = "FEDPEFT_RUN_LOG", "FEDPEFT_VERBOSE"


class OnlyFedpeft(logging.Filter):
    """The console's filter when not verbose: fedpeft's own records only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "fedpeft" or record.name.startswith("fedpeft.")


class ConsoleHandler(logging.StreamHandler):
    """Progress to stdout, warnings and errors to stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


class ConsoleFormatter(logging.Formatter):
    """fedpeft's lines as they are; a warning or error says so."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        return text


def quiet_libraries(*, progress_bars: bool = False) -> None:
    """Send the libraries' own console output into the logging tree (and so into ``run.log``)."""
    logging.captureWarnings(True)  # FutureWarnings and the like become log records
    for name in ("flwr", "ray"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):  # Flower's coloured console handler, Ray's stderr handler
            logger.removeHandler(handler)
        logger.propagate = True
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if not progress_bars:
        hf_logging.disable_progress_bar()  # "Loading weights" bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def setup_logging(run_log: Path | None, *, verbose: bool) -> None:
    """Console: fedpeft's lines (everything when ``verbose``); ``run_log``: everything, from every process.

    Called again once the run directory is known (the first call, before the checks, has no file).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    console = ConsoleHandler()
    console.setFormatter(
        ConsoleFormatter() if not verbose else logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    )
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        console.addFilter(OnlyFedpeft())
    root.addHandler(console)
    logging.getLogger("fedpeft").setLevel(logging.DEBUG)
    if run_log is not None:
        file = logging.FileHandler(run_log, mode="a", encoding="utf-8")
        file.setFormatter(logging.Formatter(FILE_FORMAT))
        file.setLevel(logging.DEBUG)
        root.addHandler(file)
        os.environ[ENV_RUN_LOG] = str(run_log)
    os.environ[ENV_VERBOSE] = "1" if verbose else "0"
    quiet_libraries(progress_bars=verbose)  # verbose: the same records, shown on the console too


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook``: a worker's output goes to the run's ``run.log``.

    Its stdout and stderr (progress bars, warnings, tracebacks, Flower's and transformers' logs) are
    re-pointed at ``run.log`` at the file-descriptor level, so nothing of it reaches the console;
    with ``verbose=true`` the driver does not install this hook and Ray forwards them as usual.
    """
    path = os.environ.get(ENV_RUN_LOG)
    if not path or os.environ.get(ENV_VERBOSE) == "1":
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    quiet_libraries()
