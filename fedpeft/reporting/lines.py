"""The console's line for one round of a run, and the time and percentage formats it shares.

Built by a plain function so that a simulated, a deployed and a centralised run print the same
line: :class:`fedpeft.reporting.metrics.MetricsWriter` logs it as each round ends, and a deployed
run's submitting console (:mod:`fedpeft.deploy`) prints it from the rows it follows.
"""

from __future__ import annotations

import math
from typing import Any


def hms(seconds: float) -> str:
    """``seconds`` as ``h:mm:ss``."""
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def pct(value: Any) -> str:
    """A fraction as a percentage with one decimal; ``-`` for none (or NaN)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def round_line(row: dict[str, Any], *, num_rounds: int, elapsed: float, eta: float) -> str:
    """One round: test accuracy and loss, mean train loss, clients, traffic, time."""
    loss = row.get("test_loss")
    train = row.get("train_loss")
    parts = [
        f"round {row['round']:>{len(str(num_rounds))}}/{num_rounds}",
        f"acc {pct(row.get('test_accuracy')):>6}",
        f"loss {'-' if loss is None else f'{loss:.3f}':>5}",
        f"train {'-' if train is None else f'{train:.3f}':>5}",
    ]
    if row.get("clients_sampled"):
        clients = f"clients {row.get('clients_replied', 0)}/{row['clients_sampled']}"
        bad = [f"{row[k]} {k.split('_')[1]}" for k in ("clients_failed", "clients_rejected") if row.get(k)]
        parts.append(clients + (f" ({', '.join(bad)})" if bad else ""))
        parts.append(f"up {row.get('bytes_up', 0) / 1e6:.2f} MB  down {row.get('bytes_down', 0) / 1e6:.2f} MB")
    if row.get("max_epsilon") is not None:
        parts.append(f"eps {row['max_epsilon']:.2f}")
    parts.append(f"{hms(elapsed)} (ETA {hms(eta)})")
    return "  ".join(parts)
