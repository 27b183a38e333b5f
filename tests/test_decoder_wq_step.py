"""The weight-only C decoder step (``offq._C.decoder_wq_*``, ``offq.quant.fused_wq``) against the
NumPy real path of the same weight-only model.

The reference is offq's NumPy forward (``offq/model/decoder.py`` on ``PackedWeightLinear``:
``matmul_wq``, NumPy RMSNorm, RoPE and attention over the float cache). The C step runs the same
row kernels and float32 operations except three sums and exp (``csrc/decoder_wq.c``), so hidden
states agree to float32 rounding. Every product variant the CPU offers is run (``kernel=``).
"""
import numpy as np
import pytest

from offq import _C
from offq.config import QuantConfig
from offq.kernels import threads
from offq.kernels.decoder_wq import (decoder_wq_forward, decoder_wq_plan,
                                     decoder_wq_scratch_bytes)
from offq.quant.assemble import resolved_mode
from offq.quant.fused import fused_runner
from offq.quant.fused_wq import FusedWeightOnlyDecoder
from offq.recipe import pipeline
from tiny_models import calibration, tiny_checkpoint, token_ids

SIMD = _C.simd_info()
KERNELS = ["generic"] + (["avx2"] if SIMD["avx2"] else []) + (["avx512"] if SIMD["avx512"] else [])

WEIGHT_ONLY = dict(a_bits=16, kv_bits=16)


@pytest.fixture(scope="module", params=["qwen2-w4g32", "llama-biases-w3", "llama-hd64-w2g64",
                                        "qwen2-hd128-w4ch", "qwen2-w8g64"])
def quantized(request):
    """Tiny weight-only models: Qwen2 (q/k/v biases) W4 g32 asymmetric RTN, Llama with every bias
    W3 g32 GPTQ, Llama with head_dim 64 and 3 query heads per KV head W2 g64, Qwen2 with
    head_dim 128 W4 per channel, Qwen2 W8 g64 asymmetric GPTQ."""
    name = request.param
    if name.startswith("qwen2-w4"):
        ckpt = tiny_checkpoint(1, arch="qwen2")
        cfg = QuantConfig(method="rtn", w_bits=4, w_group_size=32, w_symmetric=False, **WEIGHT_ONLY)
    elif name.startswith("llama-biases"):
        ckpt = tiny_checkpoint(2, arch="llama", attention_bias=True, mlp_bias=True)
        cfg = QuantConfig(method="gptq", w_bits=3, w_group_size=32, **WEIGHT_ONLY)
    elif name.startswith("llama-hd64"):
        ckpt = tiny_checkpoint(3, arch="llama", d=192, hd=64, nh=3, nkv=1, f=256)
        cfg = QuantConfig(method="rtn", w_bits=2, w_group_size=64, w_symmetric=False,
                          **WEIGHT_ONLY)
    elif name.startswith("qwen2-hd128"):
        ckpt = tiny_checkpoint(4, arch="qwen2", d=256, hd=128, nh=2, nkv=1, f=256)
        cfg = QuantConfig(method="rtn", w_bits=4, **WEIGHT_ONLY)
    else:
        ckpt = tiny_checkpoint(5, arch="qwen2", d=128, f=256)
        cfg = QuantConfig(method="gptq", w_bits=8, w_group_size=64, w_symmetric=False,
                          **WEIGHT_ONLY)
    with threads(2):
        return pipeline.quantize(ckpt, cfg, calibration(ckpt, 8, 48, 1), progress=False)


def close(got, ref):
    """Float32 rounding of the reordered sums, relative to the largest value."""
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=0, atol=4e-6 * scale)


