"""Any peft method under FedAvg: IA3, prompt tuning and DoRA federate through the same plans, and the
final adapter loads with plain ``PeftModel.from_pretrained``. LoRA-factor rules refuse them at start.

The server loop runs over an in-process Grid that calls the real ClientApp (no Ray).
"""

from __future__ import annotations

import pytest

from fedpeft.cli.configs import compose_config
from fedpeft.clients.app import app
from fedpeft.run import check_config
from fedpeft.server.loop import run_federated
from tests.fakegrid import InProcessGrid

TINY = [
    "+exp=smoke",
    "num_rounds=1",
    "num_clients=2",
    "clients_per_round=2",
    "client.local_steps=2",
    "data.max_samples=60",
    "model.max_length=32",
]


def run(tmp_path, *overrides: str):
    cfg = compose_config([*TINY, *overrides])
    check_config(cfg)
    rows = run_federated(cfg, InProcessGrid(app, [{"partition-id": k} for k in range(cfg.num_clients)]), tmp_path)
    return cfg, rows


def reload_accuracy(cfg, run_dir) -> float:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedpeft.data.encoding import encode, make_loader
    from fedpeft.data.partition import prepare
    from fedpeft.models.paths import resolve_model_path
    from fedpeft.training.local import evaluate

    path = resolve_model_path(cfg.model.name_or_path)
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients)
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=data.num_labels),
        str(run_dir / "final_adapter"),
    )
    tok = AutoTokenizer.from_pretrained(path)
    examples = encode(data.test, tok, max_length=cfg.model.max_length, task=cfg.model.task)
    return evaluate(model, make_loader(examples, pad_token_id=tok.pad_token_id, batch_size=64, shuffle=False)).accuracy


@pytest.mark.parametrize("peft", ["ia3", "prompt_tuning", "dora"])
def test_fedavg_federates_any_peft_method_and_plain_peft_reloads_it(tmp_path, peft):
    # Execute
    cfg, rows = run(tmp_path, "strategy=fedavg", f"model.peft={peft}")
    # Assert
    (row,) = rows
    assert row["clients_replied"] == 2 and row["clients_rejected"] == 0
    assert row["bytes_up"] == row["bytes_down"] > 0  # the whole adapter both ways, counted as for LoRA
    assert (row["residual"] is None) == (peft != "dora")  # a residual only where there are LoRA factors
    assert all(("rank" in c) == (peft == "dora") for c in row["clients"])
    assert reload_accuracy(cfg, tmp_path) == pytest.approx(row["test_accuracy"], abs=1e-9)


def test_dp_trains_a_non_lora_adapter(tmp_path):
    _, rows = run(
        tmp_path,
        "strategy=fedavg",
        "model.peft=ia3",
        "client=dp",
        "client.dp.target_epsilon=8",
        "client.dp.grad_sample_mode=loop",
        "save_adapter=false",
    )
    assert rows[0]["clients_replied"] == 2 and 0 < rows[0]["max_epsilon"] <= 8


@pytest.mark.parametrize("rule", ["ffa_lora", "flora", "lora_fair"])
def test_lora_factor_rules_refuse_another_adapter_naming_the_rules_that_accept_it(rule):
    with pytest.raises(
        ValueError,
        match=rf"strategy={rule} federates lora adapters only, not model.peft=ia3; rules that accept it: \['fedavg'\]",
    ):
        check_config(compose_config([f"strategy={rule}", "model.peft=ia3"]))
    with pytest.raises(ValueError, match="model.peft=ia3 has none"):
        check_config(compose_config(["strategy=fedavg", "model.peft=ia3", "strategy.ranks=[1,2,3,4,5,6,7,8,9,10]"]))
