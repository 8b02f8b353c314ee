"""The server's round loop: handshake, rounds, evaluation on the held-out test split, checkpoints, results.

:func:`run_federated` drives any :class:`fedpeft.strategies.LoRAStrategy` over a Flower ``Grid`` (the
simulation engine's or a SuperLink's). Flower's ``Strategy.start`` is not used: it always begins
at round 1, samples with an unseeded ``random.sample`` and has no place for a handshake or a
communication budget. The runs without clients (the centralised and local-only bounds) are
:mod:`fedpeft.server.baselines`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedpeft.config.schema import Config, evaluates
from fedpeft.data.partition import prepare
from fedpeft.models import adapters as models
from fedpeft.models.adapters import client_ranks
from fedpeft.protocol import wire as protocol
from fedpeft.reporting.metrics import MetricsWriter
from fedpeft.server.checkpoint import config_json, load_checkpoint, save_checkpoint
from fedpeft.server.errors import RunError
from fedpeft.server.evaluation import ServerEvaluator, initial_adapter
from fedpeft.server.export import save_final
from fedpeft.server.rows import eval_fields, round_row
from fedpeft.server.transport import exchange, handshake
from fedpeft.strategies import LoRAStrategy, get_strategy
from fedpeft.strategies.types import RoundReport
from fedpeft.strategies.validation import short_reason

log = logging.getLogger("fedpeft")


def run_federated(cfg: Config, grid: Grid, run_dir: Path) -> list[dict[str, Any]]:
    """Run ``cfg.num_rounds`` rounds of federated LoRA over ``grid``; returns the metrics rows.

    After every round the complete server state goes to ``checkpoint.pt``; with ``cfg.resume``
    the run continues from it and ends exactly as an uninterrupted run would.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ranks = client_ranks(cfg)
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=cfg.model.task == "seq_cls")
    checkpoint = load_checkpoint(run_dir, cfg) if cfg.resume else None
    lineage = checkpoint["lineage"] if checkpoint else f"{run_dir.name}-{time.time_ns():x}"
    evaluator = ServerEvaluator(cfg, data, lineage=lineage)
    rank = max(r for r in ranks if r is not None) if models.has_ranks(cfg.model) else None
    strategy = get_strategy(cfg.strategy.name).from_config(cfg, initial_adapter(evaluator.cm, rank=rank, seed=cfg.seed))
    # Simulated nodes keep their state under the run; deployed ones in their own state-dir.
    run = protocol.RunInfo(
        config_json=config_json(cfg),
        label_names=tuple(data.label_names),
        sim_state_dir=None if cfg.mode == "deploy" else str(run_dir / "nodes"),
    )
    strategy.run, strategy.lineage = run, lineage
    strategy.register_nodes(handshake(grid, cfg, run, run_dir=run_dir))

    first_round, totals = 1, {"up": 0, "down": 0}
    writer = MetricsWriter(run_dir, num_rounds=cfg.num_rounds, logger=cfg.logger)
    if checkpoint:
        strategy.load_state_dict(checkpoint["strategy"])
        first_round, totals = checkpoint["round"] + 1, dict(checkpoint["totals"])
        for row in checkpoint["rows"]:  # metrics.jsonl/csv rewritten up to the checkpoint
            writer.write(row, rounds_done=row["round"])
        log.info("resumed %s after round %d; it runs to round %d", run_dir, checkpoint["round"], cfg.num_rounds)
    for server_round in range(first_round, cfg.num_rounds + 1):
        started = time.perf_counter()
        for attempt in range(cfg.max_retries + 1 if cfg.on_too_few == "retry" else 1):
            report = train_round(strategy, grid, server_round, attempt=attempt, timeout=cfg.round_timeout)
            if len(report.clients) >= max(cfg.min_clients, 1):
                break
            reasons = [f["reason"] for f in report.failures] + [r["reason"] for r in report.rejected]
            if cfg.on_too_few == "retry" and attempt < cfg.max_retries:
                log.warning(
                    "round %d: %d accepted updates < min_clients=%d; retrying (%d/%d): %s",
                    server_round,
                    len(report.clients),
                    cfg.min_clients,
                    attempt + 1,
                    cfg.max_retries,
                    reasons[:3],
                )
                continue
            raise RunError(
                f"round {server_round}: {len(report.clients)} accepted updates, fewer than "
                f"min_clients={max(cfg.min_clients, 1)}; "
                f"reasons: {reasons[:3]}"  # fedpeft.run says how to resume, if a round finished
            )
        evaluate_now = evaluates(cfg, server_round)
        if evaluate_now:
            evaluate_round(strategy, grid, server_round, timeout=cfg.round_timeout)
        result = evaluator(strategy.global_model()) if evaluate_now and strategy.has_global_model else None
        row = round_row(strategy, server_round, wall=time.perf_counter() - started, result=result, totals=totals)
        if result is not None:
            row.update(evaluator.extra)
        stop = cfg.comm_budget_mb is not None and (totals["up"] + totals["down"]) / 1e6 >= cfg.comm_budget_mb
        if stop and result is None and strategy.has_global_model:
            row.update(eval_fields(evaluator(strategy.global_model())))
            row.update(evaluator.extra)
        writer.write(row)
        save_checkpoint(
            run_dir,
            {
                "round": server_round,
                "strategy": strategy.state_dict(),
                "totals": totals,
                "rows": writer.rows,
                "lineage": lineage,
                "config": run.config_json,
            },
        )
        if stop:
            log.info(
                "communication budget of %.2f MB reached after round %d; stopping", cfg.comm_budget_mb, server_round
            )
            break
    if cfg.save_adapter and strategy.has_global_model:
        save_final(evaluator, strategy.global_model(), run_dir)
    return writer.rows


