"""A SuperNode's side of a deployment: its node config checked before it starts, and demo data for nodes.

``python -m fedpeft.deploy supernode`` refuses, in one line, a node config the node cannot use
(:func:`supernode_command`); ``python -m fedpeft.deploy partitions`` writes each client's partition
of a run config as a node data folder (:func:`export_partitions`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args

from fedpeft.config.schema import Config


def export_partitions(cfg: Config, root: Path) -> list[Path]:
    """Write each client's training partition of ``cfg``'s data as a ``<label>/<i>.txt`` folder.

    To demo deployment with real node-local data: node k is started with
    ``data-path='<root>/node<k>-data'`` and trains on exactly what partition k would hold.
    """
    # Imported here for start-up time: `python -m fedpeft.deploy supernode` loads this module to check a
    # node config before it execs flower-supernode, and the data stack would add seconds to that.
    from fedpeft.data.partition import prepare

    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=True)
    folders = []
    for k, part in enumerate(data.partitions):
        folder = Path(root) / f"node{k}-data"
        for i, row in enumerate(part):
            doc = folder / data.label_names[row["label"]] / f"{i:05d}.txt"
            doc.parent.mkdir(parents=True, exist_ok=True)
            doc.write_text(row["text"])
        folders.append(folder)
    return folders


class NodeConfigError(ValueError):
    """A SuperNode's node config names something the node cannot use; the message is one line."""


def check_node_config(node_config: dict[str, Any]) -> None:
    """What a node needs before it may start: a ``partition-id``, a readable ``data-path`` (if it has
    one), a ``state-dir`` that exists and is writable, a positive ``rank`` (if it has one)."""
    pid = node_config.get("partition-id")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
        raise NodeConfigError(
            f"partition-id must be an integer >= 0, got {pid!r}"
            if pid is not None
            else "no partition-id (the node's index, 0 ... num_clients-1)"
        )
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"])).expanduser()
        if not path.exists():
            raise NodeConfigError(f"data-path {str(path)!r} does not exist")
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise NodeConfigError(f"data-path {str(path)!r} is not readable by this user")
        if path.is_dir() and not any(path.iterdir()):
            raise NodeConfigError(f"data-path {str(path)!r} is an empty folder (expected <label>/<doc>.txt files)")
    if "state-dir" not in node_config:
        raise NodeConfigError(
            "no state-dir (the node's disk state: base updates of a rule that moves the base, kept tensors, the DP "
            "ledger, its data cache)"
        )
    state = Path(str(node_config["state-dir"])).expanduser()
    if not state.is_dir():
        raise NodeConfigError(
            f"state-dir {str(state)!r} does not exist (create it: mkdir -p {state})"
            if not state.exists()
            else f"state-dir {str(state)!r} is not a folder"
        )
    if not os.access(state, os.R_OK | os.W_OK | os.X_OK):
        raise NodeConfigError(f"state-dir {str(state)!r} is not readable and writable by this user")
    if "rank" in node_config and (not isinstance(node_config["rank"], int) or node_config["rank"] < 1):
        raise NodeConfigError(f"rank must be an integer >= 1, got {node_config['rank']!r}")


def supernode_command(argv: list[str]) -> list[str]:
    """Check a ``flower-supernode`` command line's node config and files; returns the command to run.

    ``argv`` are ``flower-supernode``'s own arguments; ``--node-config`` is read as Flower reads it.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--node-config")
    parser.add_argument("--root-certificates")
    parser.add_argument("--auth-supernode-private-key")
    known, _ = parser.parse_known_args(argv)
    if not known.node_config:
        raise NodeConfigError(
            "no --node-config \"partition-id=<k> state-dir='<folder>' [data-path='<folder or file>'] [rank=<r>]\""
        )
    try:
        node_config = parse_config_args([known.node_config])
    except ValueError as err:
        raise NodeConfigError(f"--node-config cannot be read: {err}") from None
    check_node_config(node_config)
    for flag, value in (
        ("--root-certificates", known.root_certificates),
        ("--auth-supernode-private-key", known.auth_supernode_private_key),
    ):
        if value and not os.access(Path(value).expanduser(), os.R_OK):
            raise NodeConfigError(f"{flag} {value!r}: no such readable file")
    supernode = Path(sys.executable).with_name("flower-supernode")
    return [str(supernode if supernode.exists() else "flower-supernode"), *argv]
