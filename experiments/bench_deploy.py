"""Benchmark: Flower's deployment engine against its simulation engine, and a node's cost per message.

1. **Round wall time.** The same FLoRA run (2 clients with their own data folders, both sampled
   every round, ranks [8, 4]) once on a real SuperLink + 2 SuperNodes on 127.0.0.1 (TLS and node
   authentication on) and once simulated on Ray. Mean ``wall_seconds`` of rounds 2..R of each.
2. **Cost per message on a node.** A deployed ``flwr-clientapp`` process lives for one message,
   so everything a message needs is built again each time. Measured in fresh processes, as a
   ClientApp process does it at round ``--base-rounds`` + 1 of FLoRA:
   *before*: read and split the corpus and tokenise the node's share; load the base model;
   replay every stored base update since round 1;
   *after* (what the ClientApp does now on a node with a ``state-dir``): the encoded data from
   the node's disk cache; load the base model; restore the merged base from its safetensors file.
   The imports are the same on both sides and reported apart.

    python experiments/bench_deploy.py [--rounds 4] [--out experiments/results/bench_deploy.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedpeft.protocol.wire import NODE_DATA_PATH, NODE_PARTITION_ID, NODE_STATE_DIR

REPO = Path(__file__).resolve().parents[1]

NODE_CFG = {"seed": 0, "num_clients": 10, "strategy": {"name": "flora"}}


def run_config(rounds: int) -> dict:
    return {
        "seed": 0,
        "num_rounds": rounds,
        "num_clients": 2,
        "clients_per_round": 2,
        "data": {"max_samples": 600, "partitioner": "iid"},
        "strategy": {"name": "flora", "ranks": [8, 4]},
        "save_adapter": False,
    }


def round_walls(rows: list[dict]) -> list[float]:
    return [r["wall_seconds"] for r in rows[1:]] or [rows[0]["wall_seconds"]]


def bench_rounds(rounds: int, work: Path) -> dict:
    from fedpeft.config.schema import to_config
    from fedpeft.engines.deploy.federation import LocalFederation
    from fedpeft.engines.deploy.nodes import export_partitions
    from fedpeft.models import adapters as models
    from fedpeft.run import execute

    out = {}
    cfg_dict = run_config(rounds)
    started = time.perf_counter()
    sim_rows = execute(to_config({**cfg_dict, "mode": "simulation"}), work / "simulated")
    out["simulated"] = {
        "round_seconds": round_walls(sim_rows),
        "run_seconds": time.perf_counter() - started,
        "final_accuracy": sim_rows[-1]["test_accuracy"],
    }
    models.clear_cache()
    folders = export_partitions(to_config(cfg_dict), work)  # the same two clients' data, as the nodes' folders
    nodes = [
        {NODE_PARTITION_ID: k, NODE_DATA_PATH: str(folders[k]), NODE_STATE_DIR: str(work / f"state{k}")}
        for k in range(2)
    ]
    with LocalFederation(work / "fed", nodes) as fed:
        started = time.perf_counter()
        dep_rows = execute(
            to_config({**cfg_dict, "mode": "deploy", "deploy": fed.config_overrides()}), work / "deployed"
        )
        out["deployed"] = {
            "round_seconds": round_walls(dep_rows),
            "run_seconds": time.perf_counter() - started,
            "final_accuracy": dep_rows[-1]["test_accuracy"],
        }
    out["deployed_over_simulated"] = statistics.mean(out["deployed"]["round_seconds"]) / statistics.mean(
        out["simulated"]["round_seconds"]
    )
    return out


# ------------------------------------------------------------------------------ per-message cost (child processes)
def prepare_node(store_dir: Path, base_rounds: int) -> None:
    """A node store as after ``base_rounds`` FLoRA rounds: every round's stacks, the merged base, the data cache."""
    import torch

    from fedpeft.clients.job import worker_model
    from fedpeft.clients.node import local_data
    from fedpeft.clients.state import NodeStore
    from fedpeft.config.schema import to_config
    from fedpeft.protocol.records import stack_to_delta
    from fedpeft.protocol.wire import RunInfo

    cfg = to_config(NODE_CFG)
    ctx = _context({NODE_PARTITION_ID: 0, NODE_STATE_DIR: str(store_dir)})
    num_labels, _, _ = local_data(cfg, 0, ctx, RunInfo(config_json=""))
    cm = worker_model(cfg, num_labels)
    store = NodeStore(store_dir / "node-0")
    gen = torch.Generator().manual_seed(0)
    deltas = []
    for round_ in range(1, base_rounds + 1):
        stacks = {}
        for name, layer in cm.base_layers().items():
            d_out, d_in = layer.weight.shape
            stacks[f"{name}.lora_A.weight"] = torch.randn(16, d_in, generator=gen) * 0.01
            stacks[f"{name}.lora_B.weight"] = torch.randn(d_out, 16, generator=gen) * 0.01
        store.save_base_update("bench", round_, stacks)
        deltas.append(stack_to_delta(stacks))
    cm.use_base("bench", deltas, version=base_rounds)
    store.save_merged_base("bench", base_rounds, cm.merged_base())


