"""ComPEFT uplink compression: top-k sparsification and ternary quantisation of adapter updates.

"ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification and
Quantization", Yadav et al., https://arxiv.org/abs/2311.13171.

Per tensor a client sends the update ``delta = trained - received`` (shape of the tensor, n
entries). The ``k = min(ceil(density * n), nnz(delta))`` entries of largest ``|delta|`` are kept
(ties broken by position, so the choice is deterministic), and each is replaced by

    delta_hat[i] = sign(delta[i]) * scale          (i kept),    delta_hat[i] = 0   (otherwise)

with one ``scale`` per tensor (``scale`` setting):

* ``"std"`` — ComPEFT's ternary form: ``scale = alpha * std(delta)``, std over all n entries
  (Bessel-corrected, as ``torch.std``), ``alpha`` a hyper-parameter; where std is 0 or undefined
  (a constant tensor, a single entry) the ``"mean"`` scale is used, or the update would vanish;
* ``"mean"`` — ``scale = mean(|delta[i]|, i kept)``: the least-squares scale for the kept signs
  (``argmin_s Σ_kept (|delta_i| - s)^2``); a ternary delta at density 1 travels exactly;
* ``"exact"`` — no quantisation: the kept values travel as floats (top-k sparsification only);
  at density 1 the decoded delta equals ``delta`` bit for bit.

Zero entries are never kept (they carry nothing, and a sign bit cannot say zero).

Wire format: one ``uint8`` array per tensor, under the tensor's own key, so an upload has as many
arrays (and the same Flower framing) as an uncompressed one. Little-endian::

    version u8 (=1) | flags u8 | dtype u8 | ndim u8 | shape u32 x ndim | count u32
    | scale (one value; "exact": count values) in the value dtype (float64 for float64 tensors, else float32)
    | sign bits: ceil(count / 8) bytes, LSB first, 1 = negative (ternary only)
    | positions: the rest of the array

``flags``: bit 0 — positions as run lengths, bit 2 — every entry kept (no position bytes), neither —
a bitmask; bit 1 — exact values (else ternary). Positions travel as a bitmask of n bits
(``ceil(n / 8)`` bytes, LSB first) or as the gaps between kept positions (``p_0, p_1 - p_0 - 1, ...``)
in LEB128 varints, whichever is smaller for that tensor, or not at all when all n entries are kept. :func:`payload_nbytes` counts exactly these bytes.

Error feedback (``error_feedback``): the client adds what compression dropped last time
(the residual ``e``) to this round's delta before compressing, and keeps ``e' = delta + e - delta_hat``;
over rounds ``Σ delta_hat_t + e_T = Σ delta_t`` (nothing is lost, only delayed).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.config.schema import CompressionConfig
from fedpeft.protocol.records import seeded_tensors
from fedpeft.protocol.wire import ClientPlan, Source, keys_with_roles

VERSION = 1
SCALES = ("std", "mean", "exact")
_GAPS, _EXACT, _ALL = 0b001, 0b010, 0b100
_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_OF_CODE = {code: dtype for dtype, code in _DTYPES.items()}
_MAX_VARINT_BYTES = 5  # gaps are < 2**32


class CompressionError(ValueError):
    """A compressed payload that cannot be decoded (or bad settings); the message says why."""


@dataclass(frozen=True)
class ComPEFT:
    """Settings of the ComPEFT codec (see the module docstring for the math)."""

    density: float = 0.1
    alpha: float = 1.0
    scale: str = "std"

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise CompressionError(f"compression density must be in (0, 1], got {self.density}")
        if self.scale not in SCALES:
            raise CompressionError(f"compression scale must be one of {SCALES}, got {self.scale!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise CompressionError(f"compression alpha must be a finite number > 0, got {self.alpha}")


COMPRESSIONS = ("none", "compeft")


def codec_from_config(cfg: CompressionConfig) -> ComPEFT | None:
    """The codec a :class:`fedpeft.config.schema.CompressionConfig` asks for (None: dense uploads); checks it."""
    if cfg.name not in COMPRESSIONS:
        raise CompressionError(f"compression must be one of {COMPRESSIONS}, got {cfg.name!r}")
    if cfg.name == "none":
        return None
    return ComPEFT(density=cfg.density, alpha=cfg.alpha, scale=cfg.scale)


@dataclass(frozen=True)
class CompressedTensor:
    """One tensor's compressed update, before packing.

    ``positions``: sorted flat indices of the kept entries (int64); ``negative``: their sign bits
    (ternary) or None; ``values``: ``(scale,)`` (ternary) or the kept values (exact), float64.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    positions: np.ndarray
    negative: np.ndarray | None
    values: np.ndarray

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ------------------------------------------------------------------------------ the math
def kept_positions(delta: np.ndarray, density: float) -> np.ndarray:
    """Sorted flat positions of the ``min(ceil(density * n), nnz)`` largest ``|delta|`` (ties: lower position first)."""
    flat = np.abs(delta.reshape(-1))
    k = min(math.ceil(density * flat.size - 1e-9), int(np.count_nonzero(flat)))
    order = np.argsort(-flat, kind="stable")
    return np.sort(order[:k]).astype(np.int64)


