"""Run the fedpeft apps on Flower's simulation engine (Ray): many clients on one machine.

The ClientApp is passed by reference (``fedpeft.clients.app.app``, an importable module). Defining it in
``__main__`` would make Ray pickle it by value and lose the per-process model cache.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.clients.app import app as client_app
from fedpeft.config.schema import ENGINES, Config
from fedpeft.engines.batched import check_batched, run_batched
from fedpeft.reporting import logs
from fedpeft.server.loop import run_federated

log = logging.getLogger("fedpeft")


def root_cause(err: BaseException) -> BaseException:
    """The innermost cause of a chain (Flower wraps Ray's error twice: 'An error was encountered')."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        cause = err.__cause__ or err.__context__
        if cause is None:
            break
        err = cause
    return err


class SimulationError(RuntimeError):
    """Flower's simulation engine or Ray failed (no actor could start, a worker died at start-up, ...)."""


def check_engine(cfg: Config) -> None:
    """The engine settings, checked before anything starts."""
    if cfg.engine.name not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {cfg.engine.name!r}")
    if cfg.engine.clients_per_pass < 1:
        raise ValueError(f"engine.clients_per_pass must be >= 1, got {cfg.engine.clients_per_pass}")
    if cfg.engine.name == "batched":
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


def start_ray(address: str | None = None) -> None:
    """Start this run's Ray cluster (Flower uses a running one as it is).

    As Flower would, plus: unless ``verbose=true``, every worker runs
    :func:`fedpeft.reporting.logs.worker_setup` first, which sends its output to the run's ``run.log``,
    and nothing of the workers is forwarded to this console.
    """
    import ray  # start-up: Ray (~2 s to import) only for a run on the Ray engine

    quiet = os.environ.get(logs.ENV_VERBOSE) == "0"
    # Ray subprocesses inherit environment variables, not this process's sys.path (Flower does the same).
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    runtime_env: dict[str, Any] = {"env_vars": {"PYTHONPATH": pythonpath}}
    if quiet:
        runtime_env["worker_process_setup_hook"] = "fedpeft.reporting.logs.worker_setup"
    ray.init(
        address=address,
        runtime_env=runtime_env,
        include_dashboard=False,
        log_to_driver=not quiet,
        logging_level=logging.WARNING,
        configure_logging=not quiet,
    )


def run_simulation(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """Simulate ``cfg.num_clients`` SuperNodes (on Ray, or batched in this process); returns the metrics rows.

    A failure of the engine itself (Ray cannot start a client, ...) raises :class:`SimulationError`
    with Ray's own reason. Flower's ServerApp thread is then still waiting for replies that will
    never come, so the caller must end the process (:func:`fedpeft.cli.signals.stop_now`), not return.
    """
    if cfg.engine.name == "batched":
        return run_batched(cfg, run_dir)
    import ray  # start-up: Ray and Flower's simulation (which imports Ray) only for a run on the Ray engine
    from flwr.simulation import run_simulation as flwr_run_simulation

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
    address = ray_address(cfg)
    if address:
        check_ray_address(address)
        log.info("simulating on the running Ray cluster at %s", address)
    if not ray.is_initialized():
        start_ray(address)
    try:
        flwr_run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.num_clients,
            backend_config=backend_config(cfg),
        )
    except Exception as err:
        if "error" in outcome:
            raise outcome["error"] from err
        cause = root_cause(err)
        raise SimulationError(
            f"Flower's simulation engine failed: {type(cause).__name__}: {' '.join(str(cause).split())}"
        ) from err
    if "error" in outcome:
        raise outcome["error"]
    if "rows" not in outcome:
        raise SimulationError("the simulation ended without running the server app (see run.log)")
    return outcome["rows"]
