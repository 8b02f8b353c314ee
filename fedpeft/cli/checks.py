"""Everything about a run that can be checked before Ray starts.

:func:`check_run` is what ``python -m fedpeft.run`` calls first: a mistake in the config, the model,
the data or the machine stops the run here with one ``ValueError`` naming the key or the file,
instead of after Ray started and a round ran (or never, when a setting is silently ignored).

In order of cost:

1. :func:`check_config` — the config alone (counts, optimiser and DP settings, ranks).
2. :func:`check_resources` — what a simulated client asks of this machine (CPUs, GPUs).
3. :func:`check_model` — the model's architecture, built on the ``meta`` device (no weights read):
   every target module matched, every rank within the adapted layers, ``max_length`` within the
   model's positions.
4. The data, read and split once by :func:`fedpeft.data.partition.prepare` (its own errors name the file),
   and the DP target every client must reach (:func:`check_dp`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import fields
from typing import cast

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

from fedpeft.clients.dp import MODES as DP_MODES
from fedpeft.clients.job import dp_noise  # the clients' own calibration, so the check cannot drift from it
from fedpeft.compression.compeft import codec_from_config
from fedpeft.config.schema import Config, ConfigError, DeployConfig, DPConfig
from fedpeft.data.partition import FederatedData, check_data_config, prepare
from fedpeft.engines.deploy.submit import check_deploy_config
from fedpeft.engines.ray import check_engine
from fedpeft.models.adapters import RANKED, check_model_config, client_ranks, resolve_device
from fedpeft.models.llm import check_assets, check_llm_options, check_quantized_base
from fedpeft.models.paths import ModelError, resolve_model_path
from fedpeft.privacy.accounting import ACCOUNTANTS, DPError, check_dp_args
from fedpeft.privacy.audit import check_audit_config, client_train_split
from fedpeft.reporting.metrics import LOGGERS
from fedpeft.strategies import STRATEGIES, get_strategy
from fedpeft.training.local import AUTOCAST_DTYPES, num_local_steps

MODES = ("simulation", "deploy", "centralized", "local")


def check_config(cfg: Config) -> None:
    """The mistakes visible in the config alone, raised as one ``ConfigError`` naming the key."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    for key in ("num_rounds", "num_clients", "clients_per_round", "eval_every", "server_eval_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.clients_per_round > cfg.num_clients:
        raise ConfigError(f"clients_per_round={cfg.clients_per_round} exceeds num_clients={cfg.num_clients}")
    if cfg.min_clients > cfg.clients_per_round:
        raise ConfigError(f"min_clients={cfg.min_clients} exceeds clients_per_round={cfg.clients_per_round}")
    if cfg.on_too_few not in ("stop", "retry"):
        raise ConfigError(f"on_too_few must be 'stop' or 'retry', got {cfg.on_too_few!r}")
    if cfg.round_timeout <= 0:
        raise ConfigError(f"round_timeout must be > 0 seconds, got {cfg.round_timeout}")
    if cfg.comm_budget_mb is not None and cfg.comm_budget_mb <= 0:
        raise ConfigError(f"comm_budget_mb must be > 0 (or null), got {cfg.comm_budget_mb}")
    for key in ("raise_prob", "hang_prob", "crash_prob"):
        if not 0.0 <= getattr(cfg.faults, key) <= 1.0:
            raise ConfigError(f"faults.{key} must be in [0, 1], got {getattr(cfg.faults, key)}")
    check_client(cfg)
    check_dp_settings(cfg.client.dp, peft=cfg.model.peft)
    if cfg.mode in ("centralized", "local") and cfg.client.dp.enabled:
        raise ConfigError(
            f"client.dp.enabled: DP-SGD runs in the federated clients; mode={cfg.mode} trains without it "
            "(drop client=dp)"
        )
    if cfg.model.max_length < 1:
        raise ConfigError(f"model.max_length must be >= 1, got {cfg.model.max_length}")
    if not 0.0 <= cfg.model.lora.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {cfg.model.lora.dropout}")
    if cfg.model.lora.alpha <= 0:
        raise ConfigError(f"model.lora.alpha must be > 0, got {cfg.model.lora.alpha}")
    if not cfg.model.lora.target_modules:
        raise ConfigError("model.lora.target_modules is empty: name the modules LoRA adapts, e.g. [query,value]")
    if cfg.logger not in LOGGERS:
        raise ConfigError(f"logger must be one of {LOGGERS}, got {cfg.logger!r}")
    if cfg.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "logger=tensorboard needs the tensorboard package: pip install tensorboard (or pip install -e "
            "'.[tensorboard]')"
        )
    if cfg.mode == "deploy":
        check_deploy_config(cfg)
    else:
        default = DeployConfig()
        changed = [
            f"deploy.{f.name}={getattr(cfg.deploy, f.name)}"
            for f in fields(DeployConfig)
            if getattr(cfg.deploy, f.name) != getattr(default, f.name)
        ]
        if changed:
            raise ConfigError(
                f"{' '.join(changed)} has no effect with mode={cfg.mode}: add mode=deploy to submit "
                "the run to a SuperLink"
            )
    check_model_config(cfg.model)
    rule = get_strategy(cfg.strategy.name)
    if rule.peft_methods is not None and cfg.model.peft not in rule.peft_methods:
        accepting = sorted(
            name for name, r in STRATEGIES.items() if r.peft_methods is None or cfg.model.peft in r.peft_methods
        )
        raise ConfigError(
            f"strategy={cfg.strategy.name} federates {'/'.join(rule.peft_methods)} adapters only, not "
            f"model.peft={cfg.model.peft}; rules that accept it: {accepting}"
        )
    client_ranks(cfg)
    rule.check_config(cfg)
    check_engine(cfg)
    codec_from_config(cfg.compression)
    check_audit_config(cfg)
    check_data_config(cfg.data, num_clients=cfg.num_clients)
    check_llm_options(cfg.model, device=resolve_device(cfg.device))
    if cfg.model.autocast is not None:
        if cfg.model.autocast not in AUTOCAST_DTYPES:
            raise ConfigError(
                f"model.autocast={cfg.model.autocast!r}: choose one of {list(AUTOCAST_DTYPES)} or null (off)"
            )
        if cfg.model.dtype != "float32":
            raise ConfigError(
                f"model.autocast={cfg.model.autocast} with model.dtype={cfg.model.dtype}: autocast is mixed precision "
                f"over a float32 base; a {cfg.model.dtype} base already computes in {cfg.model.dtype}"
            )
        if cfg.client.dp.enabled and cfg.client.dp.grad_sample_mode == "opacus":
            raise ConfigError(
                f"model.autocast={cfg.model.autocast} with client.dp.grad_sample_mode=opacus: Opacus' hooks would "
                "compute the per-sample gradients in bf16; use grad_sample_mode=lora or loop (per-sample gradients, "
                "clipping and noise in float32) or drop model.autocast"
            )
    if cfg.model.dtype == "float16" and cfg.client.dp.enabled:
        raise ConfigError(
            "model.dtype=float16 with client.dp: DP-SGD's per-sample gradients get no loss scaling and underflow in "
            "float16; use model.dtype=bfloat16"
        )
    if cfg.model.dtype == "float16" and cfg.mode == "simulation" and cfg.engine.name == "batched":
        raise ConfigError(
            "model.dtype=float16 with engine=batched: the batched pass has no loss scaler; use model.dtype=bfloat16 "
            "or engine=ray"
        )
    check_quantized_base(
        cfg.model,
        rule=cfg.strategy.name,
        moves_base=rule.moves_base,
        fixed_base_rules=tuple(n for n, r in STRATEGIES.items() if not r.moves_base),
    )
    check_assets(cfg)  # a hub id that is neither cached nor reachable: one line saying what to download


