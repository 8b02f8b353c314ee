"""The deployed ServerApp: :func:`fedpeft.server.loop.run_federated` on a SuperLink's grid.

The generated Flower App names it as ``fedpeft.engines.deploy.serverapp:server_app``
(:func:`fedpeft.engines.deploy.submit.write_app`). The composed Hydra config arrives in the run config
(``fedpeft.protocol.wire.FEDPEFT_CONFIG``, JSON) instead of a Python closure, with the results
folder (``RUN_DIR``). The ServerApp leaves a done or failed marker there as its last act; the
submitting console waits for it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config.schema import from_json
from fedpeft.protocol.wire import FEDPEFT_CONFIG, RUN_DIR
from fedpeft.server.loop import run_federated

log = logging.getLogger("fedpeft")

DONE, FAILED = "deploy-done.json", "deploy-error.txt"

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """The deployed ServerApp: the run's config and results folder come in the run config."""
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