def compress(delta: torch.Tensor, codec: ComPEFT) -> CompressedTensor:
    """Sparsify and quantise one update tensor (any shape; float16/bfloat16/float32/float64)."""
    if delta.dtype not in _DTYPES:
        raise CompressionError(f"cannot compress a {delta.dtype} tensor (floating tensors only)")
    if delta.dim() > 255 or any(s >= 2**32 for s in delta.shape):
        raise CompressionError(f"tensor of shape {tuple(delta.shape)} is too large for the wire format")
    d = delta.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(d).all():
        raise CompressionError("cannot compress an update holding NaN or Inf")
    positions = kept_positions(d, codec.density)
    kept = d.reshape(-1)[positions]
    if codec.scale == "exact":
        values, negative = kept.astype(np.float64), None
    else:
        # min + mean(|x| - min): the mean magnitude, and exactly c when every kept |x| is c.
        magnitude = np.abs(kept)
        mean = float(magnitude.min() + (magnitude - magnitude.min()).mean()) if kept.size else 0.0
        std = float(np.std(d, ddof=1)) if d.size > 1 else 0.0
        scale = codec.alpha * std if codec.scale == "std" and std > 0 else mean
        values, negative = np.array([scale], dtype=np.float64), kept < 0
    # What the receiver will see: values rounded to the value dtype travel.
    values = values.astype(_value_dtype(delta.dtype)).astype(np.float64)
    return CompressedTensor(
        shape=tuple(delta.shape), dtype=delta.dtype, positions=positions, negative=negative, values=values
    )


def decompress(ct: CompressedTensor) -> torch.Tensor:
    """The dense update ``delta_hat`` (zeros outside the kept positions), in ``ct.dtype``."""
    out = np.zeros(ct.numel, dtype=np.float64)
    if ct.negative is None:
        out[ct.positions] = ct.values
    else:
        out[ct.positions] = np.where(ct.negative, -ct.values[0], ct.values[0])
    return torch.from_numpy(out.reshape(ct.shape)).to(ct.dtype)


# ------------------------------------------------------------------------------ packing
def _value_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype("<f8") if dtype == torch.float64 else np.dtype("<f4")


def leb128(values: np.ndarray) -> bytes:
    """Unsigned LEB128 varints of non-negative integers (7 bits a byte, high bit = more follow)."""
    out = bytearray()
    for v in values.tolist():
        while True:
            byte, v = v & 0x7F, v >> 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def read_leb128(buf: np.ndarray) -> np.ndarray:
    """Decode a stream of unsigned LEB128 varints (vectorised); ``CompressionError`` if malformed."""
    if buf.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = buf < 0x80
    if not last[-1]:
        raise CompressionError("run-length positions end inside a varint")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    if (ends - starts + 1).max() > _MAX_VARINT_BYTES:
        raise CompressionError(f"run-length varint longer than {_MAX_VARINT_BYTES} bytes")
    index_in_group = np.arange(buf.size) - np.repeat(starts, ends - starts + 1)
    parts = (buf.astype(np.int64) & 0x7F) << (7 * index_in_group)
    return np.add.reduceat(parts, starts)


def encode_positions(positions: np.ndarray, numel: int) -> tuple[int, bytes]:
    """(flag, bytes): nothing if every entry is kept, else the bitmask or the LEB128 gaps, whichever is smaller (a tie goes to the bitmask)."""
    if positions.size == numel:
        return _ALL, b""
    gaps = np.diff(positions, prepend=-1) - 1
    runs = leb128(gaps)
    if len(runs) < (numel + 7) // 8:
        return _GAPS, runs
    mask = np.zeros(numel, dtype=bool)
    mask[positions] = True
    return 0, np.packbits(mask, bitorder="little").tobytes()