def check_client(cfg: Config) -> None:
    """Local training settings: every client takes at least one optimiser step with a positive lr."""
    c = cfg.client
    for key in ("batch_size", "eval_batch_size"):
        if getattr(c, key) < 1:
            raise ConfigError(f"client.{key} must be >= 1, got {getattr(c, key)}")
    if not (c.lr > 0 and math.isfinite(c.lr)):
        raise ConfigError(f"client.lr must be > 0, got {c.lr}")
    if not 0.0 < c.lr_decay <= 1.0:
        raise ConfigError(
            f"client.lr_decay must lie in (0, 1] (the rate of round t is lr · lr_decay^(t-1)), got {c.lr_decay}"
        )
    if c.weight_decay < 0:
        raise ConfigError(f"client.weight_decay must be >= 0, got {c.weight_decay}")
    if c.local_steps < 0:
        raise ConfigError(
            f"client.local_steps must be > 0 (or 0 to train client.local_epochs epochs), got {c.local_steps}"
        )
    if c.local_steps == 0 and c.local_epochs < 1:
        raise ConfigError(
            f"client.local_steps=0 trains client.local_epochs epochs, which must then be >= 1, got {c.local_epochs}"
        )
    if c.num_cpus <= 0:
        raise ConfigError(f"client.num_cpus must be > 0, got {c.num_cpus}")
    if c.num_gpus < 0:
        raise ConfigError(f"client.num_gpus must be >= 0, got {c.num_gpus}")


