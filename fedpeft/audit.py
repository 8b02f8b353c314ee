"""``python -m fedpeft.audit <run dir>``: the privacy audit of a finished run.

The command (or ``audit.enabled=true`` on the run) writes ``<run dir>/audit.json`` with

* **membership inference** on the final global model: the loss-threshold AUC and its calibrated
  variant (against the round-0 model) of each client's training examples versus held-out ones,
  overall and per client. Held-out ("non-members") are the server's test split and every client's
  validation slice: examples no client trained on, drawn from the same pool.
* **canary exposure** (causal LMs, ``audit.canaries``): how far the final model ranks the secrets
  planted in one client's training data above random candidates, in bits.

The measurements themselves (and their references) are :mod:`fedpeft.privacy.audit`'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fedpeft.config.schema import Config, to_config
from fedpeft.data.encoding import encode_config
from fedpeft.data.partition import prepare
from fedpeft.models import adapters as models
from fedpeft.privacy.audit import (
    canary_examples,
    example_losses,
    exposure,
    make_canaries,
    membership_report,
    sequence_nll,
    subsample,
)
from fedpeft.server.evaluation import initial_adapter

log = logging.getLogger("fedpeft")

AUDIT_FILE = "audit.json"


def load_final_model(cfg: Config, run_dir: Path, *, num_labels: int, device: torch.device) -> torch.nn.Module:
    """The run's final global model: base + ``final_adapter/`` (peft), or ``final_model/`` (FLoRA, merged)."""
    if (run_dir / "final_model").is_dir():
        cls = AutoModelForSequenceClassification if cfg.model.task == "seq_cls" else AutoModelForCausalLM
        return cls.from_pretrained(run_dir / "final_model").to(device)
    if not (run_dir / "final_adapter").is_dir():
        raise FileNotFoundError(
            f"{run_dir} has neither final_adapter/ nor final_model/: was the run finished with save_adapter=true?"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the head as every process of the run built it (overwritten by the adapter's copy)
        base = models.load_base_model(cfg.model, num_labels=num_labels)
    return PeftModel.from_pretrained(base, str(run_dir / "final_adapter")).to(device)


def round0_model(cfg: Config, *, num_labels: int, device: torch.device) -> torch.nn.Module:
    """The model every client started from (base, B = 0, seeded A and head): the calibration reference."""
    cm = models.cached_model(cfg.model, num_labels=num_labels, device=device, seed=cfg.seed)
    rank = max(
        (r for r in models.client_ranks(cfg) if r is not None), default=None
    )  # the global adapter's rank, as fedpeft.server.loop builds it
    adapter = initial_adapter(cm, rank=rank, seed=cfg.seed)
    cm.load_adapter_state(rank, adapter)
    return cm.model


def run_audit(run_dir: str | Path, *, cfg: Config | None = None) -> dict[str, Any]:
    """Audit a finished run directory (its final model; the config from ``config.yaml`` unless given).

    Writes and returns ``audit.json``. Members are the clients' examples as the run's own
    partitions define them: a deployed node training on its own ``data-path`` keeps its data, and
    only its owner can audit it.
    """
    run_dir = Path(run_dir)
    if cfg is None:
        if not (run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"{run_dir} has no config.yaml: not a fedpeft run directory")
        cfg = to_config(OmegaConf.load(run_dir / "config.yaml"))
    settings = cfg.audit
    device = models.resolve_device(cfg.device)
    task = cfg.model.task
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=task == "seq_cls")
    tokenizer = models.load_tokenizer(cfg.model)
    pad = tokenizer.pad_token_id

    def encode(ds) -> list:
        return encode_config(
            cfg, ds, tokenizer
        )  # as the run trained on it (instruction data: its template, response-only labels)

    splits = [data.client_split(k) for k in range(cfg.num_clients)]
    members = {
        k: subsample(encode(train), settings.max_examples, seed=cfg.seed + k) for k, (train, _) in enumerate(splits)
    }
    held_out = encode(data.test) + [e for _, val in splits for e in encode(val)]
    nonmembers = subsample(held_out, settings.max_examples, seed=cfg.seed - 1)

    final = load_final_model(cfg, run_dir, num_labels=data.num_labels, device=device)
    scores = {
        k: example_losses(final, ex, pad_token_id=pad, batch_size=settings.batch_size, device=device)
        for k, ex in members.items()
    }
    held = example_losses(final, nonmembers, pad_token_id=pad, batch_size=settings.batch_size, device=device)
    reference = round0_model(cfg, num_labels=data.num_labels, device=device)
    scores_base = {
        k: example_losses(reference, ex, pad_token_id=pad, batch_size=settings.batch_size, device=device)
        for k, ex in members.items()
    }
    held_base = example_losses(reference, nonmembers, pad_token_id=pad, batch_size=settings.batch_size, device=device)
    report: dict[str, Any] = {
        "run": run_dir.name,  # audit.json lies in the run directory: its name, no machine path
        "model": "final_model" if (run_dir / "final_model").is_dir() else "final_adapter",
        "dp": {
            "enabled": cfg.client.dp.enabled,
            "target_epsilon": cfg.client.dp.target_epsilon,
            "noise_multiplier": cfg.client.dp.noise_multiplier,
        },
        "membership": membership_report(scores, held, members_base=scores_base, nonmembers_base=held_base),
        "participation": participation(run_dir),
    }
    if settings.canaries:
        report["canaries"] = canary_report(final, cfg, tokenizer, device=device)
    (run_dir / AUDIT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


def canary_report(model: torch.nn.Module, cfg: Config, tokenizer, *, device: torch.device) -> dict[str, Any]:
    settings = cfg.audit
    canaries = make_canaries(
        count=settings.canaries, candidates=settings.candidates, digits=settings.canary_digits, seed=cfg.seed
    )

    pad = tokenizer.pad_token_id
    canary_nll = sequence_nll(
        model,
        canary_examples(cfg, tokenizer, canaries, canaries.secrets),
        pad_token_id=pad,
        batch_size=settings.batch_size,
        device=device,
    )
    candidate_nll = sequence_nll(
        model,
        canary_examples(cfg, tokenizer, canaries, canaries.candidates),
        pad_token_id=pad,
        batch_size=settings.batch_size,
        device=device,
    )
    ranked = [exposure(float(c), candidate_nll) for c in canary_nll]
    bits = [e for e, _ in ranked]
    return {
        "client": settings.canary_client,
        "count": settings.canaries,
        "repeats": settings.canary_repeats,
        "candidates": settings.candidates,
        "max_exposure": math.log2(settings.candidates + 1),
        "exposure": bits,
        "rank": [r for _, r in ranked],
        "mean_exposure": float(np.mean(bits)),
    }


def participation(run_dir: Path) -> dict[str, int]:
    """Rounds each client (partition) trained in, from ``metrics.jsonl`` (empty if absent)."""
    path = run_dir / "metrics.jsonl"
    counts: dict[str, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            for client in json.loads(line).get("clients", []):
                key = str(client.get("partition"))
                counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1))


def summary(report: dict[str, Any]) -> str:
    """A few lines for the console and the run's report."""
    overall = report["membership"]["overall"]
    lines = [
        f"membership AUC {overall['auc']:.3f} (calibrated {overall['calibrated_auc']:.3f}), {overall['members']} "
        f"members vs {overall['nonmembers']} held out"
    ]
    per = report["membership"]["per_client"]
    if per:
        aucs = [v["auc"] for v in per.values()]
        lines.append(f"per client AUC: min {min(aucs):.3f}, max {max(aucs):.3f}")
    if "canaries" in report:
        c = report["canaries"]
        lines.append(
            f"canary exposure: mean {c['mean_exposure']:.2f} bits of at most {c['max_exposure']:.2f} ({c['count']} "
            f"canaries x {c['repeats']} in client {c['client']})"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fedpeft.audit",
        description="Membership inference and canary exposure of a finished fedpeft run.",
    )
    parser.add_argument("run_dir", help="a run directory (holds config.yaml and final_adapter/ or final_model/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run_audit(args.run_dir)
    print(summary(report))
    print(f"written: {Path(args.run_dir) / AUDIT_FILE}")


if __name__ == "__main__":
    main()
