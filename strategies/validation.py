"""Reply validation: whether a client's reply may be aggregated, and why not.

:func:`check_reply` turns a train reply into a :class:`fedpeft.strategies.types.ClientUpdate` or
raises :class:`RejectedUpdate` with the reason (a bad metric, another rank, missing or unexpected
keys, a wrong shape or dtype, NaN/Inf, a compressed upload that does not decode);
:func:`short_reason` cuts a failed client's traceback to its message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import torch
from flwr.app import Message

from fedpeft.compression.compeft import CompressionError, decode_update, payload_nbytes, upload_starts
from fedpeft.protocol import wire as protocol
from fedpeft.protocol.records import State, resize_rank, state_nbytes
from fedpeft.protocol.wire import ClientPlan
from fedpeft.strategies.types import ClientUpdate, NodeInfo


class RejectedUpdate(ValueError):
    """A client reply that must not be aggregated; the message says why."""


def short_reason(reason: str, *, limit: int = 300) -> str:
    """The client's own exception message out of a Ray/Flower traceback, cut to ``limit`` characters."""
    marker = "Message: "
    if marker in reason:
        reason = reason[reason.rindex(marker) + len(marker) :]
    reason = reason.strip().strip("'>").strip()
    reason = reason.splitlines()[0] if reason else "unknown error"
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def check_reply(msg: Message, node: NodeInfo, plan: ClientPlan, *, adapter: State, expected: set[str]) -> ClientUpdate:
    """``node``'s reply to ``plan`` as a :class:`ClientUpdate`, or raise :class:`RejectedUpdate` saying why.

    ``adapter`` is the global adapter at the node's rank (what the server sent, the reference for
    shapes, dtypes and the starts of compressed uploads); ``expected`` the keys the plan uploads.
    """
    try:
        state, metrics = protocol.decode_reply(msg.content)
        packed = protocol.decode_packed(msg.content)
    except ValueError as err:  # a ProtocolError, or a compressed record Flower cannot read as numpy
        raise RejectedUpdate(str(err)) from None
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(float(v)) for v in values):
            raise RejectedUpdate(f"metric {key!r} is not finite ({value})")
    num_examples = metrics.get(protocol.NUM_EXAMPLES)
    if not isinstance(num_examples, int) or num_examples <= 0:
        raise RejectedUpdate(f"num-examples must be a positive integer, got {num_examples!r}")
    if num_examples != node.num_examples:
        raise RejectedUpdate(f"num-examples {num_examples} differs from the {node.num_examples} the node declared")
    rank = metrics.get(protocol.RANK)
    if rank not in plan.reply_ranks():
        pruned = (
            f" or its pruned rank {plan.prune.pruned_rank(plan.rank)}"
            if plan.prune is not None and plan.rank is not None
            else ""
        )
        raise RejectedUpdate(f"rank {rank} differs from the assigned rank {plan.rank}{pruned}")
    nbytes = state_nbytes(state) + payload_nbytes(packed)  # what travelled, compressed or not
    if packed:
        state = unpack_uploads(plan, adapter, state, packed, expected=expected)
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise RejectedUpdate(
            f"adapter keys differ: missing {missing[:2]}{'...' if len(missing) > 2 else ''}, unexpected {extra[:2]}"
        )
    reference = adapter if rank == plan.rank else resize_rank(adapter, cast(int, rank))  # a reply rank: an int
    for key, tensor in state.items():
        ref = reference[key]
        if tensor.shape != ref.shape:
            raise RejectedUpdate(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(ref.shape)} (rank {rank})")
        if tensor.dtype != ref.dtype:
            raise RejectedUpdate(f"{key}: dtype {tensor.dtype}, expected {ref.dtype}")
        if not torch.isfinite(tensor).all():
            raise RejectedUpdate(f"{key}: contains NaN or Inf")
    return ClientUpdate(
        node_id=msg.metadata.src_node_id,
        rank=rank,
        num_examples=num_examples,
        state=state,
        metrics=metrics,
        nbytes=nbytes,
    )


def unpack_uploads(
    plan: ClientPlan, adapter: State, dense: State, packed: Mapping[str, Any], *, expected: set[str]
) -> State:
    """Dense uploads plus the compressed ones decoded onto the start the server knows (ComPEFT)."""
    both = sorted(set(dense) & set(packed))
    if both:
        raise RejectedUpdate(f"{both[0]} is uploaded both dense and compressed")
    unexpected = sorted(set(packed) - expected)
    if unexpected:
        raise RejectedUpdate(f"adapter keys differ: unexpected compressed {unexpected[:2]}")
    starts = upload_starts(plan, adapter, sorted(expected))
    unknown = sorted(set(packed) - set(starts))
    if unknown:
        raise RejectedUpdate(
            f"{unknown[0]} starts from the node's own state, which the server does not know: it must travel dense"
        )
    try:
        return {**dense, **decode_update(packed, {k: starts[k] for k in packed})}
    except CompressionError as err:
        raise RejectedUpdate(f"compressed upload: {err}") from None