@pytest.mark.parametrize("kernel", KERNELS)
def test_decode_matches_the_numpy_path(quantized, kernel):
    """Token by token from an empty cache (which grows from 2 positions), then chunks of 5 and
    of 33 rows (two C calls) after 30 cached positions: the hidden states of a 70-token prompt on
    the NumPy path."""
    real = quantized.model("real")
    ids = token_ids(real.config.vocab_size, 1, 70, 3)
    ref = real.hidden_states(ids)[0]
    fd = FusedWeightOnlyDecoder(real, kernel=kernel)
    cache = fd.new_cache(2)
    steps = [fd.run(real.embed(ids[:, t:t + 1])[0], cache)[0] for t in range(30)]
    five = fd.run(real.embed(ids[:, 30:35])[0], cache)
    rest = fd.run(real.embed(ids[:, 35:])[0], cache)
    close(np.concatenate([np.stack(steps), five, rest]), ref)
    assert cache.length == 70


@pytest.mark.parametrize("kernel", KERNELS)
def test_long_context_matches_the_numpy_path(quantized, kernel):
    """Past the attention's chunks of 128 positions (csrc/attention_f32.c): a 250-token prompt,
    then 12 rows in one call whose rows see 251-262 positions (2 chunks for the first rows, 3 for
    the last), then single steps to 270: the hidden states of the NumPy path."""
    real = quantized.model("real")
    ids = token_ids(real.config.vocab_size, 1, 270, 9)
    ref = real.hidden_states(ids)[0]
    fd = FusedWeightOnlyDecoder(real, kernel=kernel)
    cache = fd.new_cache()
    parts = [fd.run(real.embed(ids[:, :250])[0], cache),
             fd.run(real.embed(ids[:, 250:262])[0], cache)]
    parts += [fd.run(real.embed(ids[:, t:t + 1])[0], cache) for t in range(262, 270)]
    close(np.concatenate(parts), ref)


def test_variants_agree(quantized):
    """Every product variant computes the same hidden states (to float32 rounding: the SIMD row
    kernels sum a group in another order than the generic one)."""
    real = quantized.model("real")
    ids = token_ids(real.config.vocab_size, 1, 6, 8)
    out = {}
    for kernel in KERNELS:
        fd = FusedWeightOnlyDecoder(real, kernel=kernel)
        cache = fd.new_cache()
        out[kernel] = np.concatenate([fd.run(real.embed(ids[:, t:t + 1])[0], cache)
                                      for t in range(6)])
    for kernel in KERNELS[1:]:
        close(out[kernel], out["generic"])


def test_thread_count_does_not_change_results(quantized):
    """Each output column is one row kernel call whatever block of columns holds it, and the
    attention's chunks of positions and their merge do not depend on the team: 1, 2 and 3
    threads give the same bits, past a chunk edge too: 140 positions in C calls of 4 and 34
    rows (a longer first prompt would take the NumPy path, whose BLAS sums may depend on the
    thread count), then 12 steps."""
    real = quantized.model("real")
    ids = token_ids(real.config.vocab_size, 1, 152, 5)
    fd = FusedWeightOnlyDecoder(real)
    res = []
    for n in (1, 2, 3):
        with threads(n):
            cache = fd.new_cache()
            out = [fd.run(real.embed(ids[:, :4])[0], cache)]
            out += [fd.run(real.embed(ids[:, t:t + 34])[0], cache) for t in range(4, 140, 34)]
            out += [fd.run(real.embed(ids[:, t:t + 1])[0], cache) for t in range(140, 152)]
            res.append(np.concatenate(out))
    np.testing.assert_array_equal(res[0], res[1])
    np.testing.assert_array_equal(res[0], res[2])


