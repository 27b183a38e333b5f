"""The key offset (``QuantConfig.kv_centre_keys``, offq/recipe/key_offset.py): each KV head's mean
key subtracted before the K cache is quantized.

It must be free in float (softmax ignores a shift shared by every key of a head), and it must
rescue a 4-bit K cache from a large common key part, as Qwen2.5's k_proj biases give (on the
real Qwen2.5-Coder-1.5B: ppl 13.3 FP, 3856 with K4, 13.5 with K4 centred; 1 window x 512).
"""
import dataclasses

import numpy as np
import pytest

from offq.config import QuantConfig
from offq.model.decoder import Model
from offq.model.ops import apply_rope, rope_cos_sin
from offq.quant.online import HadamardQK
from offq.recipe import pipeline
from offq.recipe.key_offset import KeyMean, key_offset_from_bias
from tiny_models import calibration, tiny_checkpoint, token_ids


def big_key_bias(seed=0, bias=60.0):
    """A tiny Qwen2 whose k_proj biases carry a large constant on a few channels of each head
    (what Qwen2.5-1.5B's layer 0 does, at ~190)."""
    ckpt = tiny_checkpoint(seed, arch="qwen2")
    cfg = ckpt.config
    for i in range(cfg.num_hidden_layers):
        b = ckpt.tensors[f"model.layers.{i}.self_attn.k_proj.bias"].reshape(
            cfg.num_key_value_heads, cfg.head_dim)
        b[:, cfg.head_dim // 2 - 1] += bias  # the lowest RoPE frequency: nearly constant
        b[:, cfg.head_dim - 1] -= bias / 2
    return ckpt


def logits_with(ckpt, hook, ids):
    return Model.from_checkpoint(ckpt, layer_hook=hook).forward(ids)


@pytest.mark.parametrize("hadamard", [True, False])
def test_offset_is_free_in_float(hadamard):
    """Any offset, however large, leaves float logits unchanged (up to rounding); the same
    offset applied to queries instead (a wrong sign convention) would not."""
    ckpt = tiny_checkpoint(1, arch="qwen2")
    cfg = ckpt.config
    ids = token_ids(cfg.vocab_size, 2, 24, 0)
    rng = np.random.default_rng(0)
    offsets = [50 * rng.standard_normal((cfg.num_key_value_heads, cfg.head_dim)).astype(np.float32)
               for _ in range(cfg.num_hidden_layers)]

    def plain(layer):
        layer.qk_transform = HadamardQK(cfg.head_dim, hadamard=hadamard)
        return layer

    def centred(layer):
        layer.qk_transform = HadamardQK(cfg.head_dim, offsets[layer.index], hadamard=hadamard)
        return layer

    ref = logits_with(ckpt, plain, ids)
    got = logits_with(ckpt, centred, ids)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4 * np.abs(ref).max())

    def on_queries(layer):  # what a bug moving the offset to q would do
        inner = HadamardQK(cfg.head_dim, hadamard=hadamard)
        rep = cfg.num_attention_heads // cfg.num_key_value_heads

        def qk(q, k):
            q, k = inner(q, k)
            return q - np.repeat(offsets[layer.index], rep, axis=0)[None, :, None, :], k
        layer.qk_transform = qk
        return layer

    wrong = logits_with(ckpt, on_queries, ids)
    assert np.abs(wrong - ref).max() > 1e-2 * np.abs(ref).max()


def test_offset_validates_its_shape():
    with pytest.raises(ValueError, match="k_offset"):
        HadamardQK(16, np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="k_offset"):
        HadamardQK(16, np.full((2, 16), np.nan, np.float32))
    qk = HadamardQK(16, np.zeros((2, 16), np.float32))
    with pytest.raises(ValueError, match="k:"):
        qk(np.zeros((1, 4, 3, 16), np.float32), np.zeros((1, 3, 3, 16), np.float32))


