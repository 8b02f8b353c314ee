"""Submitting a run to a SuperLink: a one-file Flower App, ``flwr run``, and the run's progress on this console.

``python -m fedpeft.run +exp=<name> mode=deploy deploy.superlink=<host:port> deploy.root_certificates=<ca.crt>``
composes and checks the config, writes a one-file Flower App (``flwr-app/pyproject.toml``: the
components by reference plus that run config) and submits it with ``flwr run``. The SuperNodes
and the SuperLink import ``fedpeft`` from their own installation
(``--disable-runtime-dependency-installation``), so nothing but the config travels.

While the run goes on, the submitting console prints what a simulated run prints — between
``fedpeft.run``'s header and summary, the node status table of the handshake and one line per
round — by following the run's ``nodes.json`` and ``metrics.jsonl`` (when the results directory
is on this machine); ``Ctrl-C`` there stops the run on the SuperLink too (``flwr stop``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedpeft.config.schema import Config, DeployConfig, to_json
from fedpeft.engines.deploy.serverapp import DONE, FAILED
from fedpeft.protocol.wire import FEDPEFT_CONFIG, RUN_DIR
from fedpeft.reporting import status
from fedpeft.reporting.lines import round_line
from fedpeft.reporting.metrics import read_metrics

log = logging.getLogger("fedpeft")


class DeployError(RuntimeError):
    """The deployed run could not be submitted or did not finish."""


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_app(app_dir: Path, cfg: Config, run_dir: Path) -> Path:
    """A Flower App of one file: the components by reference and the run's config."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        "\n".join(
            [
                "[build-system]",
                'requires = ["hatchling"]',
                'build-backend = "hatchling.build"',
                "",
                "[project]",
                'name = "fedpeft-run"',
                'version = "1.0.0"',
                'description = "A fedpeft run; the code comes from the fedpeft installed on each machine."',
                'license = "Apache-2.0"',
                "dependencies = []",
                "",
                "[tool.flwr.app]",
                'publisher = "fedpeft"',
                "",
                "[tool.flwr.app.components]",
                'serverapp = "fedpeft.engines.deploy.serverapp:server_app"',
                'clientapp = "fedpeft.clients.app:app"',
                "",
                "[tool.flwr.app.config]",
                f"{FEDPEFT_CONFIG} = {_toml_str(to_json(cfg))}",
                f"{RUN_DIR} = {_toml_str(str(run_dir))}",
                "",
            ]
        )
    )
    return app_dir


def write_connection(flwr_home: Path, dep: DeployConfig) -> None:
    """A Flower CLI configuration (``FLWR_HOME``) naming one SuperLink connection, ``fedpeft``."""
    lines = ["[superlink]", 'default = "fedpeft"', "", "[superlink.fedpeft]", f"address = {_toml_str(dep.superlink)}"]
    if dep.insecure:
        lines.append("insecure = true")
    elif dep.root_certificates:
        lines.append(f"root-certificates = {_toml_str(str(Path(dep.root_certificates).expanduser().resolve()))}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def check_deploy_config(cfg: Config) -> None:
    dep = cfg.deploy
    host, _, port = dep.superlink.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"deploy.superlink must be host:port, got {dep.superlink!r}")
    if not dep.insecure:
        if not dep.root_certificates:
            raise ValueError(
                "mode=deploy uses TLS: set deploy.root_certificates=<CA certificate> (or deploy.insecure=true on a "
                "trusted network)"
            )
        if not Path(dep.root_certificates).expanduser().is_file():
            raise ValueError(f"deploy.root_certificates: no such file {dep.root_certificates!r}")


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower's command-line tools: this interpreter's bin first (``flower-superexec`` ...)."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, FLWR_HOME=str(flwr_home), PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))


class Progress:
    """The submitting console of a deployed run: follows ``nodes.json`` and ``metrics.jsonl`` in the
    results directory and logs the node table and each round's line as they appear."""

    def __init__(self, results_dir: Path, *, num_rounds: int) -> None:
        self.results_dir = results_dir
        self.num_rounds = num_rounds
        self.started = time.perf_counter()  # restarted at the handshake, as a simulated run's clock is
        self.nodes_shown = False
        self.offset = 0
        self.rows: list[dict[str, Any]] = []

    def poll(self) -> None:
        nodes = self.results_dir / status.NODES_JSON
        if not self.nodes_shown and nodes.exists():
            try:
                shown = json.loads(nodes.read_text())
            except ValueError:  # caught mid-write: next poll
                return
            self.nodes_shown, self.started = True, time.perf_counter()
            log.info("%s", status.node_status_text(shown["nodes"], shown["label_names"]))
        metrics = self.results_dir / "metrics.jsonl"
        if not metrics.exists():
            return
        with metrics.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line is read once its newline is written
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            if line.strip():
                row = json.loads(line)
                self.rows.append(row)
                elapsed = time.perf_counter() - self.started
                eta = (
                    elapsed / len(self.rows) * max(self.num_rounds - row["round"], 0)
                )  # as a simulated run's MetricsWriter
                log.info("%s", round_line(row, num_rounds=self.num_rounds, elapsed=elapsed, eta=eta))


