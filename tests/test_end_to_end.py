"""End to end: a real Ray simulation of 3 clients x 2 rounds on a small cut of the embedded data."""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.config.schema import to_config
from fedpeft.run import execute
from tests.fedpeft.test_config import compose_cfg

pytestmark = pytest.mark.slow


def reload_and_evaluate(cfg, run_dir):
    """Plain peft: ``PeftModel.from_pretrained(base, final_adapter)`` evaluated on the test split."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedpeft.data.encoding import encode, make_loader
    from fedpeft.data.partition import prepare
    from fedpeft.models.paths import resolve_model_path
    from fedpeft.training.local import evaluate

    path = resolve_model_path(cfg.model.name_or_path)
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=data.num_labels)
    model = PeftModel.from_pretrained(base, str(run_dir / "final_adapter"))
    tok = AutoTokenizer.from_pretrained(path)
    examples = encode(data.test, tok, max_length=cfg.model.max_length, task=cfg.model.task)
    return evaluate(model, make_loader(examples, pad_token_id=tok.pad_token_id, batch_size=64, shuffle=False))


@pytest.mark.usefixtures("worker_counters")
def test_simulation_runs_loads_base_once_per_worker_and_saves_a_loadable_adapter(tmp_path):
    # Prepare
    cfg = compose_cfg(["+exp=smoke"])
    # Execute
    rows = execute(cfg, tmp_path)
    # Assert: metrics on disk
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == rows and [r["round"] for r in rows] == [1, 2]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["round", "test_accuracy", "test_loss", "train_loss"]
    assert to_config(__import__("omegaconf").OmegaConf.load(tmp_path / "config.yaml")) == cfg
    for row in rows:
        assert row["clients_sampled"] == row["clients_replied"] == 3
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["test_loss"] > 0
        assert row["bytes_up"] == row["bytes_down"] > 0  # FedIT: the same adapter both ways
        assert row["wall_seconds"] > 0 and row["train_loss"] > 0
        assert row["residual"] is not None and row["residual"] >= 0
        for client in row["clients"]:
            assert client["base_loads"] == 1  # the worker loaded the base once, whatever it ran before
            assert client["num_examples"] > 0 and "val_accuracy" in client
    assert rows[1]["cumulative_bytes_up"] == 2 * rows[0]["bytes_up"]
    # Assert: the partition report, the node status of the handshake and the plots
    partitions = json.loads((tmp_path / "partitions.json").read_text())
    nodes = json.loads((tmp_path / "nodes.json").read_text())["nodes"]
    assert [(c["partition"], c["examples"]) for c in partitions["clients"]] == sorted(
        (n["partition"], n["examples"]) for n in nodes
    )
    assert [c["label_counts"] for c in partitions["clients"]] == [
        n["label_counts"] for n in sorted(nodes, key=lambda n: n["partition"])
    ]
    for name in ("partitions.png", "accuracy_loss.png", "accuracy_vs_mb.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
    pids = {c["worker_pid"] for r in rows for c in r["clients"]}
    assert len(pids) < 6  # workers are reused across clients and rounds
    # Assert: plain peft reloads the adapter and reproduces the reported accuracy
    reloaded = reload_and_evaluate(cfg, tmp_path)
    assert reloaded.accuracy == pytest.approx(rows[-1]["test_accuracy"], abs=1e-9)
    assert reloaded.loss == pytest.approx(rows[-1]["test_loss"], rel=1e-4)


def test_centralized_reference_runs(tmp_path):
    cfg = compose_cfg(["+exp=smoke", "mode=centralized", "num_rounds=1"])
    rows = execute(cfg, tmp_path)
    assert len(rows) == 1 and rows[0]["test_accuracy"] is not None
    assert (tmp_path / "final_adapter" / "adapter_config.json").exists()
    assert torch.isfinite(torch.tensor(rows[0]["test_loss"]))


def test_local_only_with_one_client_is_the_centralised_reference(tmp_path):
    """Two code paths, one computation: one client alone (mode=local) trains what pooled data
    (mode=centralized) trains when the pool is that client's data and a round is its steps."""
    one = ["+exp=smoke", "num_clients=1", "clients_per_round=1", "data.partitioner=iid", "save_adapter=false"]
    local = execute(compose_cfg([*one, "mode=local"]), tmp_path / "local")
    central = execute(compose_cfg([*one, "mode=centralized"]), tmp_path / "central")
    assert [r["round"] for r in local] == [1, 2]
    for lo, ce in zip(local, central):
        for key in ("test_accuracy", "test_loss", "train_loss"):
            assert lo[key] == pytest.approx(ce[key], rel=1e-6, abs=1e-9), key
        assert lo["bytes_up"] == lo["bytes_down"] == 0


def test_local_only_reports_the_clients_own_models(tmp_path):
    rows = execute(compose_cfg(["+exp=smoke", "mode=local", "num_rounds=1", "save_adapter=false"]), tmp_path)
    (row,) = rows
    assert row["clients_sampled"] == row["clients_replied"] == 3
    assert row["test_accuracy_min"] <= row["test_accuracy"] <= row["test_accuracy_max"]
    assert row["test_accuracy_min"] < row["test_accuracy_max"]  # three different models, not one
    assert 0.0 <= row["client_val_accuracy_mean"] <= 1.0


