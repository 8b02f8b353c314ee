"""The partition report of a simulated run and the node status table of the handshake."""

from __future__ import annotations

import json
import logging
from collections import Counter

from fedpeft.config.schema import DataConfig
from fedpeft.data.partition import build
from fedpeft.protocol.wire import NodeHello, decode_query_reply, encode_query_reply
from fedpeft.reporting.status import node_row, node_table, partition_report, partition_warnings, write_partition_report
from tests.fedpeft.test_config import compose_cfg


def test_partition_report_counts_each_clients_training_labels(tmp_path):
    # Prepare
    cfg = compose_cfg(
        ["num_clients=4", "data.max_samples=300", "data.partitioner=dirichlet", "data.dirichlet_alpha=0.3"]
    )
    data = build(cfg.data, seed=cfg.seed, num_clients=4)
    # Execute
    report = write_partition_report(data, cfg, tmp_path)
    # Assert: counted here from the clients' own training splits
    assert json.loads((tmp_path / "partitions.json").read_text()) == report
    assert (tmp_path / "plots" / "partitions.png").read_bytes()[:4] == b"\x89PNG"
    assert report["label_names"] == data.label_names
    for k, client in enumerate(report["clients"]):
        train, val = data.client_split(k)
        counts = Counter(train["label"])
        assert client["label_counts"] == [counts.get(j, 0) for j in range(5)]
        assert (client["examples"], client["validation"]) == (len(train), len(val))
        assert client["labels_seen"] == len(counts)
    assert sum(c["examples"] + c["validation"] for c in report["clients"]) == len(data.train)


def test_a_split_with_tiny_clients_or_two_labels_each_is_warned_about(tmp_path, caplog):
    cfg = compose_cfg(
        [
            "num_clients=5",
            "data.max_samples=200",
            "data.partitioner=pathological",
            "data.classes_per_client=2",
            "client.batch_size=16",
        ]
    )
    data = build(cfg.data, seed=cfg.seed, num_clients=5)
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        report = write_partition_report(data, cfg, tmp_path)
    assert len(report["warnings"]) == 2
    assert "fewer training examples than 3 batches of 16" in report["warnings"][0]
    assert "every client sees at most 2 of the 5 labels" in report["warnings"][1]
    assert sum("partitions:" in r.message for r in caplog.records if r.levelno == logging.WARNING) == 2


def test_a_balanced_split_passes_without_a_warning():
    cfg = compose_cfg(["num_clients=2", "data.partitioner=iid", "client.batch_size=16"])
    data = build(DataConfig(partitioner="iid", max_samples=400), seed=0, num_clients=2)
    assert partition_warnings(partition_report(data, cfg)) == []


def test_the_few_batches_threshold_is_exact():
    report = {"batch_size": 8, "label_names": ["a", "b", "c"], "clients": [
        {"partition": 0, "examples": 24, "labels_seen": 3}, {"partition": 1, "examples": 23, "labels_seen": 3}]}  # fmt: skip
    (warning,) = partition_warnings(report)
    assert "1 of 2 clients" in warning and "client 1 (23)" in warning and "client 0" not in warning


def test_node_table_shows_partition_rank_tier_examples_and_labels():
    names = ["business", "sports", "tech"]
    nodes = [
        node_row(
            77,
            NodeHello(partition_id=1, rank=2, num_examples=10, label_counts=(0, 4, 6), tier="phone"),
            label_names=names,
        ),
        node_row(5, NodeHello(partition_id=0, rank=8, num_examples=12, label_counts=(12, 0, 0)), label_names=names),
    ]
    lines = node_table(nodes, names).splitlines()
    assert lines[0].split() == ["node", "partition", "rank", "tier", "examples", "labels", "business", "sports", "tech"]
    assert lines[1].split() == ["5", "0", "8", "-", "12", "1/3", "12", "0", "0"]
    assert lines[2].split() == ["77", "1", "2", "phone", "10", "2/3", "0", "4", "6"]


def test_the_handshake_reply_carries_label_counts_and_tier():
    hello = NodeHello(partition_id=3, rank=2, num_examples=10, label_counts=(0, 4, 6), tier="phone")
    assert decode_query_reply(encode_query_reply(hello)) == hello
    plain = NodeHello(partition_id=0, rank=8, num_examples=5)
    assert decode_query_reply(encode_query_reply(plain)) == plain
