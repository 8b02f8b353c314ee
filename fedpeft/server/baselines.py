"""The runs without clients, references for the federated rules: the centralised bound (one model on
the pooled data) and the local-only bound (every client alone, never communicating).

Both score the held-out test split with the server's :class:`ServerEvaluator` and write the
metrics rows a federated run writes, so their curves compare round by round.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

import torch

from fedpeft.config.schema import Config, evaluates, round_lr
from fedpeft.data.encoding import collator_for, encode_config, make_loader
from fedpeft.data.partition import FederatedData, prepare
from fedpeft.models import adapters as models
from fedpeft.protocol.records import round_seed
from fedpeft.reporting.metrics import MetricsWriter, weighted_spread
from fedpeft.server.evaluation import ServerEvaluator, initial_adapter
from fedpeft.server.export import save_final
from fedpeft.strategies.types import GlobalModel
from fedpeft.training.local import evaluate, num_local_steps, train_local


def one_process_run(
    cfg: Config, run_dir: Path, *, lineage: str
) -> tuple[FederatedData, ServerEvaluator, torch.nn.Module, Any]:
    """What a run without clients (the centralised and local-only bounds) starts from: its data,
    the evaluator, the model holding the run's initial adapter, and the tokenizer."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # no clients share the machine: every core it may run on
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=cfg.model.task == "seq_cls")
    evaluator = ServerEvaluator(cfg, data, lineage=lineage)
    rank = cfg.model.lora.r
    model = evaluator.load(GlobalModel(adapter=initial_adapter(evaluator.cm, rank=rank, seed=cfg.seed), rank=rank))
    return data, evaluator, model, models.load_tokenizer(cfg.model)


