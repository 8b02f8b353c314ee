"""Aggregation rules, one file each. Pick one by name: ``STRATEGIES[cfg.strategy.name]``."""

from __future__ import annotations

from strategies.base import LoRAStrategy
from strategies.fedavg import FedIT
from strategies.ffa_lora import FFALoRA
from strategies.flora import FLoRA
from strategies.lora_fair import LoRAFAIR

STRATEGIES: dict[str, type[LoRAStrategy]] = {
    "fedavg": FedIT,
    "ffa_lora": FFALoRA,
    "flora": FLoRA,
    "lora_fair": LoRAFAIR,
}


def get_strategy(name: str) -> type[LoRAStrategy]:
    """The strategy class registered as ``name``; an unknown name lists the valid ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid: {sorted(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "LoRAStrategy", "get_strategy"]