def pack(ct: CompressedTensor) -> np.ndarray:
    """The wire form of one compressed tensor: a 1-D ``uint8`` array (layout in the module docstring)."""
    flag, positions = encode_positions(ct.positions, ct.numel)
    exact = ct.negative is None
    head = struct.pack(
        f"<4B{len(ct.shape)}I", VERSION, flag | (_EXACT if exact else 0), _DTYPES[ct.dtype], len(ct.shape), *ct.shape
    )
    head += struct.pack("<I", ct.positions.size)
    values = ct.values.astype(_value_dtype(ct.dtype)).tobytes()
    signs = b"" if ct.negative is None else np.packbits(ct.negative, bitorder="little").tobytes()
    return np.frombuffer(head + values + signs + positions, dtype=np.uint8).copy()


def unpack(
    buf: np.ndarray, *, expected_shape: tuple[int, ...] | None = None, expected_dtype: torch.dtype | None = None
) -> CompressedTensor:
    """Parse and validate one packed tensor; ``CompressionError`` naming the problem if malformed."""
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        raise CompressionError(
            f"a compressed tensor is a 1-D uint8 array, got {getattr(buf, 'dtype', type(buf).__name__)} of shape {getattr(buf, 'shape', '?')}"
        )
    raw = buf.tobytes()
    if len(raw) < 4:
        raise CompressionError(f"compressed tensor of {len(raw)} bytes is shorter than its header")
    version, flags, dtype_code, ndim = struct.unpack_from("<4B", raw)
    if version != VERSION:
        raise CompressionError(f"unknown compression format version {version} (this fedpeft reads version {VERSION})")
    if flags & ~(_GAPS | _EXACT | _ALL) or (flags & _GAPS and flags & _ALL):
        raise CompressionError(f"unknown compression flags {flags:#04x}")
    if dtype_code not in _DTYPE_OF_CODE:
        raise CompressionError(f"unknown dtype code {dtype_code}")
    dtype = _DTYPE_OF_CODE[dtype_code]
    offset = 4 + 4 * ndim + 4
    if len(raw) < offset:
        raise CompressionError(f"compressed tensor of {len(raw)} bytes is shorter than its {offset}-byte header")
    *dims, count = struct.unpack_from(f"<{ndim}II", raw, 4)
    shape = tuple(dims)
    numel = math.prod(shape)
    if expected_shape is not None and shape != tuple(expected_shape):
        raise CompressionError(f"compressed tensor has shape {shape}, expected {tuple(expected_shape)}")
    if expected_dtype is not None and dtype != expected_dtype:
        raise CompressionError(f"compressed tensor has dtype {dtype}, expected {expected_dtype}")
    if count > numel:
        raise CompressionError(f"compressed tensor keeps {count} entries of a tensor with {numel}")
    exact = bool(flags & _EXACT)
    vdtype = _value_dtype(dtype)
    n_values = count if exact else 1
    n_signs = 0 if exact else (count + 7) // 8
    if len(raw) < offset + n_values * vdtype.itemsize + n_signs:
        raise CompressionError(f"compressed tensor of {len(raw)} bytes is too short for {count} kept entries")
    values = np.frombuffer(raw, dtype=vdtype, count=n_values, offset=offset).astype(np.float64)
    offset += n_values * vdtype.itemsize
    if not np.isfinite(values).all():
        raise CompressionError("compressed tensor has a NaN or Inf " + ("value" if exact else "scale"))
    if not exact and values[0] < 0:
        raise CompressionError(f"compressed tensor has a negative scale {values[0]} (signs travel in the sign bits)")
    negative = None
    if not exact:
        bits = np.frombuffer(raw, dtype=np.uint8, count=n_signs, offset=offset)
        negative = np.unpackbits(bits, bitorder="little", count=count).astype(bool)
        if count % 8 and bits[-1] >> (count % 8):
            raise CompressionError("compressed tensor has sign bits set past its kept entries")
        offset += n_signs
    rest = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if flags & _ALL:
        if count != numel or rest.size:
            raise CompressionError(f"'every entry kept' with {count} of {numel} entries and {rest.size} position bytes")
        positions = np.arange(numel)
    elif flags & _GAPS:
        gaps = read_leb128(rest)
        if gaps.size != count:
            raise CompressionError(f"run-length positions hold {gaps.size} entries, the header says {count}")
        positions = np.cumsum(gaps + 1) - 1
        if count and positions[-1] >= numel:
            raise CompressionError(f"position {int(positions[-1])} is out of range for a tensor of {numel} entries")
    else:
        if rest.size != (numel + 7) // 8:
            raise CompressionError(
                f"position bitmask has {rest.size} bytes, a tensor of {numel} entries needs {(numel + 7) // 8}"
            )
        mask = np.unpackbits(rest, bitorder="little")
        if mask[numel:].any():
            raise CompressionError("position bitmask has bits set past the end of the tensor")
        positions = np.flatnonzero(mask[:numel])
        if positions.size != count:
            raise CompressionError(f"position bitmask marks {positions.size} entries, the header says {count}")
    return CompressedTensor(
        shape=shape, dtype=dtype, positions=positions.astype(np.int64), negative=negative, values=values
    )


