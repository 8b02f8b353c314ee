"""Adapter tensors <-> Flower records, LoRA pairing by exact PEFT key, and exact byte counts.

Only adapter (LoRA factors) and head tensors ever travel; base weights never do. Keys on the wire
are peft's own state-dict keys (``get_peft_model_state_dict``), e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoraPair:
    """Keys of one adapted layer: ``lora_a`` is (r, d_in), ``lora_b`` is (d_out, r)."""

    module: str
    a_key: str
    b_key: str


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[list[LoraPair], list[str]]:
    """LoRA pairs (matched by exact suffix, never by substring or shape) and the other keys (heads).

    Raises ``ValueError`` if an A has no B or vice versa.
    """
    a_modules = {k[: -len(LORA_A_SUFFIX)]: k for k in state if k.endswith(LORA_A_SUFFIX)}
    b_modules = {k[: -len(LORA_B_SUFFIX)]: k for k in state if k.endswith(LORA_B_SUFFIX)}
    if a_modules.keys() != b_modules.keys():
        lonely = sorted(a_modules.keys() ^ b_modules.keys())
        raise ValueError(f"LoRA factors without their partner for modules {lonely[:3]}")
    pairs = [LoraPair(module=m, a_key=a_modules[m], b_key=b_modules[m]) for m in sorted(a_modules)]
    paired = set(a_modules.values()) | set(b_modules.values())
    others = sorted(k for k in state if k not in paired)
    return pairs, others


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord holding copies of the tensors (the caller's tensors are never shared)."""
    record = ArrayRecord()
    for key, tensor in state.items():
        record[key] = Array(np.ascontiguousarray(tensor.detach().cpu().numpy()))
    return record


def from_record(record: ArrayRecord) -> State:
    """Tensors from an ArrayRecord (copies: the record is left untouched)."""
    return {key: torch.from_numpy(np.array(array.numpy(), copy=True)) for key, array in record.items()}


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Exact payload bytes: the sum of numel * itemsize over tensors."""
    return sum(t.numel() * t.element_size() for t in state.values())


def rank_dim(key: str) -> int | None:
    """The rank dimension of an adapter tensor: 0 for ``lora_A`` (r, d_in), 1 for ``lora_B`` (d_out, r), else None."""
    if key.endswith(LORA_A_SUFFIX):
        return 0
    if key.endswith(LORA_B_SUFFIX):
        return 1
    return None


def resize_factor(tensor: torch.Tensor, rank: int, *, dim: int) -> torch.Tensor:
    """``tensor`` cut to its first ``rank`` slices along ``dim``, or zero-padded up to ``rank`` (a copy).

    For a LoRA pair (``lora_a`` along dim 0, ``lora_b`` along dim 1) padding leaves ``B @ A``
    unchanged and cutting keeps the first r components (HetLoRA).
    """
    r = tensor.shape[dim]
    if rank <= r:
        return tensor.narrow(dim, 0, rank).clone()
    shape = list(tensor.shape)
    shape[dim] = rank - r
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def resize_rank(state: Mapping[str, torch.Tensor], rank: int) -> State:
    """Every LoRA factor resized to ``rank`` (:func:`resize_factor`); other tensors (heads) copied."""
    out: State = {}
    for key, tensor in state.items():
        dim = rank_dim(key)
        out[key] = tensor.clone() if dim is None else resize_factor(tensor, rank, dim=dim)
    return dict(sorted(out.items()))


def round_seed(seed: int, server_round: int) -> int:
    """The seed of round ``server_round`` in a run seeded ``seed``: one formula for every per-round draw
    (a fresh adapter's A, a client's shuffling, the centralised reference's shuffling)."""
    return seed * 1_000_003 + server_round


def seeded_tensors(
    template: Mapping[str, torch.Tensor], keys: Sequence[str], *, seed: int, seed_rank: int | None = None
) -> State:
    """Deterministic draws for ``keys`` of ``template`` (shapes and dtypes) from ``seed``.

    Kaiming-uniform as peft initialises ``lora_A`` (bound ``1/sqrt(fan_in)``, fan_in the second
    dimension, or the size of a vector), drawn in float64 from one CPU generator key by key in
    sorted order, then cast: bit-identical on every machine holding the same keys and shapes.
    With ``seed_rank`` a LoRA factor is drawn at that rank and cut to its own, so clients of
    every rank share the first components of one draw.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: State = {}
    for key in sorted(keys):
        like = template[key]
        shape, dim = list(like.shape), rank_dim(key)
        if seed_rank is not None and dim is not None:
            shape[dim] = seed_rank
        fan_in = shape[1] if len(shape) >= 2 else shape[0]
        bound = 1.0 / math.sqrt(fan_in)
        draw = torch.rand(shape, generator=gen, dtype=torch.float64) * (2 * bound) - bound
        if dim is not None:
            draw = draw.narrow(dim, 0, like.shape[dim])
        out[key] = draw.to(like.dtype).contiguous()
    return out


def fresh_lora(state: Mapping[str, torch.Tensor], *, seed: int) -> State:
    """``state`` with every ``lora_A`` drawn from ``seed`` (:func:`seeded_tensors`) and every ``lora_B``
    zero (peft's LoRA init, reproducible); other tensors copied."""
    a_keys = [k for k in state if k.endswith(LORA_A_SUFFIX)]
    out: State = {k: torch.zeros_like(v) if k.endswith(LORA_B_SUFFIX) else v.clone() for k, v in state.items()}
    out.update(seeded_tensors(state, a_keys, seed=seed))
    return out


def exact_product(lora_b: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``lora_b @ lora_a`` in float64, summed rank by rank in a fixed order.

    ``lora_b: (d_out, r)``, ``lora_a: (r, d_in)`` -> ``(d_out, d_in)``. Elementwise products and a
    fixed summation order make the result bit-identical in every process whatever its BLAS and
    thread count, which a moving base needs: the server and every client merge the same ΔW into W.
    """
    b, a = lora_b.to(torch.float64), lora_a.to(torch.float64)
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"lora_b {tuple(b.shape)} and lora_a {tuple(a.shape)} have different ranks")
    out = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
    for j in range(a.shape[0]):
        out.add_(torch.outer(b[:, j], a[j]))
    return out


def stack_to_delta(stacks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked factors -> ΔW per module, computed with :func:`exact_product`.

    ``stacks`` holds ``<module>.lora_A.weight: (Σr, d_in)`` and ``<module>.lora_B.weight:
    (d_out, Σr)`` (a base update's stack, scalings folded into A); returns ``{<module>: ΔW (d_out, d_in)}``.
    """
    pairs, others = split_state(stacks)
    if others:
        raise ValueError(f"a base update holds only LoRA stacks, got {others[:3]}")
    return {pair.module: exact_product(stacks[pair.b_key], stacks[pair.a_key]) for pair in pairs}
