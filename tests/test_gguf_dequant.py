"""offq.kernels.gguf.gguf_dequantize (C) against the gguf package's NumPy dequantizers: random
blocks of every type it reads (special float16 scales included), bit for bit; its argument
checks; and the GGUF reader's use of it on the default model's real tensors."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from offq.kernels.gguf import GGUF_TYPES, gguf_dequantize

Q = gguf.GGMLQuantizationType
#: type -> byte offsets of its float16 fields within a block
HALF_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def random_blocks(qtype, rows: int, blocks_per_row: int, seed: int, special: bool = False):
    """uint8 [rows, blocks_per_row * block_bytes] of random blocks; the float16 fields random
    finite halves, or (``special``) zeros, -0, subnormals, the extremes, inf and NaN."""
    rng = np.random.default_rng(seed)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows * blocks_per_row, size), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        if special:
            pool = np.array([0.0, -0.0, 6e-8, -6e-8, 6.1e-5, 65504.0, -65504.0, np.inf, -np.inf,
                             np.nan, 1.0, -3.5], dtype=np.float16)
            halves = rng.choice(pool, data.shape[0])
        else:
            halves = (rng.standard_normal(data.shape[0]) * 0.05).astype(np.float16)
        data[:, off:off + 2] = halves.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, blocks_per_row * size)


def reference(data, qtype):
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)


def test_the_types_are_the_ones_tested():
    assert GGUF_TYPES == {int(t) for t in HALF_FIELDS}


@pytest.mark.parametrize("qtype", list(HALF_FIELDS), ids=lambda t: t.name)
@pytest.mark.parametrize("rows,per_row", [(1, 1), (3, 5), (67, 2)])
def test_random_blocks_bit_for_bit(qtype, rows, per_row):
    data = random_blocks(qtype, rows, per_row, seed=rows * 31 + per_row)
    got = gguf_dequantize(data, int(qtype))
    want = reference(data, qtype)
    assert got.dtype == np.float32 and got.shape == want.shape and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qtype", list(HALF_FIELDS), ids=lambda t: t.name)
def test_special_scales_bit_for_bit(qtype):
    """Zero, negative zero, float16 subnormals and extremes as scales give the same bits; inf
    and NaN scales give the same non-finite values (NaN where NumPy has NaN)."""
    data = random_blocks(qtype, 40, 3, seed=5, special=True)
    got, want = gguf_dequantize(data, int(qtype)), reference(data, qtype)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(want)], want[~np.isnan(want)])
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))


def test_many_blocks_across_threads():
    """Enough blocks for the threaded loop: every block lands in its own place."""
    data = random_blocks(Q.Q4_K, 64, 96, seed=9)  # 6,144 blocks
    np.testing.assert_array_equal(gguf_dequantize(data, int(Q.Q4_K)), reference(data, Q.Q4_K))


def test_argument_checks():
    ok = random_blocks(Q.Q8_0, 2, 2, seed=1)
    with pytest.raises(ValueError, match="^qtype: GGUF type 13 is not one"):
        gguf_dequantize(ok, 13)  # Q5_K: the gguf package's
    with pytest.raises(ValueError, match="^qtype: GGUF type -1 is not one"):
        gguf_dequantize(ok, -1)
    with pytest.raises(TypeError, match="^qtype: expected an int"):
        gguf_dequantize(ok, "Q8_0")
    with pytest.raises(TypeError, match="^qtype: expected an int"):
        gguf_dequantize(ok, True)
    with pytest.raises(TypeError, match="^data: expected dtype uint8"):
        gguf_dequantize(ok.astype(np.int8), 8)
    with pytest.raises(TypeError, match="^data: expected a numpy.ndarray"):
        gguf_dequantize(ok.tolist(), 8)
    with pytest.raises(ValueError, match="^data: expected 2 dimensions"):
        gguf_dequantize(ok.reshape(-1), 8)
    with pytest.raises(ValueError, match="^data: expected a C-contiguous"):
        gguf_dequantize(np.asfortranarray(np.concatenate([ok, ok])), 8)
    with pytest.raises(ValueError, match="^data: rows of 67 bytes are not whole blocks of GGUF "
                                         "type 8 \\(34 bytes each\\)"):
        gguf_dequantize(ok[:, :67].copy(), 8)
    empty = gguf_dequantize(np.zeros((0, 34), np.uint8), 8)
    assert empty.shape == (0, 32) and empty.dtype == np.float32
