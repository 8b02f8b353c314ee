"""Ending a run now: the first Ctrl-C, or a fatal error inside Flower or Ray.

:func:`on_interrupt` installs the Ctrl-C handler; :func:`stop_now` kills the processes this run
started (Ray's, ``flwr run``'s) and exits without waiting for the threads Flower leaves behind,
which is what made a first Ctrl-C hang.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil


def say(text: str, *, run_log: Path | None = None, stream: int = 1) -> None:
    """Write a line without the logging machinery: safe inside a signal handler that interrupted a log call."""
    data = (text + "\n").encode("utf-8", errors="replace")
    try:
        os.write(stream, data)
    except OSError:
        pass
    if run_log is not None:
        try:
            with open(run_log, "ab") as fh:
                fh.write(b"[fedpeft] " + data)
        except OSError:
            pass


def kill_children_after_exit() -> None:
    """Have every process this one started (Ray's GCS, raylet and workers; ``flwr run``) SIGKILLed
    right after this process exits, by a forked reaper.

    Not before: a Ray driver whose raylet dies ends its own process at once with exit code 1, which
    would race the exit code of a Ctrl-C (130). The reaper holds this process's stdout open until
    its work is done, so whoever reads the output sees its end only once the children are gone.
    """
    try:
        pids = [child.pid for child in psutil.Process().children(recursive=True)]
    except psutil.Error:
        return
    if not pids:
        return
    parent = os.getpid()
    if os.fork() == 0:  # the reaper: only async-signal-safe calls from here on (the parent has threads)
        try:
            deadline = time.monotonic() + 10.0
            while os.getppid() == parent and time.monotonic() < deadline:
                time.sleep(0.01)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        finally:
            os._exit(0)


# Held by whoever is ending the process. Ctrl-C kills Ray, which makes the main thread (or one of
# Flower's) fail and call stop_now(1) too: that second caller waits here while the first exits.
_STOPPING = threading.RLock()


def stop_now(code: int) -> None:
    """End the process now: its child processes killed, its log files flushed, no thread waited for.

    The first caller wins: a later one (another thread) blocks until the process is gone, so the
    exit code and the last console lines are the first caller's.
    """
    _STOPPING.acquire()
    # Flower's threads would log the failures that losing Ray causes (actor unavailable, ...): silence them first
    logging.disable(logging.CRITICAL)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    kill_children_after_exit()
    os._exit(code)


def on_interrupt(message: Any) -> None:
    """Install a SIGINT handler: the first Ctrl-C prints ``message()`` and stops the run (exit 130)."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        _STOPPING.acquire()  # from now on a failing thread cannot exit with its own code first
        logging.disable(logging.CRITICAL)  # from here on the run's threads print nothing; these lines are the last
        for line, run_log in message():
            say(line, run_log=run_log)
        stop_now(130)

    signal.signal(signal.SIGINT, handler)
