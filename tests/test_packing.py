"""Tests for bitnet_jax.core.packing: exact layouts, round trips, sizes and errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core.packing import (
    BITS_PER_WEIGHT,
    pack_2bit,
    pack_base3,
    packed_nbytes,
    unpack_2bit,
    unpack_base3,
)

RNG = np.random.default_rng(1234)


def ternary(shape: tuple[int, ...], dtype=np.int8) -> np.ndarray:
    return RNG.integers(-1, 2, size=shape).astype(dtype)


# ---------------------------------------------------------------------------
# 2-bit layout: hand-built examples
# ---------------------------------------------------------------------------

# 8 x 3 weight, R = ceil(8/4) = 2: byte row 0 holds rows 0, 2, 4, 6 and byte
# row 1 holds rows 1, 3, 5, 7, in bits [1:0], [3:2], [5:4], [7:6].
W_8x3 = np.array(
    [
        [1, 0, -1],  # r0 codes 2 1 0
        [0, 1, -1],  # r1 codes 1 2 0
        [-1, -1, 0],  # r2 codes 0 0 1
        [1, 1, 1],  # r3 codes 2 2 2
        [0, 0, 0],  # r4 codes 1 1 1
        [-1, 1, 0],  # r5 codes 0 2 1
        [1, -1, 1],  # r6 codes 2 0 2
        [0, -1, -1],  # r7 codes 1 0 0
    ],
    dtype=np.int8,
)
# Bits written as r_slot3 _ r_slot2 _ r_slot1 _ r_slot0 (slot0 least significant).
PACKED_8x3 = np.array(
    [
        # col0: r6=2 r4=1 r2=0 r0=2 ; col1: r6=0 r4=1 r2=0 r0=1 ; col2: r6=2 r4=1 r2=1 r0=0
        [0b10_01_00_10, 0b00_01_00_01, 0b10_01_01_00],
        # col0: r7=1 r5=0 r3=2 r1=1 ; col1: r7=0 r5=2 r3=2 r1=2 ; col2: r7=0 r5=1 r3=2 r1=0
        [0b01_00_10_01, 0b00_10_10_10, 0b00_01_10_00],
    ],
    dtype=np.uint8,
)


def test_2bit_hand_example_values():
    # Decimal spelled out too, so a wrong binary literal cannot hide a bug.
    assert PACKED_8x3.tolist() == [[146, 17, 148], [73, 42, 24]]


@pytest.mark.parametrize("to_array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
def test_2bit_hand_example_8x3(to_array):
    packed = pack_2bit(to_array(W_8x3))
    assert packed.dtype == np.uint8
    assert packed.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(packed), PACKED_8x3)
    np.testing.assert_array_equal(np.asarray(unpack_2bit(to_array(PACKED_8x3), 8)), W_8x3)


# 5 x 2 weight, R = 2: row 4 lands in slot 2 of byte row 0; slot 2 of byte
# row 1 and slot 3 of both byte rows are padding.
W_5x2 = np.array([[1, -1], [0, 1], [-1, 0], [1, 1], [0, -1]], dtype=np.int8)
# transformers' pack_weights leaves padding bits at 00 (code 0).
PACKED_5x2_HF = np.array(
    [
        [0b00_01_00_10, 0b00_00_01_00],  # slots: r0, r2, r4, pad
        [0b00_00_10_01, 0b00_00_10_10],  # slots: r1, r3, pad, pad
    ],
    dtype=np.uint8,
)
# Same with padding value 0 (code 1 = bits 01).
PACKED_5x2_ZERO = np.array(
    [
        [0b01_01_00_10, 0b01_00_01_00],
        [0b01_01_10_01, 0b01_01_10_10],
    ],
    dtype=np.uint8,
)


def test_2bit_padding_matches_transformers():
    assert PACKED_5x2_HF.tolist() == [[18, 4], [9, 10]]
    np.testing.assert_array_equal(pack_2bit(W_5x2), PACKED_5x2_HF)
    np.testing.assert_array_equal(unpack_2bit(PACKED_5x2_HF, 5), W_5x2)


def test_2bit_padding_value_zero():
    assert PACKED_5x2_ZERO.tolist() == [[82, 68], [89, 90]]
    np.testing.assert_array_equal(pack_2bit(W_5x2, pad_value=0), PACKED_5x2_ZERO)
    # Padding is dropped on unpack whatever it holds.
    np.testing.assert_array_equal(unpack_2bit(PACKED_5x2_ZERO, 5), W_5x2)


def test_2bit_transformers_docstring_example():
    # Example from the docstring of transformers' unpack_weights (4 * R = 8 rows).
    packed = np.array([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=np.uint8)
    expected = np.array(
        [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]], dtype=np.int8
    )
    np.testing.assert_array_equal(unpack_2bit(packed, 8), expected)
    np.testing.assert_array_equal(pack_2bit(expected), packed)


def test_2bit_1d_hand_example():
    # rows 0..5, R = 2: byte 0 = r0 | r2<<2 | r4<<4 | pad ; byte 1 = r1 | r3<<2 | r5<<4 | pad
    w = np.array([-1, 0, 1, 1, 0, -1], dtype=np.int8)  # codes 0 1 2 2 1 0
    expected = np.array([0b00_01_10_00, 0b00_00_10_01], dtype=np.uint8)
    np.testing.assert_array_equal(pack_2bit(w), expected)
    np.testing.assert_array_equal(unpack_2bit(expected, 6), w)


# ---------------------------------------------------------------------------
# 2-bit layout: round trips
# ---------------------------------------------------------------------------

SHAPES_2BIT = [
    (1,), (2,), (3,), (4,), (5,), (7,), (9,),
    (1, 1), (1, 3), (2, 3), (3, 3), (4, 5), (5, 4), (7, 2), (8, 3), (13, 6),
    (4, 3, 2), (5, 2, 3), (3, 1, 1, 2),
    (0, 3),
]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES_2BIT, ids=str)
@pytest.mark.parametrize("pad_value", [-1, 0])
def test_2bit_roundtrip_numpy(shape, pad_value):
    w = ternary(shape)
    w_copy = w.copy()
    packed = pack_2bit(w, pad_value=pad_value)
    assert isinstance(packed, np.ndarray)
    assert packed.dtype == np.uint8
    assert packed.shape == (math.ceil(shape[0] / 4),) + shape[1:]
    assert packed.nbytes == packed_nbytes(shape, "2bit")
    out = unpack_2bit(packed, shape[0])
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, w)
    np.testing.assert_array_equal(w, w_copy)  # input not modified in place


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.float32, jnp.bfloat16])
def test_2bit_input_and_output_dtypes(dtype):
    w = ternary((7, 5), dtype=dtype)
    packed = pack_2bit(w)
    np.testing.assert_array_equal(packed, pack_2bit(w.astype(np.int8)))
    out = unpack_2bit(packed, 7, dtype=dtype)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, w)


@pytest.mark.parametrize("shape", [(3,), (5, 3), (5, 2, 3)], ids=str)
def test_2bit_roundtrip_jax(shape):
    w = ternary(shape)
    wj = jnp.asarray(w)
    packed = pack_2bit(wj)
    assert isinstance(packed, jax.Array)
    assert packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(packed), pack_2bit(w))  # same bytes as numpy
    out = unpack_2bit(packed, shape[0])
    assert isinstance(out, jax.Array)
    np.testing.assert_array_equal(np.asarray(out), w)


@pytest.mark.parametrize("shape", [(1, 3), (5, 3), (6, 2, 2)], ids=str)
def test_2bit_under_jit(shape):
    w = ternary(shape)
    packed = jax.jit(pack_2bit)(jnp.asarray(w, jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(packed), pack_2bit(w))
    unpack = jax.jit(unpack_2bit, static_argnums=(1, 2))
    out = unpack(packed, shape[0], jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    assert out.shape == shape
    np.testing.assert_array_equal(np.asarray(out, dtype=np.float32), w.astype(np.float32))


def test_2bit_unpack_inside_jitted_matmul():
    # The inference use: packed weight in, unpack on the fly, matmul.
    w = ternary((6, 5))  # (out, in), torch layout
    x = RNG.standard_normal((3, 5)).astype(np.float32)
    packed = jnp.asarray(pack_2bit(w))

    @jax.jit
    def linear(x, packed):
        return x @ unpack_2bit(packed, 6, jnp.float32).T

    np.testing.assert_allclose(np.asarray(linear(x, packed)), x @ w.T.astype(np.float32), rtol=1e-6)


# ---------------------------------------------------------------------------
# base-3 layout
# ---------------------------------------------------------------------------


def test_base3_hand_example():
    # Group 0: values 1, 0, -1, -1, 1 -> digits 2, 1, 0, 0, 2
    #   byte = 2*1 + 1*3 + 0*9 + 0*27 + 2*81 = 167
    # Group 1: values 0, 1 + 3 pad zeros -> digits 1, 2, 1, 1, 1
    #   byte = 1*1 + 2*3 + 1*9 + 1*27 + 1*81 = 124
    w = np.array([1, 0, -1, -1, 1, 0, 1], dtype=np.int8)
    expected = np.array([167, 124], dtype=np.uint8)
    packed = pack_base3(w)
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(unpack_base3(expected, 7), w)


def test_base3_hand_example_2d_and_extremes():
    # C order: [[-1, -1, -1], [-1, -1, 1]] -> digits 0, 0, 0, 0, 0 | 2 + pad 1, 1, 1, 1
    w = np.array([[-1, -1, -1], [-1, -1, 1]], dtype=np.int8)
    expected = np.array([0, 2 + 3 + 9 + 27 + 81], dtype=np.uint8)  # [0, 122]
    np.testing.assert_array_equal(pack_base3(w), expected)
    np.testing.assert_array_equal(unpack_base3(expected, (2, 3)), w)
    np.testing.assert_array_equal(pack_base3(np.ones(5, np.int8)), [242])
    np.testing.assert_array_equal(pack_base3(np.zeros(5, np.int8)), [121])


SHAPES_BASE3 = [
    (), (1,), (2,), (4,), (5,), (6,), (11,), (1, 1), (2, 3), (5, 5), (7, 3), (2, 3, 4), (3, 1, 7), (0,),
]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES_BASE3, ids=str)
def test_base3_roundtrip_numpy(shape):
    w = ternary(shape)
    packed = pack_base3(w)
    assert isinstance(packed, np.ndarray)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.shape[0] == math.ceil(w.size / 5) == packed_nbytes(shape, "base3")
    assert packed.max(initial=0) <= 242
    out = unpack_base3(packed, shape)
    assert out.dtype == np.int8 and out.shape == shape
    np.testing.assert_array_equal(out, w)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 4)], ids=str)
def test_base3_roundtrip_jax_and_jit(shape):
    w = ternary(shape)
    packed = pack_base3(jnp.asarray(w))
    assert isinstance(packed, jax.Array)
    np.testing.assert_array_equal(np.asarray(packed), pack_base3(w))
    np.testing.assert_array_equal(np.asarray(unpack_base3(packed, shape)), w)

    packed_jit = jax.jit(pack_base3)(jnp.asarray(w, jnp.float32))
    np.testing.assert_array_equal(np.asarray(packed_jit), pack_base3(w))
    unpack = jax.jit(unpack_base3, static_argnums=(1, 2))
    out = unpack(packed, shape, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == shape
    np.testing.assert_array_equal(np.asarray(out, dtype=np.float32), w.astype(np.float32))


def test_base3_all_243_codes_roundtrip():
    # Every valid byte decodes to 5 ternary values and re-encodes to itself.
    packed = np.arange(243, dtype=np.uint8)
    w = unpack_base3(packed, 243 * 5)
    assert set(np.unique(w).tolist()) == {-1, 0, 1}
    np.testing.assert_array_equal(pack_base3(w), packed)


# ---------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------


def test_sizes_4096x4096():
    shape = (4096, 4096)
    n = 4096 * 4096
    bf16_bytes = 2 * n
    assert packed_nbytes(shape, "2bit") * 8 == bf16_bytes  # exactly 1/8
    base3 = packed_nbytes(shape, "base3")
    assert base3 == math.ceil(n / 5)
    assert abs(base3 - bf16_bytes / 10) < 1  # 1/10 up to padding
    # Real packed arrays have those sizes (tiled pattern: cheaper than 16M random draws).
    w = np.resize(ternary((4099,)), shape)
    assert pack_2bit(w).nbytes == bf16_bytes // 8
    assert pack_base3(w).nbytes == base3


def test_packed_nbytes_rules():
    assert packed_nbytes(5, "2bit") == 2
    assert packed_nbytes((5, 3), "2bit") == 6  # per-column padding: ceil(5/4) * 3, not ceil(15/4)
    assert packed_nbytes((5, 3), "base3") == 3
    assert packed_nbytes((), "base3") == 1
    assert packed_nbytes(10, "base3") == 2
    assert packed_nbytes(11, "base3") == 3
    with pytest.raises(ValueError, match="unknown layout"):
        packed_nbytes(8, "3bit")
    with pytest.raises(ValueError, match="at least 1 dim"):
        packed_nbytes((), "2bit")


def test_bits_per_weight():
    assert BITS_PER_WEIGHT["2bit"] == 2.0
    assert BITS_PER_WEIGHT["base3"] == pytest.approx(1.6)
    assert BITS_PER_WEIGHT["limit"] == pytest.approx(math.log2(3))
    assert BITS_PER_WEIGHT["limit"] < BITS_PER_WEIGHT["base3"] < BITS_PER_WEIGHT["2bit"]
    n = 10**6  # divisible by 4 and 5: no padding
    for layout in ("2bit", "base3"):
        assert packed_nbytes(n, layout) * 8 / n == pytest.approx(BITS_PER_WEIGHT[layout])


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

BAD_WEIGHTS = [
    np.array([[0, 2], [1, -1]], dtype=np.int8),
    np.array([-2, 0, 1], dtype=np.int32),
    np.array([0.5, 1.0], dtype=np.float32),
    np.array([np.nan, 0.0], dtype=np.float32),
    np.array([255], dtype=np.int16),  # would wrap to -1 if cast to int8 unchecked
]


@pytest.mark.parametrize("pack", [pack_2bit, pack_base3])
@pytest.mark.parametrize("w", BAD_WEIGHTS, ids=lambda w: str(w.tolist()))
@pytest.mark.parametrize("to_array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
def test_rejects_non_ternary_values(pack, w, to_array):
    with pytest.raises(ValueError, match=r"only values in \{-1, 0, 1\}"):
        pack(to_array(w))


@pytest.mark.parametrize("pack", [pack_2bit, pack_base3])
def test_rejects_bad_input_dtype(pack):
    with pytest.raises(ValueError, match="integer or floating dtype"):
        pack(np.array([True, False]))


def test_2bit_rejects_scalar_and_bad_pad_value():
    with pytest.raises(ValueError, match="at least 1 dim"):
        pack_2bit(np.int8(1))
    with pytest.raises(ValueError, match="pad_value"):
        pack_2bit(np.zeros(3, np.int8), pad_value=2)


@pytest.mark.parametrize("unpack,arg", [(unpack_2bit, 8), (unpack_base3, (2, 5))])
@pytest.mark.parametrize("bad_dtype", [np.int8, np.uint16, np.float32])
def test_unpack_rejects_wrong_packed_dtype(unpack, arg, bad_dtype):
    with pytest.raises(ValueError, match="dtype uint8"):
        unpack(np.zeros(2, dtype=bad_dtype), arg)


@pytest.mark.parametrize("rows", [0, 4, 9, 12])
def test_2bit_rejects_rows_that_do_not_fit(rows):
    packed = np.zeros((2, 3), np.uint8)  # fits rows 5..8
    with pytest.raises(ValueError, match="does not fit"):
        unpack_2bit(packed, rows)


def test_2bit_rejects_code_3():
    packed = np.array([0b00_11_01_01], dtype=np.uint8)
    with pytest.raises(ValueError, match="code 3"):
        unpack_2bit(packed, 4)
    unpack_2bit(packed, 4, validate=False)  # allowed when asked


@pytest.mark.parametrize("shape", [(10,), (16,), (2, 3), (4, 4)], ids=str)
def test_base3_rejects_shape_that_does_not_fit(shape):
    packed = np.zeros(3, np.uint8)  # fits 11..15 weights
    with pytest.raises(ValueError, match="needs 1-D packed base3 data"):
        unpack_base3(packed, shape)


def test_base3_rejects_2d_packed_and_bytes_over_242():
    with pytest.raises(ValueError, match="needs 1-D"):
        unpack_base3(np.zeros((1, 2), np.uint8), 10)
    with pytest.raises(ValueError, match="bytes > 242"):
        unpack_base3(np.array([121, 243], np.uint8), 10)


@pytest.mark.parametrize("bad", [np.uint8, np.bool_])
def test_unpack_rejects_unsigned_output_dtype(bad):
    with pytest.raises(ValueError, match="signed integer or floating"):
        unpack_2bit(np.zeros(1, np.uint8), 4, dtype=bad)
    with pytest.raises(ValueError, match="signed integer or floating"):
        unpack_base3(np.zeros(1, np.uint8), 5, dtype=bad)
