"""Config composition: every experiment composes, typos and wrong types fail at composition."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from fedpeft.cli.configs import compose_config, register_configs
from fedpeft.config.schema import Config, evaluates, from_json, to_config, to_json
from fedpeft.run import check_config
from tests.conftest import CONF_DIR

register_configs()
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "exp").glob("*.yaml"))


compose_cfg = compose_config


def test_default_config_composes_and_passes_checks():
    cfg = compose_cfg([])
    assert isinstance(cfg, Config)
    assert (cfg.seed, cfg.num_rounds, cfg.num_clients, cfg.clients_per_round) == (0, 10, 10, 4)
    assert cfg.model.name_or_path == "embedded:minilm" and cfg.data.name == "embedded:bbc"
    check_config(cfg)


# Experiments on downloaded weights and data: checked here with local stand-ins (what a user passes
# as overrides); without them they fail at start (tests/fedpeft/test_llm.py).
NEEDS_DOWNLOADS = {"flora_dolly", "fedit_alpaca", "ffa_lora_gsm8k_dp"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_passes_checks(name, tmp_path):
    overrides = []
    if name in NEEDS_DOWNLOADS:
        from fedpeft.models.paths import tiny_llama_path

        local = tmp_path / "data.jsonl"
        local.write_text("{}")
        overrides = [
            f"model.name_or_path={tiny_llama_path(tmp_path)}",
            f"data.name={local}",
            f"evaluation.mc.name={local}",
            f"evaluation.generation.name={local}",
        ]
    cfg = compose_cfg([f"+exp={name}", *overrides])
    check_config(cfg)


def test_experiment_list_is_not_empty():
    assert "smoke" in EXPERIMENTS and "fedavg_hetero" in EXPERIMENTS


def test_every_rule_that_takes_heterogeneous_ranks_has_its_hetero_experiment():
    from fedpeft.strategies import STRATEGIES

    equal_ranks_only = {"fedex_lora"}  # refuses unequal ranks at start (tests/strategies/test_fedex_lora.py)
    for rule in sorted(set(STRATEGIES) - equal_ranks_only):
        cfg = compose_cfg([f"+exp={rule}_hetero"])
        assert cfg.strategy.name == rule and len(set(cfg.strategy.ranks)) > 1, rule


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("strategy.lamda=0.1", "lamda"),
        ("+client.learning_rate=0.1", "learning_rate"),
        ("num_rounds=ten", "num_rounds"),
        ("client.batch_size=1.5", "batch_size"),
    ],
)
def test_typo_or_wrong_type_fails_at_composition_naming_the_key(override, fragment):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as info:
        compose_cfg([override])
    assert fragment in str(info.value) or fragment in str(info.value.__cause__)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["strategy.name=fedprox"], "unknown strategy 'fedprox'"),
        (["strategy.ranks=[8,4]"], "strategy.ranks has 2 entries but num_clients is 10"),
        (["clients_per_round=11"], "clients_per_round=11 exceeds num_clients=10"),
        (["model.name_or_path=/nonexistent/model"], "does not exist"),
        (["data.partitioner=zipf"], "data.partitioner must be one of"),
        (["mode=federated"], "mode must be one of"),
    ],
)
def test_bad_values_fail_before_training(overrides, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        check_config(compose_cfg(overrides))


def test_a_rules_options_belong_to_it():
    cfg = compose_cfg(["strategy=lora_fair", "strategy.lam=0.1", "strategy.method=frobenius"])
    assert (cfg.strategy.lam, cfg.strategy.method) == (0.1, "frobenius")
    assert type(from_json(to_json(cfg)).strategy) is type(cfg.strategy)
    with pytest.raises(ConfigCompositionException, match="strategy.lam"):
        compose_cfg(["strategy=fedavg", "strategy.lam=0.1"])
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="lam"):
        compose_cfg(["strategy=fedavg", "+strategy.lam=0.1"])


def test_json_round_trip_is_exact():
    cfg = compose_cfg(["+exp=fedavg_hetero", "seed=7"])
    again = from_json(to_json(cfg))
    assert again == cfg and again.strategy.ranks == cfg.strategy.ranks


def test_ranks_from_resource_tiers():
    from fedpeft.models.adapters import client_ranks

    cfg = compose_cfg(["+exp=flora_tiers"])
    assert client_ranks(cfg) == [16, 16, 4, 4, 4, 1, 1, 1, 1, 1]
    bad = compose_cfg(
        ["+exp=flora_tiers", "strategy.client_tiers=[gpu,gpu,laptop,laptop,laptop,phone,phone,phone,phone,watch]"]
    )
    with pytest.raises(ValueError, match=r"unknown tiers \['watch'\]"):
        check_config(bad)


@pytest.mark.parametrize(
    ("eval_every", "num_rounds", "scored"), [(1, 3, [1, 2, 3]), (2, 5, [2, 4, 5]), (3, 6, [3, 6]), (10, 4, [4])]
)
def test_the_test_split_is_scored_every_eval_every_rounds_and_after_the_last(eval_every, num_rounds, scored):
    cfg = to_config({"eval_every": eval_every, "num_rounds": num_rounds})
    assert [t for t in range(1, num_rounds + 1) if evaluates(cfg, t)] == scored
