"""Aggregation rules, one file each. Pick one by name: ``STRATEGIES[cfg.strategy.name]``."""

from __future__ import annotations

from fedpeft.config.schema import use_rule_schemas
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.fedavg import FedIT
from fedpeft.strategies.fedex_lora import FedExLoRA
from fedpeft.strategies.fedsa_lora import FedSALoRA
from fedpeft.strategies.fedsvd import FedSVD
from fedpeft.strategies.ffa_lora import FFALoRA
from fedpeft.strategies.flexlora import FlexLoRA
from fedpeft.strategies.flora import FLoRA
from fedpeft.strategies.hetlora import HetLoRA
from fedpeft.strategies.lora_fair import LoRAFAIR
from fedpeft.strategies.rolora import RoLoRA

STRATEGIES: dict[str, type[LoRAStrategy]] = {
    "fedavg": FedIT,
    "ffa_lora": FFALoRA,
    "flora": FLoRA,
    "lora_fair": LoRAFAIR,
    "fedex_lora": FedExLoRA,
    "flexlora": FlexLoRA,
    "fedsa_lora": FedSALoRA,
    "rolora": RoLoRA,
    "fedsvd": FedSVD,
    "hetlora": HetLoRA,
}


def get_strategy(name: str) -> type[LoRAStrategy]:
    """The strategy class registered as ``name``; an unknown name lists the valid ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid: {sorted(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "LoRAStrategy", "get_strategy"]


use_rule_schemas(lambda: {name: rule.config_class for name, rule in STRATEGIES.items()})
