"""Flower's deployment engine: the same apps as in simulation, on a SuperLink and real SuperNodes.

The ClientApp is ``clients.app:app`` in both engines; the ServerApp below runs the same
:func:`fedpeft.server.run_federated` as the simulation's, with the composed Hydra config arriving
in the run config (``fedpeft.protocol.FEDPEFT_CONFIG``, JSON) instead of a Python closure.

``python -m fedpeft.run +exp=<name> mode=deploy deploy.superlink=<host:port> deploy.root_certificates=<ca.crt>``
composes and checks the config, writes a one-file Flower App (``flwr-app/pyproject.toml``: the
components by reference plus that run config) and submits it with ``flwr run``. The SuperNodes
and the SuperLink import ``fedpeft``/``clients`` from their own installation
(``--disable-runtime-dependency-installation``), so nothing but the config travels.

The helpers for the security set-up (README, "Deploying on edge devices")::

    python -m fedpeft.deploy certs certs/ --host 127.0.0.1 --host superlink.example.org
    python -m fedpeft.deploy node-key keys/node0
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
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import Config, DeployConfig, from_json, to_json
from fedpeft.protocol import FEDPEFT_CONFIG, RUN_DIR

log = logging.getLogger("fedpeft")

server_app = ServerApp()

DONE, FAILED = "deploy-done.json", "deploy-error.txt"


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """The deployed ServerApp: the run's config and results folder come in the run config."""
    from fedpeft.server import run_federated

    cfg = from_json(str(context.run_config[FEDPEFT_CONFIG]))
    run_dir = Path(str(context.run_config[RUN_DIR]))
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
                'clientapp = "clients.app:app"',
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


def submit(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """Submit the run to ``cfg.deploy.superlink`` and wait for it; returns the metrics rows.

    The ServerApp writes into ``deploy.run_dir`` (default ``run_dir``) on the SuperLink's machine;
    when that is this machine, the rows are read back from it.
    """
    from fedpeft.results import read_metrics

    check_deploy_config(cfg)
    results_dir = Path(cfg.deploy.run_dir or run_dir).expanduser().resolve()
    app_dir = write_app(run_dir / "flwr-app", cfg, results_dir)
    flwr_home = run_dir / "flwr-home"
    write_connection(flwr_home, cfg.deploy)
    for stale in (DONE, FAILED):
        (results_dir / stale).unlink(missing_ok=True)
    flwr = Path(sys.executable).with_name("flwr")
    cmd = [str(flwr if flwr.exists() else "flwr"), "run", str(app_dir), "fedpeft", "--stream"]
    log.info("submitting to SuperLink %s: %s", cfg.deploy.superlink, " ".join(cmd))
    with open(run_dir / "flwr-run.log", "w") as out:
        proc = subprocess.Popen(cmd, env=flwr_env(flwr_home), stdout=out, stderr=subprocess.STDOUT)
        deadline, ended = time.monotonic() + cfg.deploy.timeout, None
        try:
            while not (results_dir / DONE).exists() and not (results_dir / FAILED).exists():
                code = proc.poll()
                if code is not None:  # `flwr run --stream` is done; the ServerApp's marker is its last act
                    if code != 0:
                        raise DeployError(f"flwr run failed (exit {code}): {tail(run_dir / 'flwr-run.log')}")
                    if not results_dir.exists():
                        log.info("the run was submitted; its results are written on the SuperLink's machine in %s", results_dir)
                        return []
                    ended = ended or time.monotonic()
                    if time.monotonic() - ended > 60:
                        raise DeployError(f"the run ended without finishing its rounds (see {run_dir / 'flwr-run.log'}): {tail(run_dir / 'flwr-run.log')}")
                if time.monotonic() > deadline:
                    raise DeployError(f"the deployed run did not finish within deploy.timeout={cfg.deploy.timeout} s")
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if (results_dir / FAILED).exists():
        raise DeployError(f"the deployed run failed: {(results_dir / FAILED).read_text().strip()}")
    return read_metrics(results_dir)


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
    from fedpeft import data as fdata

    data = fdata.prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=True)
    folders = []
    for k, part in enumerate(data.partitions):
        folder = Path(root) / f"node{k}-data"
        for i, row in enumerate(part):
            doc = folder / data.label_names[row["label"]] / f"{i:05d}.txt"
            doc.parent.mkdir(parents=True, exist_ok=True)
            doc.write_text(row["text"])
        folders.append(folder)
    return folders


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
    (``partition-id``, ``state-dir``, optionally ``data-path``, ``rank`` or ``tier``). Every process
    is started in its own session and killed with it on :meth:`close`, also when a run fails.
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
            supernode = [str(bin_dir / "flower-supernode"), "--superlink", self.address, "--port", str(free_port()), "--node-config", _node_config(node_config)]
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
    parts = sub.add_parser("partitions", help="write each client's partition of a run config as a node data folder")
    parts.add_argument("out", type=Path)
    parts.add_argument("overrides", nargs="*", help="config keys as for fedpeft.run, e.g. num_clients=2 data.max_samples=600")
    args = parser.parse_args(argv)
    if args.command == "partitions":
        from fedpeft.config import compose_config

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