def test_fused_and_auto_modes_run_weight_only_models_on_the_c_step(quantized):
    """mode='fused' and 'auto' give a weight-only model the C step: a prompt (NumPy prefill) gives
    the real path's logits and NLL bit for bit, generation the real path's logits to float32
    rounding; the cache holds one sequence."""
    real = quantized.model("real")
    for mode in ("fused", "auto"):
        fused = quantized.model(mode)
        assert isinstance(fused.fused_runner, FusedWeightOnlyDecoder)
        assert resolved_mode(fused, mode) == "fused"
    ids = token_ids(real.config.vocab_size, 2, 24, 6)
    # one sequence at a time (what `offq eval` runs on a resident model): a batch of two is 48
    # rows, past matmul_wq's small-M path, which the fused runtime's per-sequence prompts take
    np.testing.assert_array_equal(fused.forward(ids[:1]), real.forward(ids[:1]))
    np.testing.assert_array_equal(fused.nll(ids[1:]), real.nll(ids[1:]))
    cache, ref_cache = fused.new_cache(), real.new_cache()
    np.testing.assert_array_equal(fused.forward(ids[:1, :10], cache=cache),
                                  real.forward(ids[:1, :10], cache=ref_cache))
    for t in range(10, 14):  # decode steps after the NumPy prompt read its copied K/V
        close(fused.forward(ids[:1, t:t + 1], cache=cache),
              real.forward(ids[:1, t:t + 1], cache=ref_cache))
    with pytest.raises(ValueError, match="one sequence"):
        fused.forward(ids, cache=fused.new_cache())
    # the 8-bit attention runs over the W4A4KV4 decoder's 4-bit cache, which this model lacks
    with pytest.raises(ValueError, match="this model is weight-only"):
        fused_runner(real, "int8")


def test_models_the_step_cannot_run_are_refused():
    """A quantized KV cache, quantized activations or an online transform: the weight-only step
    names what it cannot run (mode 'auto' then takes the real path), and fused_runner picks the
    W4A4KV4 runner for W4A4 models."""
    ckpt = tiny_checkpoint(1, arch="qwen2")
    kv4 = pipeline.quantize(ckpt, QuantConfig(method="rtn", w_bits=4, w_group_size=32,
                                              a_bits=16, kv_bits=4), None, progress=False)
    with pytest.raises(ValueError, match="quantizes its KV cache"):
        FusedWeightOnlyDecoder(kv4.model("real"))
    assert kv4.model("auto").fused_runner is None
    w4a4 = pipeline.quantize(ckpt, QuantConfig(method="offq"), calibration(ckpt, 4, 32, 1),
                             progress=False)
    with pytest.raises(ValueError, match="layer 0 qkv: .* W4A4"):
        FusedWeightOnlyDecoder(w4a4.model("real"))
    assert type(fused_runner(w4a4.model("real"))).__name__ == "FusedDecoder"
    wo = pipeline.quantize(ckpt, QuantConfig(method="rtn", w_bits=4, w_group_size=32,
                                             **WEIGHT_ONLY), None, progress=False)
    model = wo.model("real")
    model.layers[1].qk_transform = lambda q, k: (q, k)
    with pytest.raises(ValueError, match="layer 1 has an online qk_transform"):
        FusedWeightOnlyDecoder(model)