def test_key_mean_is_the_mean_key():
    rng = np.random.default_rng(2)
    acc = KeyMean()
    ks = [rng.standard_normal((2, 3, t, 8)).astype(np.float32) + 5 for t in (4, 7)]
    for k in ks:
        acc(k, k)
    want = np.concatenate([k.transpose(1, 0, 2, 3).reshape(3, -1, 8) for k in ks], axis=1)
    np.testing.assert_allclose(acc.mean(), want.mean(axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="no keys"):
        KeyMean().mean()


def test_data_free_offset_is_the_mean_rotated_bias():
    ckpt = big_key_bias()
    cfg = ckpt.config
    b = ckpt.tensors["model.layers.0.self_attn.k_proj.bias"]
    got = key_offset_from_bias(b, cfg, 32, r3=False)
    inv = Model.from_checkpoint(ckpt).inv_freq
    rows = []
    for p in range(32):  # one position at a time: RoPE of the bias alone
        cos, sin = rope_cos_sin(inv, p, 1)
        rows.append(apply_rope(b.reshape(1, cfg.num_key_value_heads, 1, cfg.head_dim), cos,
                               sin)[0, :, 0])
    np.testing.assert_allclose(got, np.mean(rows, axis=0), rtol=1e-5, atol=1e-5)
    assert not key_offset_from_bias(None, cfg, 32, r3=True).any()


@pytest.mark.parametrize("method,calibrated", [("offq", True), ("rtn", False)])
def test_centred_keys_rescue_a_4bit_cache(method, calibrated):
    """With a large common key part, KV4 without the offset loses most of attention (several
    times the KV4 error of the same model without it); with the offset (calibrated, or from the
    bias for RTN: averaged over calib_seqlen positions) the error is back to that baseline."""
    cfg = QuantConfig(method=method, w_bits=16, a_bits=16, kv_bits=4, calib_seqlen=40)

    def kv4_error(bias, centre):
        ckpt = big_key_bias(bias=bias)
        calib = calibration(ckpt, 8, 40, 1) if calibrated else None
        ids = token_ids(ckpt.config.vocab_size, 2, 40, 5)
        ref = Model.from_checkpoint(ckpt).forward(ids)
        res = pipeline.quantize(ckpt, dataclasses.replace(cfg, kv_centre_keys=centre), calib,
                                progress=False)
        names = [n for n in res.tensors if n.endswith(".k_cache_offset")]
        assert len(names) == (ckpt.config.num_hidden_layers if centre else 0)
        return float(np.abs(res.model("real").forward(ids) - ref).mean())

    baseline = kv4_error(0.0, False)
    assert kv4_error(60.0, False) > 4 * baseline
    assert kv4_error(60.0, True) < 1.3 * baseline


def test_fused_runtime_uses_the_offset():
    """The C decoder subtracts the same offset: its hidden states match the NumPy real path
    (offset on), and differ from a plan built without it."""
    from offq.kernels.decoder import decoder_plan
    from offq.quant.fused import FusedDecoder

    ckpt = big_key_bias(3, bias=20.0)
    res = pipeline.quantize(ckpt, QuantConfig(method="offq"), calibration(ckpt, 8, 48, 1),
                            progress=False)
    real = res.model("real")
    ids = token_ids(real.config.vocab_size, 1, 24, 3)
    ref = real.hidden_states(ids)[0]
    fd = FusedDecoder(real, prefill="c")
    h = fd.run(real.embed(ids)[0], fd.new_cache())
    np.testing.assert_allclose(h, ref, rtol=0, atol=4e-6 * np.abs(ref).max())
    assert all(layer[6] is not None for layer in fd.plan_layers)
    # the same plan without the offsets: the 4-bit cache then quantizes other keys
    fd.plan_layers = tuple(layer[:6] + (None,) for layer in fd.plan_layers)
    mc = real.config
    fd.plan = decoder_plan(fd.plan_layers, hidden_size=mc.hidden_size,
                           intermediate_size=mc.intermediate_size,
                           num_heads=mc.num_attention_heads, num_kv_heads=mc.num_key_value_heads,
                           head_dim=fd.head_dim, eps=float(mc.rms_norm_eps), a_symmetric=False,
                           a_clip=1.0, kv_symmetric=False, kv_group=fd.kv_group, r3=True, r4=True)
    h2 = fd.run(real.embed(ids)[0], fd.new_cache())
    assert np.abs(h2 - ref).max() > 1e-3 * np.abs(ref).max()


def test_checkpoints_before_the_offset_load_uncentred():
    data = QuantConfig().to_dict()
    del data["kv_centre_keys"]
    assert QuantConfig.from_dict(data).kv_centre_keys is False
    assert QuantConfig.from_dict(QuantConfig().to_dict()).kv_centre_keys is True
    assert "centred" in QuantConfig().describe()


# ---------------------------------------------------------------------- found by mutation
def test_rtn_with_centred_keys_measures_the_mean_key():
    """Centred keys need the calibration's mean key even when the weights need no calibration
    (RTN): a pipeline that skipped the pass fell back to the bias-only offset, zeros for a
    model without a k bias."""
    ckpt = tiny_checkpoint(0, arch="llama")  # no k_proj bias
    cfg = QuantConfig(method="offq", w_bits=16, a_bits=16, kv_bits=4, calib_seqlen=40)
    res = pipeline.quantize(ckpt, cfg, calibration(ckpt, 8, 40, 1), progress=False)
    offsets = [t for n, t in sorted(res.tensors.items()) if n.endswith("k_cache_offset")]
    assert len(offsets) == ckpt.config.num_hidden_layers
    assert all(np.abs(o).max() > 0.05 for o in offsets)


@pytest.mark.parametrize("r3", [False, True])
def test_the_data_free_offset_follows_r3(r3):
    """Without calibration the offset is the mean rotated bias, in the basis the cache stores:
    with R3 off, the plain keys' (a pipeline that asked whether the method rotates instead of
    whether R3 is on stored the Hadamard-basis offset)."""
    ckpt = tiny_checkpoint(0, arch="qwen2")
    cfg = QuantConfig(method="offq", pca="none", w_quantizer="rtn", w_bits=16, a_bits=16,
                      kv_bits=4, r3=r3, calib_seqlen=40)
    res = pipeline.quantize(ckpt, cfg, None, progress=False)
    want = key_offset_from_bias(ckpt.tensors["model.layers.0.self_attn.k_proj.bias"],
                                ckpt.config, 40, r3=r3)
    got = res.tensors["model.layers.0.self_attn.k_cache_offset"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
