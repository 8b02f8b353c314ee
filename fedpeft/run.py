"""Entry point: ``python -m fedpeft.run [+exp=<name>] [key=value ...]``.

Composes the Hydra config (typed by :mod:`fedpeft.config`), checks it before anything heavy
starts, writes the resolved config into the run directory and runs the chosen mode.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedpeft.config import Config, register_configs, to_config

log = logging.getLogger("fedpeft")
MODES = ("simulation", "deploy", "centralized")

register_configs()


def check_config(cfg: Config) -> None:
    """Every mistake that can be caught before training, raised as one clear ``ValueError``."""
    from fedpeft.data import check_data_config
    from fedpeft.llm import check_assets, check_llm_options, check_quantized_base
    from fedpeft.models import check_model_config, client_ranks, resolve_device
    from strategies import STRATEGIES, get_strategy

    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    for key in ("num_rounds", "num_clients", "clients_per_round"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.clients_per_round > cfg.num_clients:
        raise ValueError(f"clients_per_round={cfg.clients_per_round} exceeds num_clients={cfg.num_clients}")
    if cfg.min_clients > cfg.clients_per_round:
        raise ValueError(f"min_clients={cfg.min_clients} exceeds clients_per_round={cfg.clients_per_round}")
    if cfg.on_too_few not in ("stop", "retry"):
        raise ValueError(f"on_too_few must be 'stop' or 'retry', got {cfg.on_too_few!r}")
    for key in ("raise_prob", "hang_prob", "crash_prob"):
        if not 0.0 <= getattr(cfg.faults, key) <= 1.0:
            raise ValueError(f"faults.{key} must be in [0, 1], got {getattr(cfg.faults, key)}")
    if cfg.mode == "deploy":
        from fedpeft.deploy import check_deploy_config

        check_deploy_config(cfg)
    check_model_config(cfg.model)
    rule = get_strategy(cfg.strategy.name)
    if rule.peft_methods is not None and cfg.model.peft not in rule.peft_methods:
        accepting = sorted(name for name, r in STRATEGIES.items() if r.peft_methods is None or cfg.model.peft in r.peft_methods)
        raise ValueError(f"strategy={cfg.strategy.name} federates {'/'.join(rule.peft_methods)} adapters only, not model.peft={cfg.model.peft}; rules that accept it: {accepting}")
    client_ranks(cfg)
    check_data_config(cfg.data, num_clients=cfg.num_clients)
    check_llm_options(cfg.model, device=resolve_device(cfg.device))
    check_quantized_base(cfg.model, rule=cfg.strategy.name, moves_base=rule.moves_base)
    check_assets(cfg)  # a hub id that is neither cached nor reachable: one line saying what to download


def check_dp(cfg: Config, sizes: list[int]) -> None:
    """A DP target every client can reach, calibrated as the clients will (fails before training)."""
    from clients.job import dp_noise
    from clients.dp import DPError, check_dp_args
    from fedpeft.training import num_local_steps

    dp = cfg.client.dp
    if cfg.model.peft != "lora" and dp.grad_sample_mode == "lora":
        raise DPError(f"client.dp.grad_sample_mode=lora computes per-sample gradients of LoRA layers only; model.peft={cfg.model.peft} needs grad_sample_mode=loop")
    if (dp.noise_multiplier is None) == (dp.target_epsilon is None):
        raise DPError("client.dp: set exactly one of noise_multiplier and target_epsilon")
    if dp.noise_multiplier is not None and dp.noise_multiplier < 0:
        raise DPError(f"client.dp.noise_multiplier must be >= 0, got {dp.noise_multiplier}")
    if dp.max_grad_norm <= 0:
        raise DPError(f"client.dp.max_grad_norm must be > 0, got {dp.max_grad_norm}")
    for pid, n in enumerate(sizes):
        steps = num_local_steps(num_examples=n, batch_size=cfg.client.batch_size, local_epochs=cfg.client.local_epochs, local_steps=cfg.client.local_steps)
        check_dp_args(target_epsilon=dp.target_epsilon, delta=dp.delta, sample_rate=min(cfg.client.batch_size / n, 1.0))
        try:
            dp_noise(cfg, num_examples=n, steps=steps)
        except DPError as err:
            raise DPError(f"client {pid} ({n} examples): {err}") from None


def execute(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """Check ``cfg``, write it to ``run_dir/config.yaml`` and run it; returns the metrics rows."""
    check_config(cfg)
    from fedpeft import data as fdata

    if cfg.resume:  # continue in the interrupted run's own directory
        run_dir = Path(cfg.resume)
        if not run_dir.is_dir():
            raise ValueError(f"resume={cfg.resume!r}: no such run directory")
        if cfg.mode == "centralized":
            raise ValueError("resume works for federated runs (mode=simulation or mode=deploy)")
        from fedpeft.server import load_checkpoint

        load_checkpoint(run_dir, cfg)  # fails now, not after Ray started, if it does not fit
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    # Read and split the data once here, so a bad path or column fails before Ray starts.
    data = fdata.prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=cfg.model.task == "seq_cls")
    if cfg.client.dp.enabled:
        check_dp(cfg, [len(data.client_split(k)[0]) for k in range(cfg.num_clients)])
    if cfg.mode == "centralized":
        from fedpeft.server import run_centralized

        return run_centralized(cfg, run_dir)
    if cfg.mode == "deploy":
        from fedpeft.deploy import submit

        return submit(cfg, run_dir)
    from fedpeft.simulation import run_simulation

    return run_simulation(cfg, run_dir)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> float | None:
    cfg = to_config(dcfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    log.info("run directory: %s", run_dir)
    rows = execute(cfg, run_dir)
    final = rows[-1].get("test_accuracy") if rows else None
    log.info("done: final test accuracy %s; results in %s", "n/a" if final is None else f"{100 * final:.1f}%", run_dir)
    return final  # for Hydra sweepers


if __name__ == "__main__":
    main()
