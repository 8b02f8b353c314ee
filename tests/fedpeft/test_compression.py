"""ComPEFT codec: round trips, exact modes, byte counts, malformed payloads, error feedback."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedpeft.compression.compeft import (
    ComPEFT,
    CompressionError,
    compress,
    decode_update,
    decompress,
    encode_update,
    kept_positions,
    pack,
    payload_nbytes,
    read_leb128,
    unpack,
)

SETTINGS = settings(max_examples=60, deadline=None)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9)
densities = st.sampled_from([1.0, 0.5, 0.2, 0.1, 0.05]) | st.floats(0.001, 1.0)


@st.composite
def deltas(draw, *, elements=finite):
    """A float64 update with repeated values and zeros mixed in (ties and zeros are the edge cases)."""
    shape = draw(shapes)
    values = draw(hnp.arrays(np.float64, shape, elements=elements | st.sampled_from([0.0, 1.0, -1.0])))
    return torch.from_numpy(values)


def varint_len(v: int) -> int:
    """Bytes of one LEB128 varint, by its definition (7 payload bits a byte)."""
    return max(1, math.ceil(v.bit_length() / 7))


def expected_nbytes(delta: torch.Tensor, positions: list[int], *, exact: bool) -> int:
    """Size of the wire form, from the layout in the module docstring (an independent count)."""
    n, k = delta.numel(), len(positions)
    item = 8 if delta.dtype == torch.float64 else 4
    header = 4 + 4 * delta.dim() + 4
    values = k * item if exact else item + math.ceil(k / 8)
    gaps = [p - q - 1 for p, q in zip(positions, [-1] + positions[:-1])]
    runs = sum(varint_len(g) for g in gaps)
    return header + values + (0 if k == n else runs if runs < math.ceil(n / 8) else math.ceil(n / 8))


# ------------------------------------------------------------------------------ properties
@SETTINGS
@given(delta=deltas(), density=densities, scale=st.sampled_from(["std", "mean", "exact"]), alpha=st.floats(0.1, 5.0))
def test_round_trip_is_exact_for_the_kept_entries_and_zero_elsewhere(delta, density, scale, alpha):
    codec = ComPEFT(density=density, alpha=alpha, scale=scale)
    ct = compress(delta, codec)
    back = unpack(pack(ct), expected_shape=tuple(delta.shape), expected_dtype=torch.float64)
    assert np.array_equal(back.positions, ct.positions) and np.array_equal(back.values, ct.values)
    dense = decompress(back)
    flat, d = dense.reshape(-1).numpy(), delta.reshape(-1).numpy()
    kept = ct.positions
    # the kept entries are the largest: none dropped is larger than one kept, and none is zero
    k = min(math.ceil(density * d.size - 1e-9), int(np.count_nonzero(d)))
    assert kept.size == k
    dropped = np.setdiff1d(np.arange(d.size), kept)
    if kept.size and dropped.size:
        assert np.abs(d[kept]).min() >= np.abs(d[dropped]).max()
    assert (d[kept] != 0).all()
    assert (flat[dropped] == 0).all()
    if scale == "exact":
        assert np.array_equal(flat[kept], d[kept])
    else:  # one magnitude for every kept entry, with each entry's own sign
        magnitudes = np.abs(flat[kept])
        assert (np.sign(flat[kept]) == np.sign(d[kept])).all() and (magnitudes == magnitudes[:1]).all()
        std = np.std(d, ddof=1) if d.size > 1 else 0.0
        expected = alpha * std if scale == "std" and std > 0 else (np.abs(d[kept]).mean() if kept.size else 0.0)
        np.testing.assert_allclose(magnitudes, expected, rtol=1e-12)


@SETTINGS
@given(delta=deltas(), density=densities, exact=st.booleans())
def test_bytes_equal_the_encoded_payload(delta, density, exact):
    codec = ComPEFT(density=density, scale="exact" if exact else "mean")
    arrays, _ = encode_update({"w": delta}, {"w": torch.zeros_like(delta)}, codec)
    positions = kept_positions(delta.numpy(), density).tolist()
    assert payload_nbytes(arrays) == len(arrays["w"].tobytes()) == expected_nbytes(delta, positions, exact=exact)


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31), c=st.floats(1e-3, 1e3))
def test_density_one_with_mean_scale_reproduces_a_ternary_delta_exactly(shape, seed, c):
    levels = np.random.default_rng(seed).integers(-1, 2, size=shape).astype(np.float64)
    delta = torch.from_numpy(levels * c)
    dense = decompress(unpack(pack(compress(delta, ComPEFT(density=1.0, scale="mean")))))
    assert torch.equal(dense, delta)


@SETTINGS
@given(delta=deltas())
def test_exact_mode_at_density_one_reproduces_delta_bit_for_bit(delta):
    assert torch.equal(decompress(unpack(pack(compress(delta, ComPEFT(density=1.0, scale="exact"))))), delta)
    d32 = delta.to(torch.float32)
    assert torch.equal(decompress(unpack(pack(compress(d32, ComPEFT(density=1.0, scale="exact"))))), d32)


@SETTINGS
@given(
    rounds=st.lists(deltas(elements=st.floats(-10, 10)), min_size=1, max_size=4),
    density=densities,
    seed=st.integers(0, 100),
)
def test_error_feedback_loses_nothing_over_rounds(rounds, density, seed):
    """Σ delta_hat_t + e_T = Σ delta_t: error feedback only delays what compression drops."""
    shape = rounds[0].shape
    updates = [torch.from_numpy(np.resize(r.numpy(), shape)) for r in rounds]
    codec = ComPEFT(density=density, scale="mean")
    residual, sent = None, torch.zeros(shape, dtype=torch.float64)
    for delta in updates:
        reference = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        arrays, residual = encode_update({"w": reference + delta}, {"w": reference}, codec, residual=residual)
        sent += decode_update(arrays, {"w": reference})["w"] - reference
    torch.testing.assert_close(sent + residual["w"], sum(updates), rtol=1e-9, atol=1e-9)


@SETTINGS
@given(values=st.lists(st.integers(0, 2**32 - 1), max_size=50))
def test_leb128_round_trip(values):
    from fedpeft.compression.compeft import leb128

    arr = np.array(values, dtype=np.int64)
    assert read_leb128(np.frombuffer(leb128(arr), dtype=np.uint8)).tolist() == values


# ------------------------------------------------------------------------------ examples
def test_hand_worked_example():
    # Δ = [0.5, -3, 0, 2, -1, 0, 0, 0.25]; density 0.25 of 8 -> keep 2: -3 at 1, 2 at 3.
    delta = torch.tensor([0.5, -3.0, 0.0, 2.0, -1.0, 0.0, 0.0, 0.25], dtype=torch.float64)
    ct = compress(delta, ComPEFT(density=0.25, scale="mean"))
    assert ct.positions.tolist() == [1, 3] and ct.negative.tolist() == [True, False] and ct.values.tolist() == [2.5]
    buf = pack(ct)
    # header 4 + shape 4 + count 4, scale 8, signs 1, gaps [1, 1] as 2 varint bytes (< 1-byte
    # bitmask? no: bitmask is 1 byte)
    assert buf.tobytes()[:12] == struct.pack("<4BII", 1, 0, 1, 1, 8, 2)
    assert buf.size == 12 + 8 + 1 + 1  # the 1-byte bitmask beats 2 bytes of run lengths
    assert buf.tobytes()[-1] == 0b00001010 and buf.tobytes()[-2] == 0b01
    assert decompress(unpack(buf)).tolist() == [0, -2.5, 0, 2.5, 0, 0, 0, 0]
    std = ComPEFT(density=0.25, alpha=2.0, scale="std")
    assert decompress(compress(delta, std)).tolist()[1] == pytest.approx(-2.0 * float(delta.std()))


def test_density_one_sends_no_positions():
    delta = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    arrays, _ = encode_update({"w": delta}, {"w": torch.zeros_like(delta)}, ComPEFT(density=1.0))
    assert (
        arrays["w"][1] == 0b100 and payload_nbytes(arrays) == 4 + 8 + 4 + 4 + 1
    )  # header, shape, count, scale, 4 sign bits
    assert decompress(unpack(arrays["w"])).abs().unique().numel() == 1


def test_long_sparse_tensor_uses_run_lengths_and_compresses():
    delta = torch.zeros(384, 8)
    delta[::37, 3] = torch.arange(1.0, 12.0)
    arrays, _ = encode_update({"w": delta}, {"w": torch.zeros_like(delta)}, ComPEFT(density=0.05, scale="mean"))
    flags = arrays["w"][1]
    assert flags & 1  # 11 positions: ~11 bytes of gaps vs a 384-byte bitmask
    assert payload_nbytes(arrays) < delta.numel() * 4 / 50


def test_decode_adds_to_the_reference_in_its_dtype():
    ref = {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float64)}
    trained = {
        "a": ref["a"] + torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, -2.0]]),
        "b": torch.tensor([1.0, 0, 0, 0], dtype=torch.float64),
    }
    arrays, residual = encode_update(trained, ref, ComPEFT(density=1.0, scale="mean"))
    back = decode_update(arrays, ref)
    assert (
        back["a"].dtype == torch.float32
        and torch.equal(back["a"], trained["a"])
        and torch.equal(back["b"], trained["b"])
    )
    assert all(torch.count_nonzero(r) == 0 for r in residual.values())


# ------------------------------------------------------------------------------ malformed payloads
def good(**kw) -> np.ndarray:
    delta = torch.tensor([[0.5, -3.0, 0.0], [2.0, -1.0, 0.25]])
    return pack(compress(delta, ComPEFT(**{"density": 0.5, "scale": "mean", **kw})))


def patched(buf: np.ndarray, offset: int, fmt: str, *values) -> np.ndarray:
    raw = bytearray(buf.tobytes())
    struct.pack_into(fmt, raw, offset, *values)
    return np.frombuffer(bytes(raw), dtype=np.uint8).copy()


@pytest.mark.parametrize(
    ("buf", "fragment"),
    [
        (good().astype(np.int16), "1-D uint8 array"),
        (good().reshape(1, -1), "1-D uint8 array"),
        (good()[:3], "shorter than its header"),
        (good()[:10], "shorter than its 16-byte header"),
        (patched(good(), 0, "<B", 7), "version 7"),
        (patched(good(), 1, "<B", 0x80), "unknown compression flags"),
        (patched(good(), 2, "<B", 9), "unknown dtype code 9"),
        (patched(good(), 4, "<I", 3), r"shape \(3, 3\), expected \(2, 3\)"),
        (patched(good(), 12, "<I", 7), "keeps 7 entries of a tensor with 6"),
        (patched(good(), 12, "<I", 4), "bitmask marks 3 entries, the header says 4"),
        (patched(good(), 16, "<f", float("nan")), "NaN or Inf scale"),
        (patched(good(), 16, "<f", float("inf")), "NaN or Inf scale"),
        (patched(good(), 16, "<f", -1.0), "negative scale"),
        (patched(good(), 20, "<B", 0b11111000), "sign bits set past"),
        (np.concatenate([good(), np.zeros(1, np.uint8)]), "bitmask has 2 bytes"),
        (good()[:-1], "bitmask has 0 bytes"),
        (patched(good(), 21, "<B", 0b11000000), "bits set past the end"),
        (patched(good(scale="exact"), 20, "<f", float("nan")), "NaN or Inf value"),
        (patched(good(), 1, "<B", 0b101), "unknown compression flags"),
        (patched(good(), 1, "<B", 0b100)[:-1], "'every entry kept' with 3 of 6 entries"),
    ],
)
def test_malformed_payloads_are_rejected(buf, fragment):
    with pytest.raises(CompressionError, match=fragment):
        unpack(buf, expected_shape=(2, 3), expected_dtype=torch.float32)


def run_length_payload(gaps: bytes, count: int) -> np.ndarray:
    head = struct.pack("<4BII", 1, 0b01, 1, 1, 1000, count) + struct.pack("<d", 1.0) + bytes([0] * math.ceil(count / 8))
    return np.frombuffer(head + gaps, dtype=np.uint8).copy()


@pytest.mark.parametrize(
    ("buf", "fragment"),
    [
        (run_length_payload(bytes([5, 0x85]), 2), "end inside a varint"),
        (run_length_payload(bytes([5, 6, 7]), 2), "hold 3 entries, the header says 2"),
        (run_length_payload(bytes([5]), 2), "hold 1 entries, the header says 2"),
        (run_length_payload(bytes([0xE8, 0x07]), 1), "position 1000 is out of range for a tensor of 1000 entries"),
        (run_length_payload(bytes([0x80] * 5 + [1]), 1), "longer than 5 bytes"),
    ],
)
def test_malformed_run_lengths_are_rejected(buf, fragment):
    with pytest.raises(CompressionError, match=fragment):
        unpack(buf)


def test_last_valid_run_length_position_is_accepted():
    assert unpack(run_length_payload(bytes([0xE7, 0x07]), 1)).positions.tolist() == [999]  # gap 999 -> the last entry


def test_decode_update_names_the_key_and_refuses_unknown_keys():
    ref = {"w": torch.zeros(2, 3)}
    with pytest.raises(CompressionError, match=r"^w: .*NaN or Inf scale"):
        decode_update({"w": patched(good(), 16, "<f", float("nan"))}, ref)
    with pytest.raises(CompressionError, match="did not send"):
        decode_update({"v": good()}, ref)
    with pytest.raises(CompressionError, match="dtype torch.float32, expected torch.float64"):
        decode_update({"w": good()}, {"w": torch.zeros(2, 3, dtype=torch.float64)})


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"scale": "max"}, "scale"),
        ({"alpha": float("nan")}, "alpha"),
    ],
)
def test_bad_settings_are_refused(kw, fragment):
    with pytest.raises(CompressionError, match=fragment):
        ComPEFT(**kw)


def test_non_finite_update_is_refused_at_the_client():
    with pytest.raises(CompressionError, match="NaN or Inf"):
        compress(torch.tensor([1.0, float("nan")]), ComPEFT())


def test_compression_config_is_checked_at_start():
    from fedpeft.cli.configs import compose_config
    from fedpeft.run import check_config

    assert compose_config(["compression=compeft"]).compression.name == "compeft"
    with pytest.raises(CompressionError, match="density must be in"):
        check_config(compose_config(["compression=compeft", "compression.density=0"]))
    with pytest.raises(CompressionError, match="compression must be one of"):
        check_config(compose_config(["compression.name=gzip"]))
