"""The metrics row of a federated round: one line of ``metrics.jsonl``, built from the strategy's round report."""

from __future__ import annotations

from typing import Any

from fedpeft.protocol import wire as protocol
from fedpeft.reporting.metrics import weighted_spread
from fedpeft.strategies import LoRAStrategy
from fedpeft.training.local import EvalResult


def round_row(
    strategy: LoRAStrategy, server_round: int, *, wall: float, result: EvalResult | None, totals: dict[str, int]
) -> dict[str, Any]:
    """One line of ``metrics.jsonl`` from the strategy's round report."""
    report = strategy.reports[server_round]
    up, down = sum(report.bytes_up.values()), sum(report.bytes_down.values())
    totals["up"] += up
    totals["down"] += down
    # Sums run over the clients in partition order, not in the order their replies arrived, so a
    # seeded run's row is the same to the last bit every time.
    replied = sorted(report.clients, key=lambda c: c["partition"])
    weights = [c[protocol.NUM_EXAMPLES] for c in replied]
    train_loss = sum(w * c[protocol.TRAIN_LOSS] for w, c in zip(weights, replied)) / sum(weights) if weights else None
    clients = []
    for c in replied:
        node = c["node"]
        clients.append(
            {k.replace("-", "_"): v for k, v in c.items()}
            | {"bytes_up": report.bytes_up.get(node, 0), "bytes_down": report.bytes_down.get(node, 0)}
        )
    epsilons = [c["epsilon"] for c in clients if c.get("epsilon") is not None]
    # The clients' validation accuracy: from the federated evaluation when the rule ran one, else
    # from the train replies (each client's model right after local training).
    source = "evaluate" if report.evaluations else "train"
    measured = sorted(
        (c for c in (report.evaluations or report.clients) if c.get(protocol.VAL_ACCURACY) is not None),
        key=lambda c: c["partition"],
    )
    spread = weighted_spread(
        [c[protocol.VAL_ACCURACY] for c in measured],
        [c.get(protocol.VAL_EXAMPLES, c.get(protocol.NUM_EXAMPLES, 1)) for c in measured],
    )
    return {
        "round": server_round,
        "test_accuracy": None if result is None else result.accuracy,
        "test_loss": None if result is None else result.loss,
        "train_loss": train_loss,
        "clients_sampled": len(report.sampled),
        "clients_replied": len(report.clients),
        "clients_failed": len(report.failures),
        "clients_rejected": len(report.rejected),
        "wall_seconds": wall,
        "bytes_up": up,
        "bytes_down": down,
        "cumulative_bytes_up": totals["up"],
        "cumulative_bytes_down": totals["down"],
        "bytes_down_per_client": {
            str(p): b for p, b in sorted((strategy.nodes[n].partition_id, b) for n, b in report.bytes_down.items())
        },
        "residual": report.extra.get("residual"),
        "max_epsilon": max(epsilons) if epsilons else None,
        **{f"client_val_accuracy_{k}": v for k, v in spread.items()},
        "client_val_accuracy_source": source if measured else None,
        "evaluations": [
            {k.replace("-", "_"): v for k, v in e.items()}
            for e in sorted(report.evaluations, key=lambda e: e["partition"])
        ],
        "clients": clients,
        "rejected": report.rejected,
        "failures": report.failures,
        "unreachable": [
            {"node": f["node"], "partition": strategy.nodes[f["node"]].partition_id}
            for f in report.failures
            if f.get("unreachable")
        ],
        **{k: v for k, v in report.extra.items() if k != "residual"},
    }


def eval_fields(result: EvalResult) -> dict[str, float]:
    """The test-split fields of a row, for a round scored after its row was built.

    That is the last round of a communication budget.
    """
    return {"test_accuracy": result.accuracy, "test_loss": result.loss}
