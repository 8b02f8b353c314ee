"""What a run tells a person while it runs: the partition report and the node status table.

* :func:`partition_report` — per simulated client: training and validation examples and the
  label histogram of its training split; written to ``partitions.json`` and drawn as
  ``plots/partitions.png`` at the start of every simulated run, with :func:`partition_warnings`
  when the split, not the rule, is likely to be the story.
* :func:`node_table` — the nodes that answered the handshake: partition, rank or tier, examples,
  labels seen; the ServerApp writes it as ``nodes.json`` (so a deployed run's submitting console
  can print it too) and logs it to ``run.log``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpeft.config.schema import Config
from fedpeft.data.encoding import label_counts
from fedpeft.reporting import plots

log = logging.getLogger("fedpeft")

PARTITIONS_JSON = "partitions.json"
NODES_JSON = "nodes.json"
MIN_BATCHES = 3  # a client with fewer training examples than this many batches gets a warning
MAX_COLUMNS = 10  # label histograms wider than this are summarised by the labels seen


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, right-aligned columns, two spaces apart."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


# ------------------------------------------------------------------------------ partitions
def partition_report(data: Any, cfg: Config) -> dict[str, Any]:
    """Per client of ``data`` (a :class:`fedpeft.data.partition.FederatedData`): its training examples,
    validation examples and the label histogram of its training split."""
    clients = []
    for k in range(len(data.partitions)):
        train, val = data.client_split(k)
        counts = label_counts(train["label"], data.num_labels)
        clients.append(
            {
                "partition": k,
                "examples": len(train),
                "validation": len(val),
                "label_counts": counts,
                "labels_seen": sum(1 for c in counts if c),
            }
        )
    split = cfg.data.partitioner + (f" α={cfg.data.dirichlet_alpha:g}" if cfg.data.partitioner == "dirichlet" else "")
    split += f" {cfg.data.classes_per_client} labels each" if cfg.data.partitioner == "pathological" else ""
    return {
        "title": f"{len(clients)} clients, {split}",
        "label_names": list(data.label_names),
        "batch_size": cfg.client.batch_size,
        "clients": clients,
        "test_examples": len(data.test),
    }


def partition_warnings(report: Mapping[str, Any], *, min_batches: int = MIN_BATCHES) -> list[str]:
    """Warnings about a split: clients with fewer than ``min_batches`` batches of training data,
    and every client seeing at most two labels (when the data has more)."""
    batch = report["batch_size"]
    warnings = []
    small = [c for c in report["clients"] if c["examples"] < min_batches * batch]
    if small:
        listed = ", ".join(f"client {c['partition']} ({c['examples']})" for c in small[:8]) + (
            " ..." if len(small) > 8 else ""
        )
        warnings.append(
            f"{len(small)} of {len(report['clients'])} clients hold fewer training examples than {min_batches} batches of {batch}: {listed}; "
            "their local steps repeat the same few examples"
        )
    num_labels = len(report["label_names"])
    most = max(c["labels_seen"] for c in report["clients"])
    if num_labels > 2 and most <= 2:
        warnings.append(
            f"every client sees at most {most} of the {num_labels} labels: local models learn their own labels only, "
            "and the global model's accuracy measures the split as much as the rule"
        )
    return warnings


def partition_table(report: Mapping[str, Any]) -> str:
    names = report["label_names"]
    histogram = len(names) <= MAX_COLUMNS
    headers = ["client", "examples", "val", "labels", *(names if histogram else [])]
    rows = [
        [
            c["partition"],
            c["examples"],
            c["validation"],
            f"{c['labels_seen']}/{len(names)}",
            *(c["label_counts"] if histogram else []),
        ]
        for c in report["clients"]
    ]
    return text_table(headers, rows)


def write_partition_report(data: Any, cfg: Config, run_dir: Path) -> dict[str, Any]:
    """``partitions.json`` and ``plots/partitions.png`` in ``run_dir``; the table and any warning to the log."""
    report = partition_report(data, cfg)
    report["warnings"] = partition_warnings(report)
    run_dir = Path(run_dir)
    (run_dir / PARTITIONS_JSON).write_text(json.dumps(report, indent=1) + "\n")
    try:
        plots.partition_plot(report, run_dir / "plots" / plots.PARTITIONS)
    except Exception as err:  # a picture is never worth a run
        log.warning("could not draw %s: %s", run_dir / "plots" / plots.PARTITIONS, err)
    log.info("partitions (%s; training examples per label):\n%s", report["title"], partition_table(report))
    for warning in report["warnings"]:
        log.warning("partitions: %s", warning)
    return report


# ------------------------------------------------------------------------------ nodes
def node_row(node_id: int, hello: Any, *, label_names: Sequence[str]) -> dict[str, Any]:
    """One node of the handshake, from its :class:`fedpeft.protocol.wire.NodeHello`."""
    counts = [int(c) for c in hello.label_counts]
    return {
        "node": int(node_id),
        "partition": hello.partition_id,
        "rank": hello.rank,
        "tier": hello.tier,
        "examples": hello.num_examples,
        "label_counts": counts,
        "labels_seen": sum(1 for c in counts if c) if counts else None,
        "num_labels": len(label_names),
    }


def node_table(nodes: Sequence[Mapping[str, Any]], label_names: Sequence[str]) -> str:
    histogram = 0 < len(label_names) <= MAX_COLUMNS and all(n["label_counts"] for n in nodes)
    headers = ["node", "partition", "rank", "tier", "examples", "labels", *(label_names if histogram else [])]
    rows = []
    for n in sorted(nodes, key=lambda n: n["partition"]):
        seen = "-" if n["labels_seen"] is None else f"{n['labels_seen']}/{n['num_labels']}"
        rows.append(
            [
                n["node"],
                n["partition"],
                "-" if n["rank"] is None else n["rank"],
                n["tier"] or "-",
                n["examples"],
                seen,
                *(n["label_counts"] if histogram else []),
            ]
        )
    return text_table(headers, rows)


def write_node_status(nodes: Sequence[Mapping[str, Any]], label_names: Sequence[str], run_dir: Path) -> None:
    """``nodes.json`` in ``run_dir`` (a deployed run's submitting console prints it) and the table to the log."""
    Path(run_dir, NODES_JSON).write_text(
        json.dumps({"label_names": list(label_names), "nodes": list(nodes)}, indent=1) + "\n"
    )
    log.info("%s", node_status_text(nodes, label_names))


def node_status_text(nodes: Sequence[Mapping[str, Any]], label_names: Sequence[str]) -> str:
    return f"{len(nodes)} nodes connected:\n{node_table(nodes, label_names)}"
