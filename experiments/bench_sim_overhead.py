"""Benchmark: a simulated run (Flower + Ray) against the same local training in a plain Python loop.

Both sides train the same clients for the same steps on the same data with the same FedIT
aggregation and evaluate once at the end; the plain loop runs the clients one after the other in
this process with all cores, the simulation runs them on Ray workers (one core each). The ratio
``simulation wall / plain wall`` is the price of the federated machinery. Target: <= 1.10.

    python experiments/bench_sim_overhead.py [--rounds 6] [--out experiments/results/bench_sim_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from fedpeft.config.schema import Config, to_config
from fedpeft.data.encoding import encode, make_loader
from fedpeft.data.partition import prepare
from fedpeft.models import adapters as models
from fedpeft.server.evaluation import ServerEvaluator, initial_adapter
from fedpeft.strategies.fedavg import fedit
from fedpeft.strategies.types import GlobalModel
from fedpeft.training.local import num_local_steps, train_local

REPO = Path(__file__).resolve().parents[1]


def bench_config(rounds: int) -> Config:
    return to_config(
        {
            "seed": 0,
            "num_rounds": rounds,
            "num_clients": 10,
            "clients_per_round": 4,
            "eval_every": 10_000,  # evaluate after the last round only, as the plain loop does
            "save_adapter": False,
            "strategy": {"name": "fedavg"},
        }
    )


def plain_loop(cfg: Config) -> tuple[float, float]:
    """The same work without Flower or Ray; returns (wall seconds, final accuracy)."""
    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients)
    evaluator = ServerEvaluator(cfg, data, lineage="plain")
    cm = evaluator.cm
    rank = cfg.model.lora.r
    adapter = initial_adapter(cm, rank=rank, seed=cfg.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    encoded = {
        k: encode(data.client_split(k)[0], tokenizer, max_length=cfg.model.max_length, task=cfg.model.task)
        for k in range(cfg.num_clients)
    }
    rng = random.Random(cfg.seed)
    for _ in range(cfg.num_rounds):
        sampled = sorted(rng.sample(range(cfg.num_clients), cfg.clients_per_round))
        states, counts = [], []
        for pid in sampled:
            model = cm.activate(rank)
            cm.load_adapter_state(rank, adapter)
            loader = make_loader(
                encoded[pid],
                pad_token_id=tokenizer.pad_token_id,
                batch_size=cfg.client.batch_size,
                shuffle=True,
                seed=pid,
            )
            steps = num_local_steps(
                num_examples=len(encoded[pid]),
                batch_size=cfg.client.batch_size,
                local_epochs=cfg.client.local_epochs,
                local_steps=cfg.client.local_steps,
            )
            train_local(model, loader, num_steps=steps, lr=cfg.client.lr, device=cm.device)
            states.append(cm.adapter_state(rank))
            counts.append(len(encoded[pid]))
        weights = torch.tensor(counts, dtype=torch.float64) / sum(counts)
        adapter, _ = fedit(states, weights, rank=rank)
    result = evaluator(GlobalModel(adapter=adapter, rank=rank))
    return time.perf_counter() - started, result.accuracy


def simulated(cfg: Config) -> tuple[float, float, float]:
    """(wall seconds of the whole run, seconds before round 1 started, final accuracy)."""
    from fedpeft.run import execute

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        rows = execute(cfg, Path(tmp))
        wall = time.perf_counter() - started
    rounds = sum(r["wall_seconds"] for r in rows)
    return wall, wall - rounds, rows[-1]["test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_sim_overhead.json"))
    args = parser.parse_args()
    cfg = bench_config(args.rounds)
    plain_wall, plain_acc = plain_loop(cfg)
    models.clear_cache()
    sim_wall, sim_setup, sim_acc = simulated(cfg)
    result = {
        "rounds": cfg.num_rounds,
        "clients": cfg.num_clients,
        "clients_per_round": cfg.clients_per_round,
        "local_steps": cfg.client.local_steps,
        "batch_size": cfg.client.batch_size,
        "max_length": cfg.model.max_length,
        "cpu_count": os.cpu_count(),
        "plain_seconds": round(plain_wall, 2),
        "simulation_seconds": round(sim_wall, 2),
        "simulation_startup_seconds": round(sim_setup, 2),
        "ratio": round(sim_wall / plain_wall, 3),
        "ratio_without_startup": round((sim_wall - sim_setup) / plain_wall, 3),
        "plain_accuracy": plain_acc,
        "simulation_accuracy": sim_acc,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"simulation / plain loop = {result['ratio']:.3f} (target <= 1.10); written to {out}")


if __name__ == "__main__":
    main()