@pytest.fixture(scope="module")
def step_args(quantized):
    real = quantized.model("real")
    fd = FusedWeightOnlyDecoder(real)
    cache = fd.new_cache(8)
    # np.empty: tests that start past 0 read these positions, which must not be whatever the
    # memory held (a NaN left there failed the overflow test below under the sanitizer build)
    cache.kv.fill(0)
    cfg = real.config
    h = real.embed(token_ids(cfg.vocab_size, 1, 2, 0))[0]
    cos = np.ones((2, fd.head_dim // 2), np.float32)
    scratch = np.empty(decoder_wq_scratch_bytes(fd.plan, 2, 2), np.uint8)
    return fd, dict(plan=fd.plan, h=h, start=0, cos=cos, sin=cos.copy(), kv=cache.kv,
                    scratch=scratch)


def _bad_values(fd, kw):
    """(name, value, exception, message) for the forward's arguments of this model."""
    d, half = kw["h"].shape[1], kw["cos"].shape[1]
    L, cap, _, Hkv, hd = kw["kv"].shape
    return [
        ("plan", object(), TypeError, "plan: expected a decoder_wq_plan"),
        ("h", np.zeros((2, d + 1), np.float32), ValueError, "h: axis 1"),
        ("h", np.zeros((2, d), np.float64), TypeError, "h: expected dtype"),
        ("h", np.zeros((0, d), np.float32), ValueError, "h: the weight-only step takes 1 to 32"),
        ("h", np.zeros((33, d), np.float32), ValueError, "h: the weight-only step takes 1 to 32"),
        ("h", np.zeros((2, 2 * d), np.float32)[:, ::2], ValueError, "h"),
        ("start", 7, ValueError, "start: positions 7..8"),
        ("start", -1, ValueError, "start"),
        ("start", 1.5, TypeError, "start"),
        ("start", 2**63 - 1, ValueError, "start: positions"),
        ("cos", np.ones((3, half), np.float32), ValueError, "cos"),
        ("cos", np.full((2, half), np.nan, np.float32), ValueError,
         "cos: a rotary table needs finite values"),
        ("sin", np.full((2, half), 1e30, np.float32), ValueError,
         "sin: a rotary table needs finite values"),
        ("h", np.full((2, d), np.nan, np.float32), ValueError, "h: contains NaN or Inf"),
        ("kernel", None, TypeError, "kernel: expected a str"),
        ("sin", np.ones((2, half), np.float64), TypeError, "sin"),
        ("kv", np.zeros((L, cap, 2, Hkv, hd + 1), np.float32), ValueError, "kv: axis 4"),
        ("kv", np.zeros((L + 1, cap, 2, Hkv, hd), np.float32), ValueError, "kv: axis 0"),
        ("kv", np.zeros((L, cap, 2, Hkv, hd), np.float64), TypeError, "kv"),
        ("scratch", np.empty(16, np.uint8), ValueError, "scratch: expected at least"),
        ("kernel", "vnni", ValueError, "kernel"),
    ]


def test_forward_validates_every_argument(step_args):
    fd, kwargs = step_args
    for name, value, exc, match in _bad_values(fd, kwargs):
        bad = dict(kwargs, **{name: value})
        kernel = bad.pop("kernel", "auto")
        with pytest.raises(exc, match=match):
            decoder_wq_forward(**bad, kernel=kernel)
    ro = kwargs["kv"].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="kv"):
        decoder_wq_forward(**dict(kwargs, kv=ro))


@pytest.mark.parametrize("value", [np.nan, 3e38])
def test_forward_blames_a_non_finite_cached_row_and_gives_h_back(step_args, value):
    """A cached position before ``start`` that holds NaN (or a value whose products overflow)
    made the step's output NaN without a word; now the step fails naming ``kv`` and puts h back
    as it was given."""
    fd, kwargs = step_args
    kv = kwargs["kv"].copy()
    kv[0, 0] = value
    h = kwargs["h"].copy()
    scratch = np.empty(decoder_wq_scratch_bytes(fd.plan, 2, 5), np.uint8)
    match = "^kv: layer 0, position 0 holds NaN" if np.isnan(value) else "^h: the step's activ"
    with pytest.raises(ValueError, match=match):
        decoder_wq_forward(**dict(kwargs, h=h, kv=kv, start=3, scratch=scratch))
    np.testing.assert_array_equal(h, kwargs["h"])


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_blames_one_nan_in_a_cached_key(step_args, kernel):
    """One NaN element of one cached key: the SIMD softmax's exp clamped it to -87, so the score
    became a zero weight and the AVX2 and AVX-512 steps returned finite, wrong hidden states
    (the generic kernel's expf kept the NaN and the step failed); every kernel now fails."""
    fd, kwargs = step_args
    kv = kwargs["kv"].copy()
    kv[0, 1, 0, 0, 0] = np.nan  # layer 0, position 1, K, KV head 0, dimension 0
    h = kwargs["h"].copy()
    scratch = np.empty(decoder_wq_scratch_bytes(fd.plan, 2, 5), np.uint8)
    with pytest.raises(ValueError, match="^kv: layer 0, position 1 holds NaN"):
        decoder_wq_forward(**dict(kwargs, h=h, kv=kv, start=3, scratch=scratch, kernel=kernel))
    np.testing.assert_array_equal(h, kwargs["h"])


def test_forward_rejects_buffers_that_share_memory(step_args):
    """h inside the cache or the scratch, or the cache inside a weight: the step would overwrite
    its own input or the model."""
    fd, kwargs = step_args
    kv, d = kwargs["kv"], kwargs["h"].shape[1]
    big = np.zeros(kwargs["scratch"].size + 8 * d, np.uint8)
    h_in_scratch = big[:8 * d].view(np.float32).reshape(2, d)
    with pytest.raises(ValueError, match="h: must not share memory with scratch"):
        decoder_wq_forward(**dict(kwargs, h=h_in_scratch, scratch=big))
    flat = kv.reshape(-1)
    if flat.size >= 2 * d:
        with pytest.raises(ValueError, match="h: must not share memory with kv"):
            decoder_wq_forward(**dict(kwargs, h=flat[:2 * d].reshape(2, d)))
    weight_scale = fd.plan_layers[0][2][1]  # a writeable weight array of the plan
    if weight_scale.size >= 2 * d and weight_scale.flags.writeable:
        with pytest.raises(ValueError, match="must not share memory with the plan's weights"):
            decoder_wq_forward(**dict(kwargs, h=weight_scale.reshape(-1)[:2 * d].reshape(2, d)))


def test_plan_validates_layers(quantized):
    real = quantized.model("real")
    fd = FusedWeightOnlyDecoder(real)
    cfg = real.config
    dims = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                head_dim=fd.head_dim, eps=float(cfg.rms_norm_eps))
    layer = fd.plan_layers[0]
    packed, scale, zero, bits, group, bias = layer[2]

    def with_qkv(*spec):
        return (layer[:2] + (spec,) + layer[3:],)

    cases = [
        ((), TypeError, "layers: expected a non-empty tuple"),
        ((layer[:5],), TypeError, r"layers\[0\]: expected a tuple"),
        (with_qkv(packed, scale, zero, 5, group, bias), ValueError, r"layers\[0\].qkv.bits"),
        (with_qkv(packed, scale, zero, bits, group + 1, bias), ValueError,
         r"layers\[0\].qkv.group"),
        (with_qkv(packed[:, :-1], scale, zero, bits, group, bias), ValueError,
         r"layers\[0\].qkv.packed"),
        (with_qkv(packed, scale.astype(np.float64), zero, bits, group, bias), TypeError,
         r"layers\[0\].qkv.scale"),
        (with_qkv(packed, np.full_like(scale, np.inf), zero, bits, group, bias), ValueError,
         r"layers\[0\].qkv.scale: contains NaN or Inf"),
        (with_qkv(packed, scale, zero, bits, group, np.zeros(3, np.float32)), ValueError,
         r"layers\[0\].qkv.bias"),
        ((layer[:1] + (np.zeros(3, np.float32),) + layer[2:],), ValueError,
         r"layers\[0\].post_norm"),
        ((layer[:1] + (np.full(cfg.hidden_size, np.nan, np.float32),) + layer[2:],), ValueError,
         r"layers\[0\].post_norm: contains NaN or Inf"),
        (with_qkv(packed, scale, zero, bits, group, np.full(packed.shape[0], np.inf, np.float32)),
         ValueError, r"layers\[0\].qkv.bias: contains NaN or Inf"),
    ]
    for layers, exc, match in cases:
        with pytest.raises(exc, match=match):
            decoder_wq_plan(layers, **dims)
    with pytest.raises(ValueError, match="num_heads"):
        decoder_wq_plan(fd.plan_layers, **dict(dims, num_kv_heads=cfg.num_attention_heads + 1))
    for eps in (float("nan"), 0.0):
        with pytest.raises(ValueError, match="^eps: expected a finite value > 0"):
            decoder_wq_plan(fd.plan_layers, **dict(dims, eps=eps))
    with pytest.raises(ValueError, match="positions: expected a positive size"):
        decoder_wq_scratch_bytes(fd.plan, 1, 0)
    with pytest.raises(ValueError, match="rows: the weight-only step takes 1 to 32"):
        decoder_wq_scratch_bytes(fd.plan, 33, 40)
