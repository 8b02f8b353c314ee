"""A finished run lengthened with ``resume=<dir> num_rounds=<more>`` ends exactly as a run planned that long."""

from __future__ import annotations

import pytest
import torch

from fedpeft.cli.configs import compose_config
from fedpeft.models import adapters as models
from fedpeft.reporting.metrics import read_metrics
from fedpeft.run import claim_run_dir
from fedpeft.server.errors import RunError
from fedpeft.server.loop import run_federated
from tests.strategies.test_rules_fakegrid import grid, tiny_model  # noqa: F401  (the fixture)

SAME = [
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "clients_sampled",
    "bytes_up",
    "bytes_down",
    "cumulative_bytes_up",
    "cumulative_bytes_down",
]


@pytest.mark.parametrize("rule", ["fedavg", "flora"])
def test_a_lengthened_run_matches_one_planned_that_long(tmp_path, tiny_model, rule):  # noqa: F811
    # Prepare
    base = [*tiny_model, f"strategy.name={rule}", "seed=3", "eval_every=1"]
    # Execute: 3 rounds at once; 2 rounds, then the same run lengthened to 3
    models.clear_cache()
    want = run_federated(compose_config([*base, "num_rounds=3"]), grid(), tmp_path / "three")
    models.clear_cache()
    run_federated(compose_config([*base, "num_rounds=2"]), grid(), tmp_path / "two")
    models.clear_cache()
    longer = compose_config([*base, "num_rounds=3", f"resume={tmp_path / 'two'}"])
    assert claim_run_dir(longer, tmp_path / "unused") == tmp_path / "two"  # not a finished run any more
    run_federated(longer, grid(), tmp_path / "two")
    # Assert: every round's figures equal, bit for bit, and the strategy state too
    got = read_metrics(tmp_path / "two")
    assert [[r.get(k) for k in SAME] for r in got] == [[r.get(k) for k in SAME] for r in want]
    a = torch.load(tmp_path / "three" / "checkpoint.pt", weights_only=False)["strategy"]
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["strategy"]
    assert a["adapter"].keys() == b["adapter"].keys() and all(
        torch.equal(a["adapter"][k], b["adapter"][k]) for k in a["adapter"]
    )
    assert a["rng"] == b["rng"] and a["synced"] == b["synced"]
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["round"] == 3


def test_a_dp_run_calibrated_for_its_rounds_cannot_be_lengthened(tmp_path, tiny_model):  # noqa: F811
    base = [*tiny_model, "client.dp.enabled=true", "client.dp.target_epsilon=8", "num_rounds=1"]
    models.clear_cache()
    run_federated(compose_config(base), grid(), tmp_path / "dp")
    with pytest.raises(
        RunError, match=r"num_rounds=2: its DP noise was calibrated to reach ε=8.0 over 1 rounds.*start a new run"
    ):
        claim_run_dir(compose_config([*base, "num_rounds=2", f"resume={tmp_path / 'dp'}"]), tmp_path / "x")
    # the same number of rounds, or fewer, is still a plain resume (here: already finished)
    from fedpeft.run import FinishedRun

    with pytest.raises(FinishedRun):
        claim_run_dir(compose_config([*base, f"resume={tmp_path / 'dp'}"]), tmp_path / "x")