def check_dp_settings(dp: DPConfig, *, peft: str = "lora") -> None:
    """DP options take effect only with ``client=dp``: set without it they would be silently ignored."""
    if dp.enabled is False:  # off on purpose (client.dp.enabled=false): the other settings are ignored knowingly
        return
    if not dp.enabled:
        default = DPConfig()
        changed = [f.name for f in fields(DPConfig) if getattr(dp, f.name) != getattr(default, f.name)]
        if changed:
            settings = " ".join(f"client.dp.{k}={getattr(dp, k)}" for k in changed)
            raise ConfigError(
                f"{settings} has no effect: DP is off. Add client=dp to train with DP-SGD (or client.dp.enabled=true)"
            )
        return
    if dp.grad_sample_mode not in DP_MODES:
        raise ConfigError(f"client.dp.grad_sample_mode must be one of {DP_MODES}, got {dp.grad_sample_mode!r}")
    if peft != "lora" and dp.grad_sample_mode == "lora":
        raise ConfigError(
            f"client.dp.grad_sample_mode=lora computes per-sample gradients of LoRA layers only; model.peft={peft} "
            "needs grad_sample_mode=loop"
        )
    if dp.accountant not in ACCOUNTANTS:
        raise ConfigError(f"client.dp.accountant must be one of {ACCOUNTANTS}, got {dp.accountant!r}")
    if (dp.noise_multiplier is None) == (dp.target_epsilon is None):
        raise ConfigError("client.dp: set exactly one of noise_multiplier and target_epsilon")
    if dp.noise_multiplier is not None and dp.noise_multiplier < 0:
        raise ConfigError(f"client.dp.noise_multiplier must be >= 0, got {dp.noise_multiplier}")
    if dp.target_epsilon is not None and dp.target_epsilon <= 0:
        raise ConfigError(f"client.dp.target_epsilon must be > 0, got {dp.target_epsilon}")
    if not 0.0 < dp.delta < 1.0:
        raise ConfigError(f"client.dp.delta must be in (0, 1), got {dp.delta}")
    if dp.max_grad_norm <= 0:
        raise ConfigError(f"client.dp.max_grad_norm must be > 0, got {dp.max_grad_norm}")


def check_resources(cfg: Config, *, cpus: int | None = None, gpus: int | None = None) -> None:
    """A simulated client must fit on this machine: Ray would start no actor and Flower would wait forever."""
    if cfg.mode == "deploy":
        return  # the SuperNodes' machines, not this one, run the clients
    cpus = machine_cpus() if cpus is None else cpus
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if cfg.mode == "simulation" and cfg.client.num_cpus > cpus:
        raise ConfigError(
            f"client.num_cpus={cfg.client.num_cpus:g} but this machine has {cpus} CPU cores: no client could start"
        )
    if cfg.client.num_gpus > 0 and gpus == 0:
        raise ConfigError(f"client.num_gpus={cfg.client.num_gpus:g} but this machine has no CUDA GPU")
    if cfg.client.num_gpus > gpus:
        raise ConfigError(
            f"client.num_gpus={cfg.client.num_gpus:g} but this machine has {gpus} GPU(s): no client could start"
        )
    try:
        resolve_device(cfg.device)
    except (ModelError, RuntimeError) as err:
        raise ConfigError(f"device={cfg.device!r}: {err}") from None