def evaluate_round(strategy: LoRAStrategy, grid: Grid, server_round: int, *, timeout: float) -> None:
    """The strategy's federated evaluation (its ``evaluation_plan`` hook), if it asks for one."""
    messages = list(strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord({}), grid))
    if messages:
        strategy.aggregate_evaluate(server_round, [reply for _, reply in exchange(grid, messages, timeout=timeout)])


def train_round(
    strategy: LoRAStrategy, grid: Grid, server_round: int, *, attempt: int = 0, timeout: float
) -> RoundReport:
    """Send one round's train messages, collect what comes back in time, aggregate; returns the report."""
    strategy.reports.pop(server_round, None)  # a retried round starts a fresh report
    messages = list(
        strategy.configure_train(server_round, ArrayRecord(), ConfigRecord({protocol.ATTEMPT: attempt}), grid)
    )
    report = strategy.reports[server_round]
    answered, replies = set(), []
    for node_id, reply in exchange(grid, messages, timeout=timeout):
        answered.add(node_id)
        if reply.has_error():  # failed on the node, or the node is gone: counted here, never aggregated
            gone = (
                reply.error.code == ErrorCode.NODE_UNAVAILABLE
            )  # the SuperLink's word that the node stopped sending heartbeats
            report.failures.append(
                {"node": node_id, "reason": short_reason(reply.error.reason or ""), "unreachable": gone}
            )
            log.warning("round %d: node %d failed: %s", server_round, node_id, report.failures[-1]["reason"])
        else:
            replies.append(reply)
    for msg in messages:
        if msg.metadata.dst_node_id not in answered:
            report.failures.append(
                {
                    "node": msg.metadata.dst_node_id,
                    "reason": f"no reply within round_timeout={timeout} s",
                    "unreachable": True,
                }
            )
            log.warning(
                "round %d: node %d did not reply within %.0f s", server_round, msg.metadata.dst_node_id, timeout
            )
    aggregating = time.perf_counter()
    strategy.aggregate_train(server_round, replies)
    report.extra["aggregation_seconds"] = time.perf_counter() - aggregating  # the server's share of the round
    return report
