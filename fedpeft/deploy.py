"""Flower's deployment engine: the same apps as in simulation, on a SuperLink and real SuperNodes.

The ClientApp is ``fedpeft.clients.app:app`` in both engines; the ServerApp below runs the same
:func:`fedpeft.server.loop.run_federated` as the simulation's, with the composed Hydra config arriving
in the run config (``fedpeft.protocol.wire.FEDPEFT_CONFIG``, JSON) instead of a Python closure.

``python -m fedpeft.run +exp=<name> mode=deploy deploy.superlink=<host:port> deploy.root_certificates=<ca.crt>``
composes and checks the config, writes a one-file Flower App (``flwr-app/pyproject.toml``: the
components by reference plus that run config) and submits it with ``flwr run``. The SuperNodes
and the SuperLink import ``fedpeft``/``clients`` from their own installation
(``--disable-runtime-dependency-installation``), so nothing but the config travels.

While the run goes on, the submitting console prints what a simulated run prints — between
``fedpeft.run``'s header and summary, the node status table of the handshake and one line per
round — by following the run's ``nodes.json`` and ``metrics.jsonl`` (when the results directory
is on this machine); ``Ctrl-C`` there stops the run on the SuperLink too (``flwr stop``).

The helpers for the security set-up and the nodes (README, "Deploying on edge devices")::

    python -m fedpeft.deploy certs certs/ --host 127.0.0.1 --host superlink.example.org
    python -m fedpeft.deploy node-key keys/node0
    python -m fedpeft.deploy supernode --superlink HOST:PORT --node-config "partition-id=0 ..." [flower-supernode options]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.config import parse_config_args
from flwr.serverapp import Grid, ServerApp

from fedpeft.reporting import status
from fedpeft.config.schema import Config, DeployConfig, from_json, to_json
from fedpeft.reporting.lines import round_line
from fedpeft.protocol.wire import FEDPEFT_CONFIG, RUN_DIR
from fedpeft.reporting.metrics import read_metrics

log = logging.getLogger("fedpeft")

server_app = ServerApp()

DONE, FAILED = "deploy-done.json", "deploy-error.txt"


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """The deployed ServerApp: the run's config and results folder come in the run config."""
    from fedpeft.server.loop import run_federated

    cfg = from_json(str(context.run_config[FEDPEFT_CONFIG]))
    run_dir = Path(str(context.run_config[RUN_DIR]))
    if not log.handlers:  # fedpeft's lines into the ServerApp's output: `flwr log <run id>` shows the rounds too
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s][fedpeft] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        rows = run_federated(cfg, grid, run_dir)
    except BaseException as err:
        (run_dir / FAILED).write_text(f"{type(err).__name__}: {err}\n")
        raise
    (run_dir / DONE).write_text(json.dumps({"rounds": len(rows), "seconds": time.perf_counter() - started}))


