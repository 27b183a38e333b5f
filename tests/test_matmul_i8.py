"""The int8-weight matmul (``offq.kernels.matmul_i8``) against NumPy, and the 8-bit LM head
(``QuantConfig.lm_head_bits = 8``) through a checkpoint."""
import numpy as np
import pytest

from offq.config import QuantConfig
from offq.kernels.matmul_i8 import matmul_i8, quantize_i8
from offq.quant.lm_head import Int8Linear, lm_head_group
from tiny_models import head_bits_checkpoint, token_ids


def round_x(x, group):
    """x rounded to 16 bits per group as the kernel does, in float32: xs = max|x_group| / 32767,
    xq = clip(rint(x / xs), -32767, 32767) (0 where xs is 0); returns x_hat = xs * xq."""
    m, k = x.shape
    g = x.reshape(m, k // group, group)
    xs = np.abs(g).max(-1, keepdims=True) / np.float32(32767)
    with np.errstate(divide="ignore", invalid="ignore"):
        xq = np.where(xs > 0, np.clip(np.rint(g / xs), -32767, 32767), np.float32(0))
    return (xs * xq.astype(np.float32)).reshape(m, k)


def reference(x, q, s, group):
    """float64 x_hat @ (scale * w).T, x_hat the kernel's 16-bit rounding of x."""
    n, k = q.shape
    w = (q.reshape(n, k // group, group).astype(np.float64) * s[..., None]).reshape(n, k)
    return round_x(x, group).astype(np.float64) @ w.T


@pytest.mark.parametrize("m", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("group, k", [(16, 48), (64, 576), (4, 12), (32, 32)])
@pytest.mark.parametrize("kernel", ["auto", "generic"])
def test_matches_numpy(m, group, k, kernel):
    rng = np.random.default_rng(m * 1000 + k)
    n = 77  # not a multiple of the column blocks
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    q[0] = 127  # adversarial: extreme codes, a zero row, huge and tiny scales
    q[1] = -128
    q[2] = 0
    s = rng.uniform(0.5, 2.0, (n, k // group)).astype(np.float32)
    s[3] = 1e30
    s[4] = 1e-30
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :group] = 0.0  # adversarial activations: a zero group, an outlier, a subnormal group
    x[-1, 1] = 3e4
    x[-1, -group:] *= np.float32(1e-39)
    ref = reference(x, q, s, group)
    out = matmul_i8(x, q, s, group, kernel=kernel)
    assert out.dtype == np.float32 and out.shape == (m, n)
    tol = 1e-6 * np.abs(x).sum(1)[:, None] * (128 * np.abs(s).max(1))[None, :]
    assert np.all(np.abs(out - ref) <= tol + 1e-37)


@pytest.mark.parametrize("m", [1, 5, 8])
@pytest.mark.parametrize("group, k", [(16, 48), (64, 576), (128, 1536), (4096, 4096), (24, 72)])
def test_dispatched_kernel_equals_generic_bit_for_bit(m, group, k):
    """The few-rows kernels sum integers in 8 lanes per group (restarting every 2048 inputs)
    and add them to float lanes in one order: the AVX2 kernel must give the generic bits. Extreme
    codes against full-scale activations in groups of 4096 check the lane sums cannot overflow."""
    rng = np.random.default_rng(group + m)
    n = 37
    q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    q[0], q[1] = -128, 127
    s = rng.uniform(0.5, 2.0, (n, k // group)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0] = -1.0  # every activation at -32767: lane sums of 256 products of 32767 * 128
    auto = matmul_i8(x, q, s, group)
    np.testing.assert_array_equal(auto, matmul_i8(x, q, s, group, kernel="generic"))
    ref = reference(x, q, s, group)
    assert np.all(np.abs(auto - ref) <= 1e-6 * np.abs(ref).max(1, keepdims=True))


def test_activation_rounding_is_within_its_bound():
    """Against float activations, the error of the 16-bit rounding is at most half a step
    (max|x_group| / 65534) per input, times the weights: a head with massive outliers in one
    group keeps the other groups' precision."""
    rng = np.random.default_rng(7)
    k, group, n = 576, 64, 200
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    s = rng.uniform(0.5, 2.0, (n, k // group)).astype(np.float32)
    x = rng.standard_normal((2, k)).astype(np.float32)
    x[:, 5] = 2000.0  # a massive activation lives in group 0 only
    w = (q.reshape(n, -1, group) * s[..., None]).reshape(n, k).astype(np.float64)
    exact = x.astype(np.float64) @ w.T
    step = np.repeat(np.abs(x.reshape(2, -1, group)).max(-1) / 32767, group, axis=1)
    bound = (0.5 * step) @ np.abs(w).T * (1 + 1e-4) + 1e-5 * np.abs(x) @ np.abs(w).T
    assert np.all(np.abs(matmul_i8(x, q, s, group) - exact) <= bound)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_activations_raise(bad):
    x = np.ones((1, 64), np.float32)
    x[0, 7] = bad
    q, s = np.ones((3, 64), np.int8), np.ones((3, 4), np.float32)
    for m in (1, 9):  # both paths
        with pytest.raises(ValueError, match="x: .*NaN or Inf"):
            matmul_i8(np.repeat(x, m, 0), q, s, 16)


def test_quantize_i8_round_trip():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 64)).astype(np.float32)
    w[1] = 0.0
    q, s = quantize_i8(w, 16)
    assert q.dtype == np.int8 and s.shape == (5, 4)
    assert np.abs(q).max() == 127 and np.all(s[1] == 1.0) and np.all(q[1] == 0)
    back = (q.reshape(5, 4, 16) * s[..., None]).reshape(5, 64)
    assert np.all(np.abs(back - w) <= 0.5 * np.repeat(s, 16, axis=1) * (1 + 1e-6))
    with pytest.raises(ValueError, match="group"):
        quantize_i8(w, 24)
    w[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_i8(w, 16)
    for bad, group, exc, match in ((w[0], 16, ValueError, "w: expected a 2-D"),
                                   ("text", 16, TypeError, "w: expected a real"),
                                   (w, 16.0, TypeError, "group: expected an int"),
                                   (w, True, TypeError, "group: expected an int")):
        with pytest.raises(exc, match=match):
            quantize_i8(bad, group)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(x=np.ones((2, 8), np.float64)), TypeError, "x: expected dtype"),
    (dict(w=np.ones((3, 8), np.uint8)), TypeError, "w: expected dtype"),
    (dict(w=np.ones((3, 9), np.int8)), ValueError, "w: expected 8 columns"),
    (dict(scale=np.ones((3, 3), np.float32)), ValueError, "scale: expected shape"),
    (dict(group=3), ValueError, "group"),
    (dict(group=0), ValueError, "group"),
    (dict(out=np.ones((2, 4), np.float32)), ValueError, "out: expected shape"),
    (dict(kernel="vnni"), ValueError, "kernel"),
    (dict(x=np.ones((8, 2), np.float32).T), ValueError, "x: expected a C-contiguous"),
])
def test_validates_arguments(kwargs, exc, match):
    args = dict(x=np.ones((2, 8), np.float32), w=np.ones((3, 8), np.int8),
                scale=np.ones((3, 2), np.float32), group=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        matmul_i8(**args)


def test_out_must_not_share_memory_with_an_input():
    x = np.ones((2, 8), np.float32)
    w, scale = np.ones((8, 8), np.int8), np.ones((8, 2), np.float32)
    with pytest.raises(ValueError, match="out: must not share memory with x"):
        matmul_i8(x, w, scale, 4, out=x)
    buf = np.ones(40, np.float32)  # out starts one float into x: a partial overlap
    with pytest.raises(ValueError, match="out: must not share memory with x"):
        matmul_i8(buf[:16].reshape(2, 8), w, scale, 4, out=buf[1:17].reshape(2, 8))
    big = np.ones((8, 2), np.float32)
    with pytest.raises(ValueError, match="out: must not share memory with scale"):
        matmul_i8(x, w, big, 4, out=big.reshape(2, 8))
    # neighbours in one buffer that do not overlap are fine
    matmul_i8(buf[:16].reshape(2, 8), w, scale, 4, out=buf[16:32].reshape(2, 8))


def test_int8_lm_head_checkpoint(tmp_path):
    """--lm-head-bits 8: stored int8 + scales, loaded as Int8Linear; logits close to the float
    head's (the quantization error of 8-bit symmetric groups), decoder layers unchanged."""
    ckpt, fp_head, model, cfg = head_bits_checkpoint(tmp_path, 8)
    assert cfg.lm_head_bits == 8 and "head:int8" in cfg.describe()
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.group == lm_head_group(64)
    ref = fp_head.model("real")
    ids = token_ids(ckpt.config.vocab_size, 1, 20, 3)
    np.testing.assert_array_equal(model.hidden_states(ids), ref.hidden_states(ids))
    a, b = model.forward(ids), ref.forward(ids)
    assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()
    with pytest.raises(ValueError, match="lm_head_bits"):
        QuantConfig(lm_head_bits=6)


@pytest.mark.parametrize("m", [1, 2, 8])
def test_rows_do_not_depend_on_their_neighbours(m):
    """The AVX2 kernel runs four weight rows at a time and the rest one by one; a row's sums must
    come out the same either way (same operations in the same order), so a token's logits do not
    depend on the vocabulary size or on where the threads split it."""
    rng = np.random.default_rng(m)
    n, k, group = 23, 576, 64
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    s = rng.uniform(0.5, 2.0, (n, k // group)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    whole = matmul_i8(x, q, s, group)
    for j in range(n):
        np.testing.assert_array_equal(matmul_i8(x, q[j:j + 1], s[j:j + 1], group)[:, 0], whole[:, j])