def run_centralized(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """The non-federated reference: one LoRA model trained on the pooled training data.

    Each "round" trains as many steps as one federated round does in total
    (``clients_per_round`` × local steps), so curves compare at equal compute; the test split is
    scored every ``eval_every`` rounds and after the last, as in a federated run.
    """
    data, evaluator, model, tokenizer = one_process_run(cfg, run_dir, lineage="centralized")
    rank = cfg.model.lora.r
    pooled = [data.client_split(k)[0] for k in range(cfg.num_clients)]
    examples = [e for ds in pooled for e in encode_config(cfg, ds, tokenizer)]
    per_client = sum(len(ds) for ds in pooled) / cfg.num_clients
    steps = cfg.clients_per_round * num_local_steps(
        num_examples=round(per_client),
        batch_size=cfg.client.batch_size,
        local_epochs=cfg.client.local_epochs,
        local_steps=cfg.client.local_steps,
    )
    writer = MetricsWriter(run_dir, num_rounds=cfg.num_rounds, logger=cfg.logger)
    for server_round in range(1, cfg.num_rounds + 1):
        started = time.perf_counter()
        loader = make_loader(
            examples,
            pad_token_id=tokenizer.pad_token_id,
            batch_size=cfg.client.batch_size,
            shuffle=True,
            seed=round_seed(cfg.seed, server_round),
            collate_fn=collator_for(cfg, tokenizer),
        )
        torch.manual_seed(round_seed(cfg.seed, server_round))  # dropout: a rerun repeats the run
        train = train_local(
            model,
            loader,
            num_steps=steps,
            lr=round_lr(cfg.client, server_round),
            weight_decay=cfg.client.weight_decay,
            device=evaluator.cm.device,
        )
        evaluate_now = evaluates(cfg, server_round)  # as the federated server does
        result = evaluate(model, evaluator.loader, device=evaluator.cm.device) if evaluate_now else None
        extra = (
            evaluator.llm(model, device=evaluator.cm.device, batch_size=cfg.server_eval_batch_size)
            if evaluate_now and evaluator.llm and evaluator.llm.active
            else {}
        )
        writer.write(
            {
                "round": server_round,
                "test_accuracy": result.accuracy if result else None,
                "test_loss": result.loss if result else None,
                "train_loss": train.loss,
                "clients_sampled": 0,
                "clients_replied": 0,
                "wall_seconds": time.perf_counter() - started,
                "bytes_up": 0,
                "bytes_down": 0,
                "cumulative_bytes_up": 0,
                "cumulative_bytes_down": 0,
                **extra,
            }
        )
    if cfg.save_adapter:
        save_final(evaluator, GlobalModel(adapter=evaluator.cm.adapter_state(rank), rank=rank), run_dir)
    return writer.rows


def run_local_only(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """The local-only bound: every client trains its own adapter on its own data, and never communicates.

    Each round every client (all of them, not a sample: the strongest local-only baseline) trains
    the steps a sampled federated client trains in a round, from where its own model stopped, with a
    fresh optimiser as a federated client has. All clients start from the same initial adapter.
    A round's row reports the clients' models on the held-out test split (``test_accuracy``: the
    mean over clients weighted by their training examples, and its spread) and on each client's
    own validation slice (``client_val_accuracy_*``, as the federated evaluation reports it).
    """
    data, evaluator, model, tokenizer = one_process_run(cfg, run_dir, lineage="local-only")
    rank = cfg.model.lora.r
    start = evaluator.cm.adapter_state(rank)  # the initial adapter every client starts from
    collate = collator_for(cfg, tokenizer)
    splits = [data.client_split(k) for k in range(cfg.num_clients)]
    train_sets = [encode_config(cfg, train, tokenizer) for train, _ in splits]
    val_loaders = [
        make_loader(
            encode_config(cfg, val, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            batch_size=cfg.client.eval_batch_size,
            shuffle=False,
            collate_fn=collate,
        )
        if len(val)
        else None
        for _, val in splits
    ]
    weights = [len(ex) for ex in train_sets]
    adapters = [dict(start) for _ in range(cfg.num_clients)]
    writer = MetricsWriter(run_dir, num_rounds=cfg.num_rounds, logger=cfg.logger)
    for server_round in range(1, cfg.num_rounds + 1):
        started = time.perf_counter()
        losses, tests, vals = [], [], []
        for k, examples in enumerate(train_sets):
            evaluator.cm.load_adapter_state(rank, adapters[k])
            steps = num_local_steps(
                num_examples=len(examples),
                batch_size=cfg.client.batch_size,
                local_epochs=cfg.client.local_epochs,
                local_steps=cfg.client.local_steps,
            )
            loader = make_loader(
                examples,
                pad_token_id=tokenizer.pad_token_id,
                batch_size=cfg.client.batch_size,
                shuffle=True,
                seed=round_seed(cfg.seed, server_round) + k,
                collate_fn=collate,
            )
            torch.manual_seed(round_seed(cfg.seed, server_round) + k)  # dropout, as a federated client seeds it
            losses.append(
                train_local(
                    model,
                    loader,
                    num_steps=steps,
                    lr=round_lr(cfg.client, server_round),
                    weight_decay=cfg.client.weight_decay,
                    device=evaluator.cm.device,
                ).loss
            )
            adapters[k] = evaluator.cm.adapter_state(rank)
            if evaluates(cfg, server_round):
                tests.append(evaluate(model, evaluator.loader, device=evaluator.cm.device))
                val_loader = val_loaders[k]
                if val_loader is not None:
                    vals.append(
                        (
                            len(cast(Sized, val_loader.dataset)),
                            evaluate(model, val_loader, device=evaluator.cm.device).accuracy,
                        )
                    )
        row: dict[str, Any] = {
            "round": server_round,
            "train_loss": sum(w * loss for w, loss in zip(weights, losses)) / sum(weights),
            "clients_sampled": cfg.num_clients,
            "clients_replied": cfg.num_clients,
            "bytes_up": 0,
            "bytes_down": 0,
            "cumulative_bytes_up": 0,
            "cumulative_bytes_down": 0,
        }
        if tests:
            spread = weighted_spread([t.accuracy for t in tests], weights)
            row["test_accuracy"], row["test_loss"] = (
                spread["mean"],
                weighted_spread([t.loss for t in tests], weights)["mean"],
            )
            row.update({f"test_accuracy_{k}": spread[k] for k in ("std", "min", "max")})
        if vals:
            row.update(
                {
                    f"client_val_accuracy_{k}": v
                    for k, v in weighted_spread([a for _, a in vals], [w for w, _ in vals]).items()
                }
            )
        row["wall_seconds"] = time.perf_counter() - started
        writer.write(row)
    return writer.rows
