"""``client.lr_decay``: round t trains at ``lr · lr_decay^(t-1)`` on every path that trains.

The oracle is an equivalence: a client in round 3 with lr 0.04 and decay 0.5 must train exactly
what a client in round 3 with a constant lr 0.01 trains (0.04 · 0.5² is 0.01 exactly in binary), on
the one-client path, the DP path and a batched pass; the bounds and a lengthened run follow it too.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from fedpeft.cli.checks import ConfigError
from fedpeft.cli.configs import compose_config
from fedpeft.clients.batched import train_jobs_batched
from fedpeft.clients.job import decode, encode, train_jobs
from fedpeft.config.schema import round_lr, to_json
from fedpeft.models import adapters as models
from fedpeft.protocol import wire as protocol
from fedpeft.protocol.wire import ClientPlan, RunInfo, Source, single_group
from fedpeft.reporting.metrics import read_metrics
from fedpeft.run import check_config, execute
from fedpeft.server import baselines
from fedpeft.server.loop import run_federated
from tests.clients.test_job import CFG, adapter, message  # noqa: F401  (the fixture)
from tests.strategies.test_rules_fakegrid import grid, tiny_model  # noqa: F401  (the fixture)

DECAYED = ["client.lr=0.04", "client.lr_decay=0.5"]
CONSTANT = ["client.lr=0.01"]
CFG_OVERRIDES = [
    "+exp=smoke",
    "num_clients=2",
    "data.max_samples=60",
    "model.max_length=16",
    "client.local_steps=2",
    "model.lora.r=2",
]  # test_job's CFG


def test_round_lr_is_the_base_rate_times_decay_to_the_round_minus_one():
    client = compose_config(["client.lr=0.04", "client.lr_decay=0.5"]).client
    assert [round_lr(client, t) for t in (0, 1, 2, 3)] == [0.04, 0.04, 0.02, 0.01]
    assert round_lr(compose_config(["client.lr=0.03"]).client, 50) == 0.03  # the default is constant


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.9", "nan"])
def test_a_decay_outside_zero_one_is_refused_at_start(bad):
    with pytest.raises(ConfigError, match=r"client.lr_decay must lie in \(0, 1\]"):
        check_config(compose_config([f"client.lr_decay={bad}"]))


def trained(tmp_path, adapter, overrides: list[str], server_round: int, *, clients: int = 1, batched: bool = False):  # noqa: F811
    """The uploads of ``clients`` clients trained in ``server_round`` under ``overrides``."""
    cfg = compose_config([*CFG_OVERRIDES, *overrides])
    run = RunInfo(
        config_json=to_json(cfg), sim_state_dir=str(tmp_path / f"{'-'.join(overrides)}-{server_round}-{batched}")
    )
    plan = ClientPlan(groups=single_group(source=Source.MESSAGE), server_round=server_round, rank=2)
    jobs = [
        decode(
            message(run, plan, adapter),
            Context(run_id=1, node_id=k, node_config={"partition-id": k}, state=RecordDict(), run_config={}),
        )
        for k in range(clients)
    ]
    results = train_jobs_batched(jobs, clients_per_pass=clients) if batched else train_jobs(jobs)
    return [protocol.decode_reply(encode(job, result).content)[0] for job, result in zip(jobs, results)]


def assert_equal_states(a, b) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "path",
    [
        pytest.param({}, id="one-client"),
        pytest.param({"extra": ["client.dp.enabled=true", "client.dp.noise_multiplier=0.5"]}, id="dp"),
        pytest.param({"clients": 2, "batched": True}, id="batched-pass"),
    ],
)
def test_round_three_trains_at_the_decayed_rate(tmp_path, adapter, path):  # noqa: F811
    assert compose_config(CFG_OVERRIDES) == CFG  # the fixture's adapter is the one these overrides build
    extra, clients, batched = path.get("extra", []), path.get("clients", 1), path.get("batched", False)
    # Execute
    decayed = trained(tmp_path, adapter, [*DECAYED, *extra], 3, clients=clients, batched=batched)
    constant = trained(tmp_path, adapter, [*CONSTANT, *extra], 3, clients=clients, batched=batched)
    undecayed = trained(tmp_path, adapter, ["client.lr=0.04", *extra], 3, clients=clients, batched=batched)
    # Assert: bit for bit the constant 0.01 client, and not the 0.04 one
    for d, c, u in zip(decayed, constant, undecayed):
        assert_equal_states(d, c)
        assert any(not torch.equal(d[k], u[k]) for k in d)


@pytest.mark.parametrize("mode", ["centralized", "local"])
def test_the_bounds_train_each_round_at_its_decayed_rate(tmp_path, monkeypatch, mode):
    # Prepare: record the rate of every training call
    rates: list[float] = []
    real = baselines.train_local

    def recording(*args, lr, **kwargs):
        rates.append(lr)
        return real(*args, lr=lr, **kwargs)

    monkeypatch.setattr(baselines, "train_local", recording)
    cfg = compose_config(["+exp=smoke", f"mode={mode}", "num_rounds=3", "save_adapter=false", *DECAYED])
    # Execute
    execute(cfg, tmp_path)
    # Assert: every client (local-only) or the pooled model (centralised) at 0.04, 0.02, 0.01
    per_round = 1 if mode == "centralized" else cfg.num_clients
    assert rates == [0.04] * per_round + [0.02] * per_round + [0.01] * per_round


def test_a_lengthened_decaying_run_matches_one_planned_that_long(tmp_path, tiny_model):  # noqa: F811
    """The rate depends on the round alone, so lengthening a run in place (compare_all_rules' sweep) stays exact."""
    base = [*tiny_model, "seed=3", "eval_every=1", *DECAYED]
    models.clear_cache()
    want = run_federated(compose_config([*base, "num_rounds=3"]), grid(), tmp_path / "three")
    models.clear_cache()
    run_federated(compose_config([*base, "num_rounds=2"]), grid(), tmp_path / "two")
    models.clear_cache()
    run_federated(compose_config([*base, "num_rounds=3", f"resume={tmp_path / 'two'}"]), grid(), tmp_path / "two")
    got = read_metrics(tmp_path / "two")
    assert [(r["round"], r["test_loss"], r["train_loss"]) for r in got] == [
        (r["round"], r["test_loss"], r["train_loss"]) for r in want
    ]
