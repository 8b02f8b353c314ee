"""The Hydra side of the config: the YAML shipped in ``fedpeft.conf``, its schemas in the ConfigStore.

The schema dataclasses live in :mod:`fedpeft.config.schema`, which knows no rule; here, at the top
of the package, the rule registry is imported and each rule's config dataclass is stored as
``strategy/<name>_schema``, so an option of another rule fails at composition.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from fedpeft import strategies  # noqa: F401  (registers the rules' config dataclasses with the schema)
from fedpeft.config.schema import Config, required, rule_schemas, to_config

CONF_MODULE = "fedpeft.conf"  # the YAML is package data: Hydra reads it by package, so a wheel runs anywhere
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def register_configs() -> None:
    """Register the schemas: ``conf/config.yaml`` extends ``schema``, and each ``conf/strategy/<name>.yaml``
    its rule's ``<name>_schema`` (the rule's config dataclass, ``STRATEGIES[name].config_class``)."""
    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", required)
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for name, config_class in rule_schemas().items():
        cs.store(group="strategy", name=f"{name}_schema", node=config_class)


def compose_config(overrides: list[str]) -> Config:
    """The typed config ``python -m fedpeft.run <overrides>`` would run, composed without starting a run
    (for scripts and tests)."""
    register_configs()
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))
