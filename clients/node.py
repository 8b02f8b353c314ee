"""What a client knows about its own node: its partition, rank, data and persistent folder.

Per process (a Ray worker in simulation, a ``flwr-clientapp`` process in deployment) the encoded
data are loaded once and reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context

from fedpeft.clients.state import NodeStore
from fedpeft.config.schema import Config, to_container
from fedpeft.data.encoding import encode_config
from fedpeft.data.partition import node_data, prepare
from fedpeft.models import adapters as models
from fedpeft.privacy.audit import client_train_split
from fedpeft.protocol import wire as protocol
from fedpeft.protocol.wire import RunInfo

if TYPE_CHECKING:  # annotations only
    from datasets import Dataset

_ENCODED: dict[str, tuple[int, list, list]] = {}


def node_rank(cfg: Config, partition_id: int, node_config: dict[str, Any]) -> int | None:
    """This node's LoRA rank: its own node config (``rank``, or ``tier`` looked up in ``strategy.tiers``) wins,
    else the run config's rank for its partition (``strategy.ranks`` / ``client_tiers`` / ``model.lora.r``)."""
    if not models.has_ranks(cfg.model):
        return None
    if protocol.NODE_RANK in node_config:
        return int(node_config[protocol.NODE_RANK])
    if protocol.NODE_TIER in node_config:
        return models.tier_rank(cfg, str(node_config[protocol.NODE_TIER]))
    return models.client_ranks(cfg)[partition_id]


def partition_id(context: Context) -> int:
    if protocol.NODE_PARTITION_ID not in context.node_config:
        raise ValueError(
            f"node_config has no {protocol.NODE_PARTITION_ID!r}: start the SuperNode with --node-config "
            f'"{protocol.NODE_PARTITION_ID}=<k> ..."'
        )
    return int(context.node_config[protocol.NODE_PARTITION_ID])


def node_store(context: Context, run: RunInfo) -> NodeStore:
    """The node's persistent folder: ``state-dir`` from the node config, else the run's node folder."""
    root = context.node_config.get(protocol.NODE_STATE_DIR) or run.sim_state_dir
    if not root:
        raise ValueError(
            "no node state folder: start the SuperNode with "
            f"--node-config \"{protocol.NODE_STATE_DIR}='<folder>' ...\" "
            "(the moving base, kept adapter tensors and the DP ledger live there)"
        )
    return NodeStore(Path(str(root)) / f"node-{partition_id(context)}")


def local_data(cfg: Config, pid: int, context: Context, run: RunInfo) -> tuple[int, list, list]:
    """(number of labels, encoded train examples, encoded validation examples) of this node.

    A node whose node config names a ``data-path`` trains on that file or folder (deployment:
    the data never leaves the node); otherwise on partition ``pid`` of the run's data (simulation
    and demos). Cached per process, and on a node with a ``state-dir`` also on its disk: a
    deployed ``flwr-clientapp`` process lives for one message, and reading, splitting and
    tokenising the corpus again each time would cost more than loading the model.
    """
    need_labels = cfg.model.task == "seq_cls"
    path = context.node_config.get(protocol.NODE_DATA_PATH)
    names = list(run.label_names)
    if path:
        if need_labels and not names:
            raise ValueError(
                f"the server sent no {protocol.LABEL_NAMES!r}; a node with its own data-path needs them "
                "to number its labels"
            )
        source = Path(str(path)).expanduser()
        files = (
            sorted(f for f in source.rglob("*") if f.is_file())
            if source.is_dir()
            else [source]
            if source.exists()
            else []
        )
        stamp = [
            [str(f), f.stat().st_mtime_ns, f.stat().st_size] for f in files
        ]  # an edited file invalidates the cache
        key = json.dumps(
            ["path", str(source), stamp, names, cfg.seed, pid, to_container(cfg.data), to_container(cfg.model)],
            sort_keys=True,
        )
    else:
        canaries = to_container(cfg.audit) if cfg.audit.canaries and pid == cfg.audit.canary_client else None
        key = json.dumps(
            ["partition", cfg.seed, cfg.num_clients, pid, to_container(cfg.data), to_container(cfg.model), canaries],
            sort_keys=True,
        )
    if key in _ENCODED:
        return _ENCODED[key]
    state_dir = context.node_config.get(protocol.NODE_STATE_DIR)
    disk = NodeStore(Path(str(state_dir)) / f"node-{pid}") if state_dir else None
    disk_key = "data-" + hashlib.sha256(key.encode()).hexdigest()[:20]
    cached = disk.load_cached(disk_key) if disk is not None else None
    if cached is not None:
        _ENCODED[key] = (int(cached["num-labels"]), cached["train"], cached["val"])
        return _ENCODED[key]
    if path:
        train_ds, val_ds = node_data(
            cfg.data, str(path), label_names=names, seed=cfg.seed, node=pid, need_labels=need_labels
        )
        num_labels = len(names)
    else:
        data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=need_labels)
        train_ds, val_ds = (
            client_train_split(cfg, data, pid),
            data.client_split(pid)[1],
        )  # with the audit's canaries, if any
        num_labels = data.num_labels
    _ENCODED[key] = (num_labels, *encode_split(cfg, train_ds, val_ds))
    if disk is not None:
        disk.save_cached(disk_key, {"num-labels": num_labels, "train": _ENCODED[key][1], "val": _ENCODED[key][2]})
    return _ENCODED[key]


def encode_split(cfg: Config, train_ds: Dataset, val_ds: Dataset) -> tuple[list, list]:
    tokenizer = models.load_tokenizer(cfg.model)  # instruction formats: prompt template, response-only labels
    return encode_config(cfg, train_ds, tokenizer), encode_config(cfg, val_ds, tokenizer)
