"""Quantized linears and assembly (offq.quant): the fake path reproduces the real W4A4 kernel's arithmetic bit for bit,
so fake-quant and real-kernel models give identical logits; fused projections equal separate ones;
the packed KV cache equals the full forward."""

import numpy as np
import pytest

from offq import _C
from offq.config import QuantConfig
from offq.kernels import dequantize, matmul_w4a4, quantize
from offq.quant.linears import FakeQuantLinear, GroupProduct
from offq.quant.weight import QuantizedWeight
from offq.recipe import pipeline
from tiny_models import calibration, tiny_checkpoint, token_ids

SIMD = _C.simd_info()
KERNELS = ["auto", "generic"] + [k for k, flag in (("avx2", "avx2"), ("vnni", "avx512_vnni"))
                                  if SIMD[flag]]


def stored(w: np.ndarray, group: int, symmetric: bool) -> tuple[QuantizedWeight, object]:
    wq = quantize(w, bits=4, group_size=group, symmetric=symmetric)
    return QuantizedWeight(wq.unpacked_codes(), wq.scale, wq.zero, 4, wq.group_size, symmetric), wq


@pytest.mark.parametrize("m,k,n,ga,gw,sym,offset", [
    (1, 576, 72, 64, 576, True, 0.0),      # decode row, per-channel symmetric weights (gemv path)
    (4, 256, 40, 128, 256, True, 0.0),
    (70, 256, 50, 128, 32, False, 0.0),    # GEMM path, weight groups smaller than activation groups
    (3, 256, 40, 64, 256, True, 1e4),      # all-offset groups: zero-points ~1e7, inexact E
    (40, 128, 24, 32, 64, False, 3e5),
])
def test_group_product_equals_kernel_bit_for_bit(m, k, n, ga, gw, sym, offset):
    rng = np.random.default_rng(m + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if offset:  # a massive token, and one group that is a constant plus tiny noise
        x[0] += offset
        x[-1, :ga] = offset + 1e-3 * rng.standard_normal(ga).astype(np.float32)
    st, wq = stored(rng.standard_normal((n, k)).astype(np.float32), gw, sym)
    aq = quantize(x, bits=4, group_size=ga)
    y = GroupProduct(st, ga)(aq)
    for kernel in KERNELS:
        np.testing.assert_array_equal(y, matmul_w4a4(aq, wq, kernel=kernel), err_msg=kernel)
    ref = dequantize(aq).astype(np.float64) @ dequantize(wq).astype(np.float64).T
    assert np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max()


def test_group_product_rejects_mismatched_groups():
    st, _ = stored(np.ones((4, 96), np.float32), 96, True)
    with pytest.raises(ValueError, match="a_group"):
        GroupProduct(st, 64)
    gp = GroupProduct(st, 32)
    with pytest.raises(ValueError, match="aq"):
        gp(quantize(np.ones((2, 96), np.float32), bits=4, group_size=48))


@pytest.fixture(scope="module")
def quantized():
    ckpt = tiny_checkpoint(1, arch="qwen2")
    cfg = QuantConfig(method="offq", a_group_size=32)
    return pipeline.quantize(ckpt, cfg, calibration(ckpt, 8, 48, 1))


def test_fake_and_real_paths_are_identical(quantized):
    ids = token_ids(101, 2, 40, 6)
    fake, real = quantized.model("fake"), quantized.model("real")
    np.testing.assert_array_equal(fake.forward(ids), real.forward(ids))
    np.testing.assert_array_equal(fake.nll(ids), real.nll(ids))
    # the equality is not vacuous: the float32 sgemm of the same dequantized operands (the old
    # fake path) differs from the kernel in the last bits
    lin = fake.load_layer(0).linears["down_proj"]
    x = np.random.default_rng(0).standard_normal((16, lin.in_features)).astype(np.float32)
    sgemm = FakeQuantLinear(real.load_layer(0).linears["down_proj"].w.dequantize(), None, lin.act)
    assert not np.array_equal(sgemm(x), lin(x))
    np.testing.assert_allclose(sgemm(x), lin(x), rtol=0, atol=1e-5 * np.abs(lin(x)).max())


def incremental(model, ids):
    """Logits of a prefill of 10 tokens, six single-token steps, then the rest as one chunk."""
    cache = model.new_cache()
    parts = [model.forward(ids[:, :10], cache=cache)]
    parts += [model.forward(ids[:, t:t + 1], cache=cache) for t in range(10, 16)]
    parts.append(model.forward(ids[:, 16:], cache=cache))
    return np.concatenate(parts, axis=1)


def test_incremental_decoding_equals_full_forward(quantized):
    ids = token_ids(101, 1, 24, 7)
    fake, real = quantized.model("fake"), quantized.model("real")
    steps = incremental(real, ids)
    np.testing.assert_array_equal(steps, incremental(fake, ids))
    # attention over a different number of queries sums in another order: close, not identical
    full = real.forward(ids)
    assert np.abs(steps - full).max() <= 1e-4 * np.abs(full).max()


@pytest.mark.parametrize("mode", ["fake", "real"])
def test_fused_projections_equal_separate_ones(quantized, mode):
    """q/k/v and gate/up run as one product (one activation quantization); every output column
    equals the separate linear's bit for bit."""
    from offq.model.arch import FUSED_LINEARS
    from offq.quant.activation import activation_quantizer
    from offq.quant.assemble import stored_layer
    from offq.quant.linears import W4A4Linear

    model = quantized.model(mode)
    layer = model.load_layer(1)
    assert set(layer.fused) == {"qkv", "gate_up"}
    mc, cfg = quantized.model_config, quantized.quant_config
    x = np.random.default_rng(3).standard_normal((5, 7, mc.hidden_size)).astype(np.float32)
    x[:, 0] += 30.0  # large activation zero-points too
    stored_linears = stored_layer(quantized.tensors, mc, cfg, 1)
    for key, names in FUSED_LINEARS.items():
        outs = []
        for n in names:
            st = stored_linears[n]
            act = activation_quantizer(cfg, mc.hidden_size)
            sep = W4A4Linear(st, act) if mode == "real" else FakeQuantLinear(
                None, st.bias, act, GroupProduct(st, act.group_size))
            outs.append(sep(x))
            np.testing.assert_array_equal(layer.linears[n](x), outs[-1])
        np.testing.assert_array_equal(layer.fused[key](x), np.concatenate(outs, axis=-1))


@pytest.mark.parametrize("weight_only", [False, True])
@pytest.mark.parametrize("mode", ["fake", "real"])
def test_fused_swiglu_by_row_blocks_equals_one_product(quantized, monkeypatch, mode, weight_only):
    """The forward forms the fused 4-bit x 4-bit gate/up product a block of rows at a time (its
    memory peak): the SwiGLU output equals the single product's bit for bit, a short last block
    joining the one before it, and the whole forward is unchanged. A weight-only fused product
    (matmul_wq, whose rounding depends on the number of rows) stays one call."""
    from offq.model import decoder
    from offq.model.ops import silu_mul

    if weight_only:
        if mode == "fake":
            pytest.skip("weight-only models fuse only on the real path")
        ckpt = tiny_checkpoint(1, arch="qwen2")
        cfg = QuantConfig(method="gptq", a_bits=16, kv_bits=16, w_group_size=32)
        quantized = pipeline.quantize(ckpt, cfg, calibration(ckpt, 8, 48, 1))
    model = quantized.model(mode)
    layer = model.load_layer(1)
    fused = layer.fused_linear("gate_up")
    assert fused is not None
    m = np.random.default_rng(5).standard_normal((3, 37, fused.in_features)).astype(np.float32)
    m[:, 0] += 20.0
    # one token far off zero with a tiny range: zero-points above 2^24 send GroupProduct's
    # block of rows 32-47 down its exact slow branch while the other blocks take the fast one
    m[1, 5] = 1e5 + 1e-2 * np.random.default_rng(7).standard_normal(m.shape[-1])
    gu = fused(m.reshape(-1, m.shape[-1]))
    f = gu.shape[-1] // 2
    want = silu_mul(gu[:, :f], gu[:, f:]).reshape(3, 37, f)
    calls = []
    monkeypatch.setattr(decoder, "GATE_UP_ROWS", 16)  # blocks 16, 16, ... and 31 at the end
    monkeypatch.setitem(layer.fused, "gate_up", _Counting(fused, calls))
    got = decoder._fused_swiglu(layer.fused["gate_up"], m)
    assert got.flags.c_contiguous
    assert calls == ([111] if weight_only else [16] * 5 + [31])
    np.testing.assert_array_equal(got, want)
    monkeypatch.setitem(layer.fused, "gate_up", fused)
    ids = token_ids(101, 2, 40, 9)
    blocked = model.forward(ids)
    monkeypatch.setattr(decoder, "GATE_UP_ROWS", 1 << 20)
    np.testing.assert_array_equal(model.forward(ids), blocked)


class _Counting:
    """A linear that records the rows of each call."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.rows_independent = getattr(inner, "rows_independent", False)

    def __call__(self, x):
        self.calls.append(x.shape[0])
        return self.inner(x)


def test_swapping_a_fused_linear_takes_effect(quantized):
    """The named linears stay swappable: replacing q_proj of a fused layer changes the output."""
    model = quantized.model("real")
    ids = token_ids(101, 1, 12, 8)
    before = model.forward(ids)
    layer = model.load_layer(0)
    assert layer.fused_linear("qkv") is not None
    q = layer.linears["q_proj"]

    class Scaled:
        in_features, out_features = q.in_features, q.out_features

        def __call__(self, x):
            return 1.5 * q(x)

    layer.linears["q_proj"] = Scaled()
    assert layer.fused_linear("qkv") is None
    assert not np.array_equal(model.forward(ids), before)
    layer.linears["q_proj"] = q
    np.testing.assert_array_equal(model.forward(ids), before)


@pytest.mark.parametrize("rows", [3, 257, 1500])  # one step; two; threaded, several steps each
def test_silu_mul_in_place_against_the_formula(rows):
    """silu_mul writes silu(gate) * up into gate, a few rows of scratch at a time: the same
    float32 operations as the formula (bit for bit), near the float64 value, finite at the ends
    of the range (exp(-g) overflowing gives the right limit, -0)."""
    from offq.model import ops

    rng = np.random.default_rng(rows)
    gate = (rng.standard_normal((rows, 96)) * 4).astype(np.float32)
    gate[0, :4] = [-200.0, -89.0, 89.0, 200.0]
    up = rng.standard_normal((rows, 96)).astype(np.float32)
    want = gate.copy()
    with np.errstate(over="ignore"):
        t = np.exp(-want) + np.float32(1.0)
    want /= t
    want *= up
    ref = gate.astype(np.float64) / (1 + np.exp(-gate.astype(np.float64))) * up
    before = gate.ctypes.data
    got = ops.silu_mul(gate, up)
    assert got.ctypes.data == before and got is not None
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-30)
    assert np.all(np.isfinite(got))


def test_r4_input_transform_in_place_equals_the_hadamard_product():
    """R4's online half transforms the SwiGLU output in place, as x @ H would (and a
    non-contiguous input is copied, not written through)."""
    from offq.kernels import fwht, hadamard_matrix
    from offq.quant.online import HadamardInput

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 640)).astype(np.float32)  # 640 = 5 x 128
    want = fwht(x.copy())
    np.testing.assert_allclose(want, x @ hadamard_matrix(640, dtype=np.float32), atol=1e-5)
    buf = x.copy()
    got = HadamardInput(640)(buf)
    assert got.ctypes.data == buf.ctypes.data
    np.testing.assert_array_equal(got, want)
    wide = np.zeros((2, 5, 1280), np.float32)
    wide[..., ::2] = x
    view = wide[..., ::2]
    np.testing.assert_array_equal(HadamardInput(640)(view), want)
    np.testing.assert_array_equal(wide[..., ::2], x)
