"""``engine=batched`` gives the run ``engine=ray`` gives: same clients each round, same accuracy, same adapters.

Both sides run the real server loop and the real client steps on a tiny random-init BERT with
every dropout off (dropout masks are drawn per process and cannot match between engines). The
fast test compares the batched grid with the in-process grid that answers one message at a time
through the ClientApp; the slow one compares whole runs on real Ray and batched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.cli.configs import compose_config
from fedpeft.models import adapters as models
from fedpeft.run import execute
from fedpeft.server.loop import run_federated

try:
    from fedpeft.engines.batched import BatchedGrid
    from tests.fakegrid import InProcessGrid
except ImportError as err:  # engine=batched is built on the client's decode/train/encode steps (protocol, issue 10)
    pytest.skip(f"engine=batched needs the protocol's client steps: {err}", allow_module_level=True)

TINY = [
    "num_rounds=2",
    "client.local_steps=2",
    "data.max_samples=60",
    "model.max_length=32",
    "data.partitioner=iid",
    "client.batch_size=4",
]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer random-init BERT (no head: each run adds one for its labels) with the embedded
    model's tokenizer, all dropout off."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = models.load_tokenizer(compose_config([]).model)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    """The saved result: the adapter, or (rules that merge into the base, e.g. FLoRA) the merged model."""
    path = run_dir / "final_adapter" / "adapter_model.safetensors"
    return load_file(path if path.exists() else run_dir / "final_model" / "model.safetensors")


def assert_same_run(rows_a, rows_b, dir_a: Path, dir_b: Path) -> None:
    assert [r["round"] for r in rows_a] == [r["round"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        assert [c["partition"] for c in a["clients"]] == [c["partition"] for c in b["clients"]], "different clients"
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 1e-4
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    fa, fb = final_adapter(dir_a), final_adapter(dir_b)
    assert set(fa) == set(fb)
    for key in fa:  # float32 runs: rounding differs (one combined batch vs one per client), Adam amplifies it a little
        assert float((fa[key].double() - fb[key].double()).abs().max()) <= 1e-5, key


@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=fedavg", "strategy.ranks=[4,2,3]"],  # heterogeneous ranks share a pass
        ["strategy=flora", "strategy.ranks=[4,2,3]"],  # a base that moves every round
    ],
    ids=["fedavg-hetero", "flora"],
)
def test_batched_grid_equals_one_client_at_a_time(tmp_path, tiny_bert_dir, strategy):
    # Prepare
    cfg = compose_config(
        [
            *TINY,
            "num_clients=3",
            "clients_per_round=3",
            f"model.name_or_path={tiny_bert_dir}",
            "engine=batched",
            "engine.clients_per_pass=2",
            *strategy,
        ]
    )
    # Execute (each run in a fresh model cache: a cached model that trained another run is not a fresh start)
    models.clear_cache()
    batched = BatchedGrid(num_nodes=3, clients_per_pass=2, seed=cfg.seed)
    rows_b = run_federated(cfg, batched, tmp_path / "batched")
    models.clear_cache()
    single = InProcessGrid(
        __import__("fedpeft.clients.app", fromlist=["app"]).app, [{"partition-id": k} for k in range(3)]
    )
    rows_s = run_federated(cfg, single, tmp_path / "single")
    # Assert: 3 clients a round in passes of 2 + 1, and the same run
    assert batched.passes == [2, 1] * cfg.num_rounds
    assert_same_run(rows_b, rows_s, tmp_path / "batched", tmp_path / "single")


def test_a_failing_client_fails_alone(tmp_path, tiny_bert_dir):
    cfg = compose_config(
        [
            *TINY,
            "num_clients=3",
            "clients_per_round=3",
            "num_rounds=1",
            f"model.name_or_path={tiny_bert_dir}",
            "faults.raise_prob=0.5",
            "min_clients=1",
        ]
    )
    models.clear_cache()
    grid = BatchedGrid(num_nodes=3, clients_per_pass=3, seed=cfg.seed)
    rows = run_federated(cfg, grid, tmp_path)
    assert 0 < rows[0]["clients_replied"] < 3 and rows[0]["clients_failed"] == 3 - rows[0]["clients_replied"]


def test_batched_refuses_what_would_kill_the_server():
    from fedpeft.run import check_config

    with pytest.raises(ValueError, match="crash_prob"):
        check_config(compose_config(["engine=batched", "faults.crash_prob=0.1"]))
    with pytest.raises(ValueError, match="clients_per_pass"):
        check_config(compose_config(["engine=batched", "engine.clients_per_pass=0"]))
    with pytest.raises(ValueError, match="engine must be one of"):
        check_config(compose_config(["engine.name=gpu"]))


@pytest.mark.slow
def test_whole_run_batched_equals_ray(tmp_path, tiny_bert_dir):
    # Prepare
    common = [*TINY, "num_clients=2", "clients_per_round=2", f"model.name_or_path={tiny_bert_dir}", "strategy=fedavg"]
    # Execute
    models.clear_cache()
    rows_ray = execute(compose_config([*common, "engine=ray"]), tmp_path / "ray")
    models.clear_cache()
    rows_batched = execute(compose_config([*common, "engine=batched"]), tmp_path / "batched")
    # Assert
    assert_same_run(rows_batched, rows_ray, tmp_path / "batched", tmp_path / "ray")


def test_dp_clients_run_alone_through_the_dp_path(tmp_path, tiny_bert_dir):
    """DP jobs never share a pass: same clipping, noise and ledger as the one-client path, so the same ε."""
    cfg = compose_config(
        [
            *TINY,
            "num_clients=2",
            "clients_per_round=2",
            f"model.name_or_path={tiny_bert_dir}",
            "client.dp.enabled=true",
            "client.dp.noise_multiplier=1.0",
        ]
    )
    models.clear_cache()
    batched = BatchedGrid(num_nodes=2, clients_per_pass=2, seed=cfg.seed)
    rows_b = run_federated(cfg, batched, tmp_path / "batched")
    models.clear_cache()
    rows_s = run_federated(
        cfg,
        InProcessGrid(__import__("fedpeft.clients.app", fromlist=["app"]).app, [{"partition-id": k} for k in range(2)]),
        tmp_path / "single",
    )
    assert batched.passes == []
    assert [r["max_epsilon"] for r in rows_b] == [r["max_epsilon"] for r in rows_s] and rows_b[-1]["max_epsilon"] > 0
    assert_same_run(rows_b, rows_s, tmp_path / "batched", tmp_path / "single")


def test_a_failed_pass_is_retried_one_client_at_a_time(tmp_path, tiny_bert_dir, monkeypatch):
    import fedpeft.engines.batched as engine

    def broken_pass(jobs):
        raise FloatingPointError("a pass that diverged")

    cfg = compose_config(
        [*TINY, "num_clients=2", "clients_per_round=2", "num_rounds=1", f"model.name_or_path={tiny_bert_dir}"]
    )
    models.clear_cache()
    rows_good = run_federated(cfg, BatchedGrid(num_nodes=2, clients_per_pass=2, seed=cfg.seed), tmp_path / "good")
    monkeypatch.setattr(engine, "train_pass", broken_pass)
    models.clear_cache()
    grid = BatchedGrid(num_nodes=2, clients_per_pass=2, seed=cfg.seed)
    rows = run_federated(cfg, grid, tmp_path / "retried")
    assert grid.passes == [] and rows[0]["clients_replied"] == 2
    assert_same_run(rows, rows_good, tmp_path / "retried", tmp_path / "good")