def _context(node_config: dict):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def child(mode: str, store_dir: Path, base_rounds: int) -> dict:
    """One fresh process doing what a ClientApp process does before training (``mode``: before/after)."""
    t0 = time.perf_counter()
    from fedpeft.clients.job import worker_model  # the imports a ClientApp pays
    from fedpeft.clients.node import local_data
    from fedpeft.clients.state import NodeStore
    from fedpeft.config.schema import to_config
    from fedpeft.protocol.records import stack_to_delta
    from fedpeft.protocol.wire import RunInfo

    t1 = time.perf_counter()
    cfg = to_config(NODE_CFG)
    node_config = {NODE_PARTITION_ID: 0, NODE_STATE_DIR: str(store_dir)} if mode == "after" else {NODE_PARTITION_ID: 0}
    num_labels, train, _ = local_data(cfg, 0, _context(node_config), RunInfo(config_json=""))
    t2 = time.perf_counter()
    cm = worker_model(cfg, num_labels)
    t3 = time.perf_counter()
    store = NodeStore(store_dir / "node-0")
    if mode == "after":
        version, weights = store.load_merged_base("bench")
        cm.restore_base("bench", weights, version=version)
    else:
        cm.use_base(
            "bench",
            [stack_to_delta(store.load_base_update("bench", r)) for r in range(1, base_rounds + 1)],
            version=base_rounds,
        )
    t4 = time.perf_counter()
    return {"imports": t1 - t0, "data": t2 - t1, "model": t3 - t2, "base": t4 - t3, "examples": len(train)}


def bench_messages(work: Path, base_rounds: int, repeats: int) -> dict:
    store_dir = work / "node-state"
    subprocess.run(
        [sys.executable, __file__, "--prepare-node", str(store_dir), "--base-rounds", str(base_rounds)],
        check=True,
        capture_output=True,
    )
    out: dict = {}
    for mode in ("before", "after"):
        samples = []
        for _ in range(repeats):
            done = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(store_dir), "--base-rounds", str(base_rounds)],
                check=True,
                capture_output=True,
                text=True,
            )
            samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
        out[mode] = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        out[mode]["load_seconds"] = out[mode]["data"] + out[mode]["model"] + out[mode]["base"]
    out["load_before_over_after"] = out["before"]["load_seconds"] / out["after"]["load_seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--base-rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_deploy.json"))
    parser.add_argument("--child", nargs=2, metavar=("MODE", "STORE"))
    parser.add_argument("--prepare-node", metavar="STORE")
    args = parser.parse_args()
    if args.prepare_node:
        prepare_node(Path(args.prepare_node), args.base_rounds)
        return
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.base_rounds)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        result = {
            "messages": bench_messages(Path(tmp), args.base_rounds, args.repeats),
            "rounds": bench_rounds(args.rounds, Path(tmp)),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    m, r = result["messages"], result["rounds"]
    print(f"per message on a node (median of {args.repeats} fresh processes, FLoRA round {args.base_rounds + 1}):")
    for mode in ("before", "after"):
        x = m[mode]
        print(
            f"  {mode:6s}: imports {x['imports']:.2f} s | data {x['data']:.3f} s + model {x['model']:.3f} s + base {x['base']:.3f} s = {x['load_seconds']:.3f} s"
        )
    print(f"  load cost before/after: {m['load_before_over_after']:.1f}x")
    print(
        f"round wall (rounds 2..{args.rounds}): simulated {statistics.mean(r['simulated']['round_seconds']):.1f} s, deployed {statistics.mean(r['deployed']['round_seconds']):.1f} s, ratio {r['deployed_over_simulated']:.2f}"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