def lora_a_crc32(state) -> int:
    import zlib

    return zlib.crc32(b"".join(state[k].numpy().tobytes() for k in sorted(state) if k.endswith(".lora_A.weight")))


@pytest.mark.parametrize("rule", ["ffa_lora", "flora", "lora_fair"])
def test_every_rule_runs_with_heterogeneous_ranks(tmp_path, rule):
    cfg = compose_cfg(["+exp=smoke", f"strategy={rule}", "strategy.ranks=[4,2,1]", "model.lora.r=4"])
    rows = execute(cfg, tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["clients_replied"] == 3 and row["clients_rejected"] == 0
        assert sorted(c["rank"] for c in row["clients"]) == [1, 2, 4]
        assert 0.0 <= row["test_accuracy"] <= 1.0
    if rule == "flora":
        assert rows[0]["residual"] < 1e-6 and rows[1]["residual"] < 1e-6
        # round 2 downlink = head + round 1's stack (Σ r_k = 7 per layer) for every client
        head = rows[0]["bytes_down"] // 3
        assert rows[1]["bytes_down"] > rows[0]["bytes_down"] and rows[1]["bytes_down"] // 3 - head > 0
        from transformers import AutoModelForSequenceClassification

        from fedpeft.data.encoding import encode, make_loader
        from fedpeft.data.partition import prepare
        from fedpeft.models.adapters import load_tokenizer
        from fedpeft.training.local import evaluate

        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final_model")
        tok = load_tokenizer(cfg.model)
        data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients)
        examples = encode(data.test, tok, max_length=cfg.model.max_length, task=cfg.model.task)
        result = evaluate(model, make_loader(examples, pad_token_id=tok.pad_token_id, batch_size=64, shuffle=False))
        assert result.accuracy == pytest.approx(rows[-1]["test_accuracy"], abs=1e-9)
    else:
        reloaded = reload_and_evaluate(cfg, tmp_path)
        assert reloaded.accuracy == pytest.approx(rows[-1]["test_accuracy"], abs=1e-9)
    if rule == "lora_fair":
        assert all(r["residual"] <= r["fedavg_residual"] + 1e-12 for r in rows)


@pytest.mark.usefixtures("worker_counters")
def test_ffa_lora_a_is_bit_identical_on_every_client_and_round_and_halves_the_uplink(tmp_path):
    ffa_rows = execute(compose_cfg(["+exp=smoke", "strategy=ffa_lora"]), tmp_path / "ffa")
    crcs = {c["lora_a_crc32"] for r in ffa_rows for c in r["clients"]}
    assert len(crcs) == 1  # every client, every round: the same A
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ffa" / "final_adapter" / "adapter_model.safetensors")
    assert lora_a_crc32({k.replace(".weight", ".weight"): v for k, v in saved.items()}) == crcs.pop()
    fedavg_rows = execute(compose_cfg(["+exp=smoke", "strategy=fedavg"]), tmp_path / "fedavg")
    ratio = ffa_rows[0]["bytes_up"] / fedavg_rows[0]["bytes_up"]
    assert 0.5 <= ratio < 0.52  # B and the small head only


@pytest.mark.parametrize("rule", ["fedavg", "ffa_lora", "flora", "lora_fair"])
def test_dp_clients_work_with_every_rule_and_epsilon_composes(tmp_path, rule):
    from fedpeft.privacy.accounting import epsilon

    cfg = compose_cfg(
        [
            "+exp=smoke",
            f"strategy={rule}",
            "client=dp",
            "client.dp.target_epsilon=8",
            "client.local_steps=2",
            "save_adapter=false",
        ]
    )
    rows = execute(cfg, tmp_path)
    history: dict[int, list] = {}
    for row in rows:
        assert row["clients_replied"] == 3
        for c in row["clients"]:
            history.setdefault(c["partition"], []).append((c["noise_multiplier"], c["sample_rate"], c["dp_steps"]))
            # the reported ε is Opacus' ε for this client's whole history so far
            assert c["epsilon"] == pytest.approx(epsilon(history[c["partition"]], delta=1e-5), rel=1e-9)
        assert row["max_epsilon"] == max(c["epsilon"] for c in row["clients"])
    assert rows[-1]["max_epsilon"] <= 8.0 + 1e-6 and rows[-1]["max_epsilon"] > rows[0]["max_epsilon"]


def test_run_stops_at_the_communication_budget(tmp_path):
    rows = execute(compose_cfg(["+exp=smoke", "num_rounds=5", "comm_budget_mb=1.0"]), tmp_path)
    assert len(rows) == 1  # round 1 alone moves 0.9 MB up + 0.9 MB down
    assert (rows[0]["cumulative_bytes_up"] + rows[0]["cumulative_bytes_down"]) / 1e6 >= 1.0
    assert rows[0]["test_accuracy"] is not None and (tmp_path / "final_adapter").exists()
