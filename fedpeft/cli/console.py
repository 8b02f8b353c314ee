"""What a person sees of a run besides its round lines: the header before it starts, the summary after it.

The lines are built by plain functions (:func:`header_lines`, :func:`summary_lines`; the round line
is :func:`fedpeft.reporting.lines.round_line`) so that a simulated, a deployed and a centralised run
print the same thing; :func:`show` logs them (:mod:`fedpeft.reporting.logs` decides where they go).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedpeft.config.schema import Config
from fedpeft.models.adapters import client_ranks
from fedpeft.models.paths import resolve_model_path
from fedpeft.reporting.lines import hms, pct
from fedpeft.reporting.logs import RUN_LOG
from fedpeft.strategies import get_strategy

log = logging.getLogger("fedpeft")


def header_lines(cfg: Config, run_dir: Path, *, data: Any = None, device: str | None = None) -> list[str]:
    """What this run is, before it starts: rule, model, data, clients and ranks, engine, device, DP, run dir."""
    lora = cfg.model.lora
    peft = getattr(cfg.model, "peft", "lora")
    rule = get_strategy(cfg.strategy.name).__name__
    if cfg.mode == "centralized":
        head = f"fedpeft: centralised LoRA reference (mode=centralized), {cfg.num_rounds} rounds, seed {cfg.seed}"
    elif cfg.mode == "local":
        head = (
            f"fedpeft: local-only bound (mode=local: each client trains alone), {cfg.num_rounds} rounds, "
            f"seed {cfg.seed}"
        )
    else:
        head = f"fedpeft: {rule} (strategy={cfg.strategy.name}), {cfg.num_rounds} rounds, seed {cfg.seed}"
    lines = [head]
    lines.append(
        f"  model   {cfg.model.name_or_path} ({cfg.model.task}, max_length {cfg.model.max_length}, {cfg.model.dtype}); "
        + (
            f"LoRA on {', '.join(lora.target_modules)}, alpha {lora.alpha:g} at r={lora.r}"
            if peft == "lora"
            else f"peft method {peft}"
        )
        + (f", trains {', '.join(lora.modules_to_save)}" if lora.modules_to_save else "")
    )
    sizes = (
        f": {len(data.train)} train / {len(data.test)} test examples, {data.num_labels} labels"
        if data is not None
        else ""
    )
    split = cfg.data.partitioner + (
        f" (alpha {cfg.data.dirichlet_alpha:g})" if cfg.data.partitioner == "dirichlet" else ""
    )
    lines.append(f"  data    {cfg.data.name}{sizes}; {split} over {cfg.num_clients} clients")
    if cfg.mode != "centralized":
        ranks = client_ranks(cfg)
        if ranks[0] is None:
            shown = f"none (model.peft={cfg.model.peft})"
        else:
            shown = f"all {ranks[0]}" if len(set(ranks)) == 1 else " ".join(map(str, ranks))
        lines.append(f"  clients {cfg.num_clients}, {cfg.clients_per_round} per round; ranks {shown}")
    step = (
        f"{cfg.client.local_steps} local steps"
        if cfg.client.local_steps > 0
        else f"{cfg.client.local_epochs} local epoch(s)"
    )
    decay = f" × {cfg.client.lr_decay:g}^(round-1)" if cfg.client.lr_decay != 1.0 else ""
    lines.append(f"  train   {step}, batch {cfg.client.batch_size}, lr {cfg.client.lr:g}{decay}")
    if cfg.mode == "simulation":
        engine = f"Flower simulation on Ray, {cfg.client.num_cpus:g} CPU / {cfg.client.num_gpus:g} GPU per client"
    elif cfg.mode == "deploy":
        engine = f"Flower deployment: SuperLink {cfg.deploy.superlink} ({'insecure' if cfg.deploy.insecure else 'TLS'})"
    elif cfg.mode == "local":
        engine = "one process, every client in turn, no communication"
    else:
        engine = "one process, pooled data"
    lines.append(f"  engine  {engine}; device {device or cfg.device}")
    dp = cfg.client.dp
    if dp.enabled:
        budget = (
            f"target epsilon {dp.target_epsilon:g}"
            if dp.target_epsilon is not None
            else f"noise multiplier {dp.noise_multiplier:g}"
        )
        lines.append(
            f"  DP      DP-SGD, {budget}, delta {dp.delta:g}, clip {dp.max_grad_norm:g} ({dp.grad_sample_mode} "
            "per-sample gradients)"
        )
    else:
        lines.append("  DP      off")
    lines.append(f"  run dir {run_dir}")
    return lines


def load_hint(cfg: Config, artifact: Path, *, num_labels: int | None = None) -> str:
    """The Python that loads the final model or adapter written by the run."""
    auto = "AutoModelForSequenceClassification" if cfg.model.task == "seq_cls" else "AutoModelForCausalLM"
    if artifact.name == "final_model":
        return f"{auto}.from_pretrained({str(artifact)!r})"
    base = cfg.model.name_or_path
    try:
        base = resolve_model_path(base)
    except ValueError:
        pass
    labels = f", num_labels={num_labels if num_labels else '<labels>'}" if cfg.model.task == "seq_cls" else ""
    return f"PeftModel.from_pretrained({auto}.from_pretrained({base!r}{labels}), {str(artifact)!r})"


def summary_lines(
    rows: list[dict[str, Any]], *, cfg: Config, run_dir: Path, seconds: float, num_labels: int | None = None
) -> list[str]:
    """The end of a run: final and best accuracy, time, traffic, where everything is and how to load it."""
    if not rows:
        return [
            f"done in {hms(seconds)}; no rounds recorded here (a deployed run writes its results "
            "on the SuperLink's machine)"
        ]
    last = rows[-1]
    scored = [r for r in rows if r.get("test_accuracy") is not None]
    best = max(scored, key=lambda r: r["test_accuracy"]) if scored else None
    accuracy = f"final accuracy {pct(last.get('test_accuracy'))}"
    if best is not None:
        accuracy += f", best {pct(best['test_accuracy'])} (round {best['round']})"
    traffic = (
        f"{last.get('cumulative_bytes_up', 0) / 1e6:.2f} MB up, "
        f"{last.get('cumulative_bytes_down', 0) / 1e6:.2f} MB down"
    )
    lines = [f"done: {len(rows)} rounds in {hms(seconds)}; {accuracy}; {traffic}"]
    lines.append(f"  metrics {run_dir / 'metrics.csv'} (per round), metrics.jsonl (and per client)")
    for name in ("final_adapter", "final_model"):
        artifact = run_dir / name
        if artifact.exists():
            lines.append(f"  {'adapter' if name == 'final_adapter' else 'model  '} {artifact}")
            lines.append(f"          load: {load_hint(cfg, artifact, num_labels=num_labels)}")
    lines.append(f"  log     {run_dir / RUN_LOG}")
    return lines


def show(lines: list[str]) -> None:
    """Log ``lines`` as fedpeft's own: the console shows them, ``run.log`` keeps them."""
    for line in lines:
        log.info("%s", line)
