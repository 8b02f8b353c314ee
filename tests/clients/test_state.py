"""A deployed node's disk state: the merged FLoRA base it restores equals replaying every update."""

from __future__ import annotations

import copy

import torch

from fedpeft.clients.state import NodeStore
from fedpeft.models.adapters import CachedModel


def test_restored_merged_base_is_bit_identical_to_replaying_every_update(tiny_bert, tmp_path):
    cpu = torch.device("cpu")
    running = CachedModel(model=tiny_bert, cfg=None, device=cpu)  # a process that lived through every round
    replayed = CachedModel(model=copy.deepcopy(tiny_bert), cfg=None, device=cpu)  # a new process, no saved base
    restored = CachedModel(model=copy.deepcopy(tiny_bert), cfg=None, device=cpu)  # a new process, saved base
    gen = torch.Generator().manual_seed(0)
    deltas = [
        {
            n: 0.1 * torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64)
            for n, layer in running.base_layers().items()
        }
        for _ in range(3)
    ]
    store = NodeStore(tmp_path)
    for version in (1, 2):
        running.use_base("run", deltas[version - 1 : version], version=version)
    store.save_merged_base("run", 2, running.merged_base())
    running.use_base("run", deltas[2:], version=3)

    saved_version, weights = store.load_merged_base("run")
    restored.restore_base("run", weights, version=saved_version)
    restored.use_base("run", deltas[2:], version=3)
    replayed.use_base("run", deltas, version=3)

    for a, b, c in zip(
        running.base_layers().values(), restored.base_layers().values(), replayed.base_layers().values()
    ):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, c.weight)
    assert saved_version == 2 and restored.base_version == 3
    # a different run in the same process starts again from W_0
    restored.use_base("other", [], version=0)
    assert all(torch.equal(m.weight, w) for m, w in zip(restored.base_layers().values(), restored.pristine.values()))
