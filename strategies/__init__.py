"""Aggregation rules, one file each. Pick one by name: ``STRATEGIES[cfg.strategy.name]``."""

from __future__ import annotations

from strategies.base import LoRAStrategy
from strategies.fedavg import FedIT
from strategies.fedex_lora import FedExLoRA
from strategies.fedsa_lora import FedSALoRA
from strategies.fedsvd import FedSVD
from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.hetlora import HetLoRA
from strategies.lora_fair import LoRAFAIR
from strategies.rolora import RoLoRA

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
