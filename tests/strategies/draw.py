"""Shared hypothesis settings and size draws for the rule tests (float64, both factors random)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=40, deadline=None)
A, B, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "m.head.weight"


def sizes(*, spare: bool = False):
    """Client count, layer dims, per-client ranks, a seed (and spare rank above r_max if asked)."""
    fields = {
        "clients": st.integers(1, 5),
        "d_in": st.integers(1, 7),
        "d_out": st.integers(1, 7),
        "ranks": st.lists(st.integers(1, 5), min_size=5, max_size=5),
        "seed": st.integers(0, 10_000),
    }
    if spare:
        fields["spare"] = st.integers(0, 2)
    return st.fixed_dictionaries(fields)


def upload_keys_at(strategy, rank: int) -> set[str]:
    """The keys a rank-``rank`` client must upload under the strategy's round-1 plan."""
    from fedpeft.strategies.types import NodeInfo

    node = NodeInfo(node_id=-1, partition_id=-1, rank=rank, num_examples=1)
    return strategy.upload_keys(node, strategy.plan(node, 1))
