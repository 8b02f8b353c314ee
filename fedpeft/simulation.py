"""Run the fedpeft apps on Flower's simulation engine (Ray): many clients on one machine.

The ClientApp is passed by reference (``clients.app.app``, an importable module). Defining it in
``__main__`` would make Ray pickle it by value and lose the per-process model cache.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import Config

log = logging.getLogger("fedpeft")


def backend_config(cfg: Config) -> dict[str, Any]:
    """Ray resources per client: ``client.num_cpus`` and a fraction ``client.num_gpus`` of a GPU."""
    resources: dict[str, float] = {"num_cpus": cfg.client.num_cpus, "num_gpus": cfg.client.num_gpus}
    return {"client_resources": resources, "init_args": {"log_to_driver": True, "include_dashboard": False}}


def run_simulation(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """Simulate ``cfg.num_clients`` SuperNodes on Ray; returns the metrics rows."""
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

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    flwr_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.num_clients, backend_config=backend_config(cfg))
    if "error" in outcome:
        raise outcome["error"]
    if "rows" not in outcome:
        raise RuntimeError("the simulation ended without running the server app (see Flower's log above)")
    return outcome["rows"]
