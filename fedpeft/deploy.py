"""The deployment's command line: ``python -m fedpeft.deploy certs|node-key|supernode|partitions ...``.

The helpers for the security set-up and the nodes (docs/deployment.md)::

    python -m fedpeft.deploy certs certs/ --host 127.0.0.1 --host superlink.example.org
    python -m fedpeft.deploy node-key keys/node0
    python -m fedpeft.deploy supernode --superlink HOST:PORT --node-config "partition-id=0 ..." \\
        [flower-supernode options]
    python -m fedpeft.deploy partitions parts/ num_clients=2 data.max_samples=600

Submitting a run is ``python -m fedpeft.run ... mode=deploy`` (:mod:`fedpeft.engines.deploy.submit`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedpeft.engines.deploy.nodes import NodeConfigError, export_partitions, supernode_command
from fedpeft.engines.deploy.security import make_certificates, make_node_key


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fedpeft.deploy", description="TLS certificates and SuperNode keys for a deployment."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="a CA and a SuperLink certificate for the given hosts")
    certs.add_argument("out", type=Path)
    certs.add_argument(
        "--host", action="append", required=True, help="a name or IP the SuperLink is reached at (repeat)"
    )
    certs.add_argument("--days", type=int, default=365)
    node = sub.add_parser("node-key", help="a SuperNode authentication key pair (PATH and PATH.pub)")
    node.add_argument("path", type=Path)
    sub.add_parser(
        "supernode",
        help="check a node config (partition-id, data-path, state-dir, rank), "
        "then start flower-supernode with these arguments",
        add_help=False,
    )
    parts = sub.add_parser("partitions", help="write each client's partition of a run config as a node data folder")
    parts.add_argument("out", type=Path)
    parts.add_argument(
        "overrides", nargs="*", help="config keys as for fedpeft.run, e.g. num_clients=2 data.max_samples=600"
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["supernode"]:  # every other argument is flower-supernode's own
        try:
            cmd = supernode_command(argv[1:])
        except NodeConfigError as err:
            print(f"fedpeft.deploy supernode: refusing to start: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        os.execvp(cmd[0], cmd)  # becomes flower-supernode: same process id, signals and exit code
    args = parser.parse_args(argv)
    if args.command == "partitions":
        # Imported here for start-up time: Hydra and the rule registry (seconds) are needed by this command only,
        # and `supernode` starts every node through this module.
        from fedpeft.cli.configs import compose_config

        for path in export_partitions(compose_config(args.overrides), args.out):
            print(path)
    elif args.command == "certs":
        for name, path in make_certificates(args.out, args.host, days=args.days).items():
            print(f"{name}: {path}")
    else:
        for path in make_node_key(args.path):
            print(path)


if __name__ == "__main__":
    cli()
