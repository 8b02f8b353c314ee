"""A federation on one machine: a SuperLink and SuperNodes as real processes on 127.0.0.1.

For tests, benchmarks and trying deployment without devices (:class:`LocalFederation`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedpeft.config.schema import DeployConfig
from fedpeft.engines.deploy.security import make_certificates, make_node_key
from fedpeft.engines.deploy.submit import DeployError, flwr_env, tail, write_connection


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
    as docs/deployment.md starts one, with ``python -m fedpeft.deploy supernode`` (a missing ``state-dir``
    is created first). Every process is started in its own session and killed with it on
    :meth:`close`, also when a run fails.
    """

    def __init__(
        self, workdir: Path, node_configs: list[dict[str, Any]], *, tls: bool = True, auth: bool = True
    ) -> None:
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
            proc = subprocess.Popen(
                cmd, env=flwr_env(self.flwr_home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[name] = proc
        return proc

    def start(self) -> LocalFederation:
        bin_dir = Path(sys.executable).parent
        superlink = [
            str(bin_dir / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.tls:
            certs = make_certificates(self.workdir / "certs", ["127.0.0.1", "localhost"])
            self.ca = certs["ca.crt"]
            superlink += [
                "--ssl-ca-certfile",
                str(certs["ca.crt"]),
                "--ssl-certfile",
                str(certs["server.pem"]),
                "--ssl-keyfile",
                str(certs["server.key"]),
            ]
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
            supernode = [
                sys.executable,
                "-m",
                "fedpeft.deploy",
                "supernode",
                "--superlink",
                self.address,
                "--port",
                str(free_port()),
                "--node-config",
                _node_config(node_config),
            ]
            supernode += ["--root-certificates", str(self.ca)] if self.tls else ["--insecure"]
            if self.auth:
                key, pub = make_node_key(self.workdir / "keys" / f"node{k}")
                register = [str(bin_dir / "flwr"), "supernode", "register", str(pub), "fedpeft"]
                done = subprocess.run(
                    register, env=flwr_env(self.flwr_home), capture_output=True, text=True, timeout=120
                )
                if done.returncode != 0:
                    raise DeployError(f"registering node {k} failed: {done.stdout[-800:]} {done.stderr[-800:]}")
                supernode += ["--auth-supernode-private-key", str(key)]
            self._start(f"supernode{k}", supernode)
        return self

    def config_overrides(self) -> dict[str, Any]:
        """The ``deploy.*`` settings that submit a run to this federation."""
        return {
            "superlink": self.address,
            "root_certificates": str(self.ca) if self.ca else None,
            "insecure": not self.tls,
        }

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

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.close()
