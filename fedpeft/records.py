"""Adapter tensors <-> Flower records, LoRA pairing by exact PEFT key, and exact byte counts.

Only adapter (LoRA factors) and head tensors ever travel; base weights never do. Keys on the wire
are peft's own state-dict keys (``get_peft_model_state_dict``), e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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


def lora_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The rank shared by all LoRA pairs in ``state`` (``ValueError`` if they disagree or mismatch)."""
    pairs, _ = split_state(state)
    ranks = set()
    for pair in pairs:
        a, b = state[pair.a_key], state[pair.b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{pair.module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form a LoRA pair")
        ranks.add(a.shape[0])
    if len(ranks) != 1:
        raise ValueError(f"adapter mixes LoRA ranks {sorted(ranks)}")
    return ranks.pop()


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


def resize_rank(state: Mapping[str, torch.Tensor], rank: int) -> State:
    """Every LoRA pair cut to its first ``rank`` components, or zero-padded up to ``rank``.

    Cutting keeps the first r rows of A and the first r columns of B (HetLoRA); padding appends
    zero rows to A and zero columns to B, so ``B @ A`` is unchanged by padding. Other tensors
    (heads) are copied as they are.
    """
    pairs, others = split_state(state)
    out: State = {k: state[k].clone() for k in others}
    for pair in pairs:
        a, b = state[pair.a_key], state[pair.b_key]
        r = a.shape[0]
        if rank <= r:
            out[pair.a_key], out[pair.b_key] = a[:rank].clone(), b[:, :rank].clone()
        else:
            out[pair.a_key] = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)
            out[pair.b_key] = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    return dict(sorted(out.items()))


def seeded_lora_a(state: Mapping[str, torch.Tensor], *, seed: int) -> State:
    """Every ``lora_A`` in ``state`` replaced by a deterministic draw from ``seed``.

    Kaiming-uniform (peft's default for A: bound ``1/sqrt(d_in)``), drawn in float64 from a CPU
    generator layer by layer in sorted key order, then cast: bit-identical on every machine that
    holds the same keys and shapes. FFA-LoRA uses it so that A never has to travel, and FLoRA to
    make each round's fresh adapter reproducible. Other tensors are copied unchanged.
    """
    pairs, _ = split_state(state)
    out: State = {k: v.clone() for k, v in state.items()}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for pair in sorted(pairs, key=lambda p: p.a_key):
        a = state[pair.a_key]
        bound = 1.0 / math.sqrt(a.shape[1])
        draw = torch.rand(a.shape, generator=gen, dtype=torch.float64) * (2 * bound) - bound
        out[pair.a_key] = draw.to(a.dtype)
    return out


def exact_product(lora_b: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``lora_b @ lora_a`` in float64, summed rank by rank in a fixed order.

    ``lora_b: (d_out, r)``, ``lora_a: (r, d_in)`` -> ``(d_out, d_in)``. Elementwise products and a
    fixed summation order make the result bit-identical in every process whatever its BLAS and
    thread count, which FLoRA needs: the server and every client merge the same ΔW into W.
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
    (d_out, Σr)`` (FLoRA's stack, scalings folded into A); returns ``{<module>: ΔW (d_out, d_in)}``.
    """
    pairs, others = split_state(stacks)
    if others:
        raise ValueError(f"a base update holds only LoRA stacks, got {others[:3]}")
    return {pair.module: exact_product(stacks[pair.b_key], stacks[pair.a_key]) for pair in pairs}
