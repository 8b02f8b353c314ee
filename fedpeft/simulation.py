"""Run the fedpeft apps on Flower's simulation engine (Ray): many clients on one machine.

The ClientApp is passed by reference (``clients.app.app``, an importable module). Defining it in
``__main__`` would make Ray pickle it by value and lose the per-process model cache.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import ENGINES, Config

log = logging.getLogger("fedpeft")


def check_engine(cfg: Config) -> None:
    """The engine settings, checked before anything starts."""
    if cfg.engine.name not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {cfg.engine.name!r}")
    if cfg.engine.clients_per_pass < 1:
        raise ValueError(f"engine.clients_per_pass must be >= 1, got {cfg.engine.clients_per_pass}")
    if cfg.engine.name == "batched":
        try:
            from fedpeft.batched_engine import check_batched  # imports the ClientApp's modules: only when chosen
        except ImportError as err:
            raise ValueError(f"engine=batched needs the client's decode/train/encode steps (clients.job), which this checkout lacks: {err}") from err
        check_batched(cfg)


def ray_address(cfg: Config) -> str | None:
    """The running cluster to join: ``ray.address``, else ``RAY_ADDRESS``; None starts a private one."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def check_ray_address(address: str, *, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at a ``host:port`` cluster address (Ray would retry for a minute)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", "ray://..." and other forms Ray resolves itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as err:
        raise ValueError(
            f"ray.address={address!r}: no Ray cluster answers there ({err}); start one with "
            f"`ray start --head --port {port}`, or leave ray.address unset for a private cluster"
        ) from err


def backend_config(cfg: Config) -> dict[str, Any]:
    """Ray resources per client (``client.num_cpus``, a fraction ``client.num_gpus`` of a GPU) and the cluster.

    Joining a running cluster passes only its address: its size is the cluster's (Ray refuses
    ``num_cpus`` and friends when connecting), and disconnecting at the end leaves it running.
    """
    resources: dict[str, float] = {"num_cpus": cfg.client.num_cpus, "num_gpus": cfg.client.num_gpus}
    init_args: dict[str, Any] = {"log_to_driver": True, "include_dashboard": False}
    address = ray_address(cfg)
    if address:
        init_args["address"] = address
    return {"client_resources": resources, "init_args": init_args}


def run_simulation(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """Simulate ``cfg.num_clients`` SuperNodes (on Ray, or batched in this process); returns the metrics rows."""
    if cfg.engine.name == "batched":
        from fedpeft.batched_engine import run_batched

        return run_batched(cfg, run_dir)
    from flwr.simulation import run_simulation as flwr_run_simulation

    from clients.app import app as client_app
    from fedpeft.server import run_federated

    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["rows"] = run_federated(cfg, grid, run_dir)
        except BaseException as err:  # re-raised below: Flower would only log it
            outcome["error"] = err

    if ray_address(cfg):
        check_ray_address(ray_address(cfg))
        log.info("simulating on the running Ray cluster at %s", ray_address(cfg))
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    flwr_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.num_clients, backend_config=backend_config(cfg))
    if "error" in outcome:
        raise outcome["error"]
    if "rows" not in outcome:
        raise RuntimeError("the simulation ended without running the server app (see Flower's log above)")
    return outcome["rows"]
