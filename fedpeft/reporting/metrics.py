"""What a run leaves on disk: ``metrics.jsonl``, ``metrics.csv``, ``plots/`` and optional TensorBoard
scalars (and the console's round line, from :mod:`fedpeft.reporting.lines`)."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpeft.reporting import plots
from fedpeft.reporting.lines import round_line

log = logging.getLogger("fedpeft")

# Scalar columns of metrics.csv, in order; metrics.jsonl has these plus per-client details.
CSV_COLUMNS = [
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "clients_sampled",
    "clients_replied",
    "clients_failed",
    "clients_rejected",
    "wall_seconds",
    "bytes_up",
    "bytes_down",
    "cumulative_bytes_up",
    "cumulative_bytes_down",
    "residual",
    "max_epsilon",
    "client_val_accuracy_mean",
    "client_val_accuracy_std",
    "client_val_accuracy_min",
    "client_val_accuracy_max",
]


def weighted_spread(values: Sequence[float], weights: Sequence[float]) -> dict[str, float | None]:
    """Example-weighted ``mean`` and ``std`` (population) and the ``min`` and ``max`` of ``values``.

    >>> weighted_spread([0.5, 1.0], [1, 3])
    {'mean': 0.875, 'std': 0.21650635094610965, 'min': 0.5, 'max': 1.0}
    """
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    total = float(sum(weights))
    mean = sum(w * v for v, w in zip(values, weights)) / total
    var = sum(w * (v - mean) ** 2 for v, w in zip(values, weights)) / total
    return {"mean": mean, "std": math.sqrt(max(var, 0.0)), "min": min(values), "max": max(values)}


def _clean(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


LOGGERS = ("none", "tensorboard")


class MetricsWriter:
    """Appends one line per round to ``metrics.jsonl`` and ``metrics.csv``, redraws ``plots/`` (on
    rounds that scored the test split, and after the last),
    optionally adds TensorBoard scalars (``logger="tensorboard"``), and prints progress."""

    def __init__(self, run_dir: Path, *, num_rounds: int, logger: str = "none") -> None:
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        self.num_rounds = num_rounds
        self.started = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.tensorboard = tensorboard_writer(self.run_dir) if logger == "tensorboard" else None
        self.live = 0  # rounds run by this process (not replayed from a checkpoint)
        self.jsonl.write_text("")  # a resumed run rewrites its rows up to the checkpoint
        with self.csv.open("w", newline="") as fh:
            csv.writer(fh).writerow(CSV_COLUMNS)

    def write(self, row: dict[str, Any], *, rounds_done: int | None = None) -> None:
        """Append ``row``; ``rounds_done`` marks a row replayed from a checkpoint (not printed, not timed)."""
        row = _clean(row)
        self.rows.append(row)
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        with self.csv.open("a", newline="") as fh:
            csv.writer(fh).writerow(["" if row.get(c) is None else row.get(c) for c in CSV_COLUMNS])
        if rounds_done is not None:  # a row replayed from a checkpoint: drawn and printed by the run that made it
            return
        self.live += 1
        if self.tensorboard is not None:
            for key in CSV_COLUMNS[1:]:
                if isinstance(row.get(key), (int, float)):
                    self.tensorboard.add_scalar(key, row[key], global_step=row["round"])
            self.tensorboard.flush()
        if (
            row.get("test_accuracy") is not None or row["round"] >= self.num_rounds
        ):  # a new point, or the run's end: redraw
            self.redraw()
        self.progress(row)

    def redraw(self) -> None:
        """``plots/`` from every row so far (a failure is logged: a picture is never worth a run)."""
        try:
            plots.run_plots(self.rows, self.run_dir / "plots")
        except Exception as err:
            log.warning("could not draw %s: %s", self.run_dir / "plots", err)

    def progress(self, row: dict[str, Any]) -> None:
        """The console line of a round run now; the ETA from this run's own pace."""
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(self.live, 1) * max(self.num_rounds - row["round"], 0)
        log.info("%s", round_line(row, num_rounds=self.num_rounds, elapsed=elapsed, eta=eta))


def tensorboard_writer(run_dir: Path):
    """A ``SummaryWriter`` on ``<run_dir>/tensorboard`` (``tensorboard --logdir <run_dir>``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # only with logger=tensorboard: needs the tensorboard package
    except ImportError as err:
        raise ValueError(
            "logger=tensorboard needs the tensorboard package: pip install tensorboard (or pip install -e '.[tensorboard]')"
        ) from err
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