def flwr_bin() -> Path | str:
    flwr = Path(sys.executable).with_name("flwr")
    return flwr if flwr.exists() else "flwr"


def submit(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """Submit the run to ``cfg.deploy.superlink``, print its progress and wait for it; returns the metrics rows.

    The ServerApp writes into ``deploy.run_dir`` (default ``run_dir``) on the SuperLink's machine;
    when that is this machine, the progress and the rows are read from it. (``Ctrl-C`` during the
    wait: ``fedpeft.run`` stops the run on the SuperLink with :func:`stop_submitted`.)
    """
    check_deploy_config(cfg)
    results_dir = Path(cfg.deploy.run_dir or run_dir).expanduser().resolve()
    app_dir = write_app(run_dir / "flwr-app", cfg, results_dir)
    flwr_home = run_dir / "flwr-home"
    write_connection(flwr_home, cfg.deploy)
    for stale in (DONE, FAILED, status.NODES_JSON, "metrics.jsonl"):  # the progress follows fresh files only
        (results_dir / stale).unlink(missing_ok=True)
    cmd = [str(flwr_bin()), "run", str(app_dir), "fedpeft", "--stream"]
    log.debug("submitting: %s", " ".join(cmd))
    progress = Progress(results_dir, num_rounds=cfg.num_rounds)
    with open(run_dir / "flwr-run.log", "w") as out:
        # Its own session: a Ctrl-C at the terminal reaches this process only; fedpeft.run's handler
        # then stops the run on the SuperLink (stop_submitted)
        proc = subprocess.Popen(
            cmd, env=flwr_env(flwr_home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_for_run(cfg, proc, run_dir, results_dir, progress)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if not results_dir.exists():
        log.info("the run was submitted; its results are written on the SuperLink's machine in %s", results_dir)
        return []
    progress.poll()
    if (results_dir / FAILED).exists():
        raise DeployError(f"the deployed run failed: {(results_dir / FAILED).read_text().strip()}")
    return read_metrics(results_dir)


def wait_for_run(cfg: Config, proc: subprocess.Popen, run_dir: Path, results_dir: Path, progress: Progress) -> None:
    """Until the ServerApp leaves its done or failed marker (or ``flwr run`` fails), printing progress."""
    deadline, ended = time.monotonic() + cfg.deploy.timeout, None
    while not (results_dir / DONE).exists() and not (results_dir / FAILED).exists():
        progress.poll()
        code = proc.poll()
        if code is not None:  # `flwr run --stream` is done; the ServerApp's marker is its last act
            if code != 0:
                raise DeployError(f"flwr run failed (exit {code}): {tail(run_dir / 'flwr-run.log')}")
            if not results_dir.exists():
                return
            ended = ended or time.monotonic()
            if time.monotonic() - ended > 60:
                raise DeployError(
                    f"the run ended without finishing its rounds (see {run_dir / 'flwr-run.log'}): "
                    f"{tail(run_dir / 'flwr-run.log')}"
                )
        if time.monotonic() > deadline:
            raise DeployError(f"the deployed run did not finish within deploy.timeout={cfg.deploy.timeout} s")
        time.sleep(0.5)


def stop_submitted(run_dir: Path, *, timeout: float = 30.0) -> str:
    """Stop the run this machine submitted from ``run_dir`` (Ctrl-C while waiting); says what happened.

    ``flwr run`` printed the run id into ``flwr-run.log``; ``flwr stop`` asks the SuperLink to end it.
    """
    found = (
        re.search(r"Successfully started run (\d+)", (run_dir / "flwr-run.log").read_text(errors="replace"))
        if (run_dir / "flwr-run.log").exists()
        else None
    )
    if found is None:
        return "no run had been started on the SuperLink"
    run_id = found.group(1)
    flwr = Path(sys.executable).with_name("flwr")
    cmd = [str(flwr if flwr.exists() else "flwr"), "stop", run_id, "fedpeft"]
    try:
        done = subprocess.run(cmd, env=flwr_env(run_dir / "flwr-home"), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        stopped, reason = False, str(err)
    else:
        stopped = done.returncode == 0
        reason = ((done.stdout + done.stderr).strip().splitlines()[-1:] or [f"exit {done.returncode}"])[0]
    if stopped:
        return f"the deployed run {run_id} was stopped on the SuperLink"
    return (
        f"could not stop the deployed run {run_id} ({reason}); "
        f"stop it with: FLWR_HOME={run_dir / 'flwr-home'} flwr stop {run_id} fedpeft"
    )


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
