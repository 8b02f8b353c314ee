"""The spread of client accuracy that metrics.jsonl reports: weighted by examples, against numpy."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.results import weighted_spread


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