def machine_cpus() -> int:
    """The CPU cores this process may use (its affinity mask, as Ray counts them in a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def positions(config: PretrainedConfig) -> int | None:
    """The longest input the model's position embeddings allow (None: no fixed limit)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def skeleton(cfg: Config) -> nn.Module:
    """The configured model's modules on the ``meta`` device: its architecture, no weights read."""

    path = resolve_model_path(cfg.model.name_or_path)
    try:
        config = (
            AutoConfig.from_pretrained(path, num_labels=2)
            if cfg.model.task == "seq_cls"
            else AutoConfig.from_pretrained(path)
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the config of model {cfg.model.name_or_path!r}: {err}") from None
    auto = AutoModelForSequenceClassification if cfg.model.task == "seq_cls" else AutoModelForCausalLM
    with torch.device("meta"):
        try:
            return auto.from_config(config)
        except ValueError as err:  # e.g. a causal LM asked for sequence classification
            raise ModelError(f"model {cfg.model.name_or_path!r} cannot do task={cfg.model.task!r}: {err}") from None


def matches(name: str, target: str) -> bool:
    """peft's rule for a ``target_modules`` / ``modules_to_save`` entry: the name, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def check_model(cfg: Config, model: nn.Module | None = None) -> None:
    """Target modules, ranks and ``max_length`` against the model's architecture (``model``: a skeleton)."""
    model = skeleton(cfg) if model is None else model
    lora = cfg.model.lora
    # torch types a module's attributes as Tensor | Module; a transformers model's .config is its PretrainedConfig
    limit = positions(cast(PretrainedConfig, model.config)) if hasattr(model, "config") else None
    if limit is not None and cfg.model.max_length > limit:
        raise ConfigError(
            f"model.max_length={cfg.model.max_length} exceeds the {limit} positions of model {cfg.model.name_or_path!r}"
        )
    named = dict(model.named_modules())
    if cfg.model.peft == "prompt_tuning":
        return  # virtual tokens: no module is adapted, no rank
    if list(lora.target_modules) != ["all-linear"]:
        unmatched = [t for t in lora.target_modules if not any(matches(n, t) for n in named)]
        if unmatched:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in named.items() if isinstance(m, nn.Linear)})
            raise ConfigError(
                f"model.lora.target_modules {unmatched} match no module of {cfg.model.name_or_path!r}; its linear "
                f"layers are named {leaves}"
            )
    for target in lora.modules_to_save:
        if not any(matches(n, target) for n in named):
            raise ConfigError(
                f"model.lora.modules_to_save entry {target!r} matches no module of {cfg.model.name_or_path!r}"
            )
    adapted = {n: m for n, m in named.items() if _adapted(n, m, lora.target_modules)}
    widths = {
        n: min(m.weight.shape)
        for n, m in adapted.items()
        if getattr(m, "weight", None) is not None and m.weight.dim() == 2
    }
    if widths and cfg.model.peft in RANKED:
        name = min(widths, key=lambda k: widths[k])
        rank = max(r for r in client_ranks(cfg) if r is not None)
        if rank > widths[name]:
            raise ConfigError(
                f"LoRA rank {rank} exceeds the smallest adapted dimension, {widths[name]} ({name} is "
                f"{tuple(adapted[name].weight.shape)}); "
                f"use ranks <= {widths[name]}"
            )


def _adapted(name: str, module: nn.Module, targets: list[str]) -> bool:
    if list(targets) == ["all-linear"]:
        return isinstance(module, nn.Linear)
    return any(matches(name, t) for t in targets)


def check_dp(cfg: Config, sizes: list[int]) -> None:
    """A DP target every client can reach, calibrated as the clients will (fails before training)."""
    dp = cfg.client.dp
    for pid, n in enumerate(sizes):
        steps = num_local_steps(
            num_examples=n,
            batch_size=cfg.client.batch_size,
            local_epochs=cfg.client.local_epochs,
            local_steps=cfg.client.local_steps,
        )
        check_dp_args(target_epsilon=dp.target_epsilon, delta=dp.delta, sample_rate=min(cfg.client.batch_size / n, 1.0))
        try:
            dp_noise(cfg, num_examples=n, steps=steps)
        except DPError as err:
            raise DPError(f"client {pid} ({n} examples): {err}") from None


def check_run(cfg: Config) -> FederatedData:
    """Every check above, cheapest first; returns the prepared data (read once, cached per process)."""
    check_config(cfg)
    check_resources(cfg)
    check_model(cfg)
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=cfg.model.task == "seq_cls")
    if cfg.client.dp.enabled:
        check_dp(cfg, [len(client_train_split(cfg, data, k)) for k in range(cfg.num_clients)])  # planted canaries count
    return data
