"""The spread of client accuracy that metrics.jsonl reports (weighted by examples, against numpy);
when a run's plots are redrawn."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.reporting import metrics as results
from fedpeft.reporting.metrics import MetricsWriter, weighted_spread


@settings(max_examples=50, deadline=None)
@given(data=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 500)), min_size=1, max_size=12))
def test_weighted_spread_matches_numpy(data):
    values, weights = [v for v, _ in data], [w for _, w in data]
    out = weighted_spread(values, weights)
    mean = np.average(values, weights=weights)
    assert out["mean"] == np.float64(mean) or abs(out["mean"] - mean) < 1e-12
    assert abs(out["std"] - np.sqrt(np.average((np.array(values) - mean) ** 2, weights=weights))) < 1e-9
    assert (out["min"], out["max"]) == (min(values), max(values))


def test_no_clients_no_figures():
    assert weighted_spread([], []) == {"mean": None, "std": None, "min": None, "max": None}


def test_plots_are_redrawn_when_a_round_scores_the_test_split_and_after_the_last(tmp_path, monkeypatch):
    drawn: list[list[int]] = []
    monkeypatch.setattr(results.plots, "run_plots", lambda rows, out: drawn.append([r["round"] for r in rows]))
    writer = MetricsWriter(tmp_path, num_rounds=5)
    for t in range(1, 6):
        writer.write({"round": t, "train_loss": 1.0 / t, "test_accuracy": 0.5 if t % 2 == 0 else None})
    assert drawn == [[1, 2], [1, 2, 3, 4], [1, 2, 3, 4, 5]]  # rounds 2 and 4 scored; round 5 is the last
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5  # every round is still written
