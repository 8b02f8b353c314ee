"""Failing clients in a real simulation: counted, logged, and the run goes on or stops clearly."""

from __future__ import annotations

import pytest

from fedpeft.run import execute
from fedpeft.server.errors import RunError
from tests.fedpeft.test_config import compose_cfg

pytestmark = pytest.mark.slow


def test_run_completes_with_the_clients_that_did_not_raise(tmp_path):
    cfg = compose_cfg(
        [
            "+exp=smoke",
            "num_rounds=3",
            "faults.raise_prob=0.4",
            "min_clients=1",
            "on_too_few=retry",
            "max_retries=5",
            "save_adapter=false",
        ]
    )
    rows = execute(cfg, tmp_path)
    assert [r["round"] for r in rows] == [1, 2, 3]
    failures = [f for r in rows for f in r["failures"]]
    assert failures, "with p=0.4 over 9 client-rounds and this seed some client must fail"
    assert all(
        f["reason"].startswith("injected fault: client") for f in failures
    )  # the client's message, not a traceback
    for row in rows:
        assert row["clients_failed"] + row["clients_replied"] == row["clients_sampled"]
        assert row["test_accuracy"] is not None


def test_too_few_clients_stops_with_a_clear_message(tmp_path):
    cfg = compose_cfg(["+exp=smoke", "faults.raise_prob=1.0", "min_clients=2", "save_adapter=false"])
    with pytest.raises(RunError, match=r"round 1: 0 accepted updates, fewer than min_clients=2.*injected fault"):
        execute(cfg, tmp_path)


@pytest.mark.parametrize(
    "fault, reason",
    [
        (["faults.hang_prob=0.3", "faults.hang_seconds=40", "round_timeout=20"], "no reply within round_timeout"),
        (["faults.crash_prob=0.3"], ""),
    ],
)
def test_hanging_or_dying_clients_are_counted_and_the_run_finishes(tmp_path, fault, reason):
    cfg = compose_cfg(
        [
            "+exp=smoke",
            "num_rounds=2",
            "min_clients=1",
            "on_too_few=retry",
            "max_retries=3",
            "save_adapter=false",
            *fault,
        ]
    )
    rows = execute(cfg, tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    failures = [f for r in rows for f in r["failures"]]
    assert failures and all(reason in f["reason"] for f in failures)
    for (
        row
    ) in rows:  # unreachable: the failed nodes that never answered (a hang), not those that answered with an error
        silent = [f["node"] for f in row["failures"] if "no reply" in f["reason"]]
        assert [u["node"] for u in row["unreachable"]] == silent