# ------------------------------------------------------------------------------ submitting
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
                'serverapp = "fedpeft.deploy:server_app"',
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
            raise ValueError("mode=deploy uses TLS: set deploy.root_certificates=<CA certificate> (or deploy.insecure=true on a trusted network)")
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
                eta = elapsed / len(self.rows) * max(self.num_rounds - row["round"], 0)  # as a simulated run's MetricsWriter
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
        proc = subprocess.Popen(cmd, env=flwr_env(flwr_home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
                raise DeployError(f"the run ended without finishing its rounds (see {run_dir / 'flwr-run.log'}): {tail(run_dir / 'flwr-run.log')}")
        if time.monotonic() > deadline:
            raise DeployError(f"the deployed run did not finish within deploy.timeout={cfg.deploy.timeout} s")
        time.sleep(0.5)


def stop_submitted(run_dir: Path, *, timeout: float = 30.0) -> str:
    """Stop the run this machine submitted from ``run_dir`` (Ctrl-C while waiting); says what happened.

    ``flwr run`` printed the run id into ``flwr-run.log``; ``flwr stop`` asks the SuperLink to end it.
    """
    import re

    found = re.search(r"Successfully started run (\d+)", (run_dir / "flwr-run.log").read_text(errors="replace")) if (run_dir / "flwr-run.log").exists() else None
    if found is None:
        return "no run had been started on the SuperLink"
    run_id = found.group(1)
    flwr = Path(sys.executable).with_name("flwr")
    cmd = [str(flwr if flwr.exists() else "flwr"), "stop", run_id, "fedpeft"]
    try:
        done = subprocess.run(cmd, env=flwr_env(run_dir / "flwr-home"), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        done = None
        reason = str(err)
    else:
        reason = (done.stdout + done.stderr).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        reason = reason[0]
    if done is not None and done.returncode == 0:
        return f"the deployed run {run_id} was stopped on the SuperLink"
    return f"could not stop the deployed run {run_id} ({reason}); stop it with: FLWR_HOME={run_dir / 'flwr-home'} flwr stop {run_id} fedpeft"


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------ certificates and keys
def make_certificates(out: Path, hosts: list[str], *, days: int = 365) -> dict[str, Path]:
    """A CA, and a SuperLink certificate it signs for ``hosts`` (names or IPs); PEM files in ``out``.

    ``ca.crt`` goes to every SuperNode and to whoever submits runs (``--root-certificates``,
    ``deploy.root_certificates``); ``server.pem``/``server.key``/``ca.crt`` to the SuperLink.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    pem_key = serialization.PrivateFormat.PKCS8
    files = {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca.key": ca_key.private_bytes(serialization.Encoding.PEM, pem_key, serialization.NoEncryption()),
        "server.pem": cert.public_bytes(serialization.Encoding.PEM),
        "server.key": key.private_bytes(serialization.Encoding.PEM, pem_key, serialization.NoEncryption()),
    }
    paths = {}
    for name, data in files.items():
        path = out / name
        path.write_bytes(data)
        if name.endswith(".key"):
            path.chmod(0o600)
        paths[name] = path
    return paths


def make_node_key(path: Path) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair: ``path`` (private, OpenSSH) and ``path.pub`` (to register)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    path.chmod(0o600)
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return path, pub


# ------------------------------------------------------------------------------ demo data for nodes
def export_partitions(cfg: Config, root: Path) -> list[Path]:
    """Write each client's training partition of ``cfg``'s data as a ``<label>/<i>.txt`` folder.

    To demo deployment with real node-local data: node k is started with
    ``data-path='<root>/node<k>-data'`` and trains on exactly what partition k would hold.
    """
    from fedpeft.data.partition import prepare

    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=True)
    folders = []
    for k, part in enumerate(data.partitions):
        folder = Path(root) / f"node{k}-data"
        for i, row in enumerate(part):
            doc = folder / data.label_names[row["label"]] / f"{i:05d}.txt"
            doc.parent.mkdir(parents=True, exist_ok=True)
            doc.write_text(row["text"])
        folders.append(folder)
    return folders


# ------------------------------------------------------------------------------ starting a SuperNode
class NodeConfigError(ValueError):
    """A SuperNode's node config names something the node cannot use; the message is one line."""


def check_node_config(node_config: dict[str, Any]) -> None:
    """What a node needs before it may start: a ``partition-id``, a readable ``data-path`` (if it has
    one), a ``state-dir`` that exists and is writable, a positive ``rank`` (if it has one)."""
    pid = node_config.get("partition-id")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
        raise NodeConfigError(f"partition-id must be an integer >= 0, got {pid!r}" if pid is not None else "no partition-id (the node's index, 0 ... num_clients-1)")
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"])).expanduser()
        if not path.exists():
            raise NodeConfigError(f"data-path {str(path)!r} does not exist")
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise NodeConfigError(f"data-path {str(path)!r} is not readable by this user")
        if path.is_dir() and not any(path.iterdir()):
            raise NodeConfigError(f"data-path {str(path)!r} is an empty folder (expected <label>/<doc>.txt files)")
    if "state-dir" not in node_config:
        raise NodeConfigError("no state-dir (the node's disk state: base updates of a rule that moves the base, kept tensors, the DP ledger, its data cache)")
    state = Path(str(node_config["state-dir"])).expanduser()
    if not state.is_dir():
        raise NodeConfigError(f"state-dir {str(state)!r} does not exist (create it: mkdir -p {state})" if not state.exists() else f"state-dir {str(state)!r} is not a folder")
    if not os.access(state, os.R_OK | os.W_OK | os.X_OK):
        raise NodeConfigError(f"state-dir {str(state)!r} is not readable and writable by this user")
    if "rank" in node_config and (not isinstance(node_config["rank"], int) or node_config["rank"] < 1):
        raise NodeConfigError(f"rank must be an integer >= 1, got {node_config['rank']!r}")


def supernode_command(argv: list[str]) -> list[str]:
    """Check a ``flower-supernode`` command line's node config and files; returns the command to run.

    ``argv`` are ``flower-supernode``'s own arguments; ``--node-config`` is read as Flower reads it.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--node-config")
    parser.add_argument("--root-certificates")
    parser.add_argument("--auth-supernode-private-key")
    known, _ = parser.parse_known_args(argv)
    if not known.node_config:
        raise NodeConfigError('no --node-config "partition-id=<k> state-dir=\'<folder>\' [data-path=\'<folder or file>\'] [rank=<r>]"')
    try:
        node_config = parse_config_args([known.node_config])
    except ValueError as err:
        raise NodeConfigError(f"--node-config cannot be read: {err}") from None
    check_node_config(node_config)
    for flag, value in (("--root-certificates", known.root_certificates), ("--auth-supernode-private-key", known.auth_supernode_private_key)):
        if value and not os.access(Path(value).expanduser(), os.R_OK):
            raise NodeConfigError(f"{flag} {value!r}: no such readable file")
    supernode = Path(sys.executable).with_name("flower-supernode")
    return [str(supernode if supernode.exists() else "flower-supernode"), *argv]


# ------------------------------------------------------------------------------ a federation on one machine
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, *, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"process exited ({proc.returncode}) before listening on {port}: {tail(log_path)}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise DeployError(f"nothing listens on port {port} after {timeout:.0f} s: {tail(log_path)}")


def _node_config(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in values.items())


class LocalFederation:
    """A SuperLink and SuperNodes as real processes on 127.0.0.1, with TLS and SuperNode authentication.

    For tests, benchmarks and trying deployment on one machine; each node gets ``node_configs[k]``
    (``partition-id``, ``state-dir``, optionally ``data-path``, ``rank`` or ``tier``) and is started
    as the README starts one, with ``python -m fedpeft.deploy supernode`` (a missing ``state-dir``
    is created first). Every process is started in its own session and killed with it on
    :meth:`close`, also when a run fails.
    """

    def __init__(self, workdir: Path, node_configs: list[dict[str, Any]], *, tls: bool = True, auth: bool = True) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.node_configs = node_configs
        self.tls, self.auth = tls, auth
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.ca: Path | None = None
        self.flwr_home = self.workdir / "flwr-home"

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, env=flwr_env(self.flwr_home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start(self) -> "LocalFederation":
        bin_dir = Path(sys.executable).parent
        superlink = [str(bin_dir / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.tls:
            certs = make_certificates(self.workdir / "certs", ["127.0.0.1", "localhost"])
            self.ca = certs["ca.crt"]
            superlink += ["--ssl-ca-certfile", str(certs["ca.crt"]), "--ssl-certfile", str(certs["server.pem"]), "--ssl-keyfile", str(certs["server.key"])]
        else:
            superlink.append("--insecure")
        if self.auth:
            superlink.append("--enable-supernode-auth")
        self._start("superlink", superlink)
        wait_for_port(self.port, proc=self.procs["superlink"], log_path=self.workdir / "superlink.log")
        write_connection(self.flwr_home, DeployConfig(**self.config_overrides()))
        for k, node_config in enumerate(self.node_configs):
            if "state-dir" in node_config:
                Path(str(node_config["state-dir"])).mkdir(parents=True, exist_ok=True)
            supernode = [sys.executable, "-m", "fedpeft.deploy", "supernode", "--superlink", self.address, "--port", str(free_port()), "--node-config", _node_config(node_config)]
            supernode += ["--root-certificates", str(self.ca)] if self.tls else ["--insecure"]
            if self.auth:
                key, pub = make_node_key(self.workdir / "keys" / f"node{k}")
                register = [str(bin_dir / "flwr"), "supernode", "register", str(pub), "fedpeft"]
                done = subprocess.run(register, env=flwr_env(self.flwr_home), capture_output=True, text=True, timeout=120)
                if done.returncode != 0:
                    raise DeployError(f"registering node {k} failed: {done.stdout[-800:]} {done.stderr[-800:]}")
                supernode += ["--auth-supernode-private-key", str(key)]
            self._start(f"supernode{k}", supernode)
        return self

    def config_overrides(self) -> dict[str, Any]:
        """The ``deploy.*`` settings that submit a run to this federation."""
        return {"superlink": self.address, "root_certificates": str(self.ca) if self.ca else None, "insecure": not self.tls}

    def kill(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)

    def close(self) -> None:
        for name in reversed(list(self.procs)):
            self.kill(name)

    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.close()


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedpeft.deploy", description="TLS certificates and SuperNode keys for a deployment.")
    sub = parser.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="a CA and a SuperLink certificate for the given hosts")
    certs.add_argument("out", type=Path)
    certs.add_argument("--host", action="append", required=True, help="a name or IP the SuperLink is reached at (repeat)")
    certs.add_argument("--days", type=int, default=365)
    node = sub.add_parser("node-key", help="a SuperNode authentication key pair (PATH and PATH.pub)")
    node.add_argument("path", type=Path)
    sub.add_parser(
        "supernode",
        help="check a node config (partition-id, data-path, state-dir, rank), then start flower-supernode with these arguments",
        add_help=False,
    )
    parts = sub.add_parser("partitions", help="write each client's partition of a run config as a node data folder")
    parts.add_argument("out", type=Path)
    parts.add_argument("overrides", nargs="*", help="config keys as for fedpeft.run, e.g. num_clients=2 data.max_samples=600")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["supernode"]:  # every other argument is flower-supernode's own
        try:
            cmd = supernode_command(argv[1:])
        except NodeConfigError as err:
            print(f"fedpeft.deploy supernode: refusing to start: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        os.execvp(cmd[0], cmd)  # becomes flower-supernode: same process id, signals and exit code
    args = parser.parse_args(argv)
    if args.command == "partitions":
        from fedpeft.cli.configs import compose_config

        for path in export_partitions(compose_config(args.overrides), args.out):
            print(path)
    elif args.command == "certs":
        for name, path in make_certificates(args.out, args.host, days=args.days).items():
            print(f"{name}: {path}")
    else:
        for path in make_node_key(args.path):
            print(path)


if __name__ == "__main__":
    cli()