def payload_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Exact bytes of an encoded upload: the sum of its arrays' sizes (as ``records.state_nbytes`` for dense ones)."""
    return sum(int(a.nbytes) for a in arrays.values())


# ------------------------------------------------------------------------------ whole updates
def encode_update(
    trained: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    codec: ComPEFT,
    *,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """Compress ``trained - reference`` key by key; returns (packed arrays, new residual).

    ``residual`` (error feedback) is added to each delta before compressing; the returned residual
    is what this compression dropped, ``delta + residual - delta_hat``, in the tensor's dtype (all
    zeros without error feedback are still returned, so the caller can decide to keep them).
    """
    missing = sorted(set(trained) - set(reference))
    if missing:
        raise CompressionError(f"no reference tensor for {missing[:3]}")
    packed: dict[str, np.ndarray] = {}
    dropped: dict[str, torch.Tensor] = {}
    for key in sorted(trained):
        t, ref = trained[key], reference[key]
        if t.shape != ref.shape:
            raise CompressionError(
                f"{key}: trained shape {tuple(t.shape)} differs from its reference {tuple(ref.shape)}"
            )
        delta = t.detach().to(torch.float64) - ref.detach().to(torch.float64)
        if residual is not None and key in residual:
            delta = delta + residual[key].to(torch.float64)
        ct = compress(delta.to(t.dtype) if t.dtype != torch.float64 else delta, codec)
        packed[key] = pack(ct)
        dropped[key] = (delta - decompress(ct).to(torch.float64)).to(t.dtype)
    return packed, dropped


def decode_update(arrays: Mapping[str, np.ndarray], reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``reference + delta_hat`` for every packed tensor, each validated against its reference's shape and dtype."""
    out: dict[str, torch.Tensor] = {}
    for key in sorted(arrays):
        if key not in reference:
            raise CompressionError(f"{key}: compressed tensor for a key the server did not send")
        ref = reference[key]
        try:
            ct = unpack(arrays[key], expected_shape=tuple(ref.shape), expected_dtype=ref.dtype)
        except CompressionError as err:
            raise CompressionError(f"{key}: {err}") from None
        out[key] = (ref.to(torch.float64) + decompress(ct).to(torch.float64)).to(ref.dtype)
    return out


# ------------------------------------------------------------------------------ the protocol's uploads
def compressible_keys(plan: ClientPlan, keys: Iterable[str]) -> list[str]:
    """Uploaded keys whose start the server knows (sent, seeded or zero): their update can travel compressed.

    A group that starts from the node's own state has a start only the node knows, so it travels dense.
    """
    return sorted(k for k in keys if plan.group_of(k).source != Source.NODE)


def compress_uploads(
    uploads: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    plan: ClientPlan,
    codec: ComPEFT,
    *,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """A client's uploads as (dense tensors, packed updates, new error-feedback residual).

    A residual tensor whose shape no longer fits (the node's rank changed) is dropped.
    """
    keys = compressible_keys(plan, uploads)
    fitting = {k: r for k, r in (residual or {}).items() if k in uploads and tuple(r.shape) == tuple(uploads[k].shape)}
    packed, dropped = encode_update({k: uploads[k] for k in keys}, {k: start[k] for k in keys}, codec, residual=fitting)
    return {k: v for k, v in uploads.items() if k not in packed}, packed, dropped


def upload_starts(
    plan: ClientPlan, adapter: Mapping[str, torch.Tensor], keys: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The start of each compressible uploaded key as the server knows it: ``adapter`` (the tensors it
    sent, at the client's rank), a seeded draw, or zeros (the client's :func:`fedpeft.clients.job.start_state`)."""
    out: dict[str, torch.Tensor] = {}
    for key in compressible_keys(plan, keys):
        group = plan.group_of(key)
        if group.source == Source.MESSAGE:
            out[key] = adapter[key]
        elif group.source == Source.SEED:  # drawn group-wide, key by key, exactly as the client draws it
            if group.seed is None:
                raise CompressionError(f"group {sorted(group.roles)} is seeded and has no seed")
            drawn = seeded_tensors(
                adapter, keys_with_roles(list(adapter), group.roles), seed=group.seed, seed_rank=group.seed_rank
            )
            out[key] = drawn[key]
        else:
            out[key] = torch.zeros_like(adapter[key])
    return out
