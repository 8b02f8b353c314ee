"""A worker's cached model carries nothing from one job to the next: runs repeat bit for bit.

The process-wide model (:func:`fedpeft.models.adapters.cached_model`) stays loaded across rounds, clients
and runs, as on a Ray worker. A run started in a process where other jobs already ran — the
same run before it, or another run whose clients trained at other ranks — gives the same metrics
and the same final adapter, bit for bit, as in a fresh process. The server loop runs over the
in-process Grid, which calls the real ClientApp in this process, so server and clients share the
cached model as they would share a Ray worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.cli.configs import compose_config
from fedpeft.clients.app import app
from fedpeft.models import adapters as models
from fedpeft.server.loop import run_federated
from tests.fakegrid import InProcessGrid

TINY = [
    "+exp=smoke",
    "num_rounds=2",
    "num_clients=2",
    "clients_per_round=2",
    "client.local_steps=2",
    "data.max_samples=60",
    "model.max_length=16",
    "strategy=fedavg",
]
CLOCK = {"wall_seconds", "train_seconds", "aggregation_seconds"}  # what may differ between repeats


def federate(run_dir: Path, *overrides: str) -> tuple[list[dict], dict]:
    """One tiny run over the in-process Grid: (its rows without clock readings, its final adapter)."""
    cfg = compose_config([*TINY, *overrides])
    run_dir.mkdir(parents=True)
    rows = run_federated(cfg, InProcessGrid(app, [{"partition-id": k} for k in range(cfg.num_clients)]), run_dir)
    final = run_dir / "final_adapter" / "adapter_model.safetensors"  # a moved base: the merged model
    return [without_clock(row) for row in rows], load_file(
        str(final if final.exists() else run_dir / "final_model" / "model.safetensors")
    )


def without_clock(value):
    if isinstance(value, dict):
        return {k: without_clock(v) for k, v in value.items() if k not in CLOCK}
    if isinstance(value, list):
        return [without_clock(v) for v in value]
    return value


def assert_bit_identical(first: tuple[list[dict], dict], second: tuple[list[dict], dict]) -> None:
    rows, adapter = first
    rows2, adapter2 = second
    assert rows2 == rows  # exact float equality of every loss, accuracy and byte count
    assert sorted(adapter2) == sorted(adapter)
    differ = [k for k in adapter if not torch.equal(adapter[k], adapter2[k])]
    assert not differ, f"final adapter differs in {differ[:3]}"


@pytest.fixture
def fresh_process():
    """The cache emptied before and after, as in a new worker process."""
    models.clear_cache()
    yield
    models.clear_cache()


@pytest.mark.parametrize(
    "overrides", [["model.peft=lora"], ["model.peft=ia3"], ["strategy=flora"]], ids=["lora", "ia3", "flora-moving-base"]
)
def test_the_same_run_twice_in_one_process_repeats_bit_for_bit(tmp_path, fresh_process, overrides):
    first = federate(tmp_path / "first", *overrides)
    second = federate(tmp_path / "second", *overrides)  # the cached model as the first run left it
    assert_bit_identical(first, second)


def test_a_run_after_other_clients_trained_at_other_ranks_repeats_bit_for_bit(tmp_path, fresh_process):
    reference = federate(tmp_path / "reference")
    models.clear_cache()
    # Another run on the same worker first: other clients, ranks 2 and 4 besides the configured 8
    # (more adapters on the cached model, their creation drawing from the global RNG).
    federate(
        tmp_path / "other",
        "num_clients=3",
        "clients_per_round=3",
        "strategy.ranks=[2,4,8]",
        "seed=0",
        "client.local_steps=1",
    )
    assert_bit_identical(reference, federate(tmp_path / "again"))
