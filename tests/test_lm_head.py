"""The 4-bit LM head (``QuantConfig.lm_head_bits = 4``): its grid against a NumPy reading of
offq's grid, a checkpoint that stores and reloads it packed, and the logits it gives. (The 8-bit
head: tests/test_matmul_i8.py.)"""
import numpy as np
import pytest

from offq.config import QuantConfig
from offq.quant.assemble import load_quantized
from offq.quant.linears import PackedWeightLinear
from offq.quant.lm_head import lm_head_group, lm_head_names, quantize_lm_head4
from offq.recipe import pipeline
from tiny_models import calibration, head_bits_checkpoint, tiny_checkpoint, token_ids


def minmax_error(w: np.ndarray, group: int) -> np.ndarray:
    """Squared error per (row, group) of the plain min / max 4-bit grid (clip ratio 1), in
    NumPy: scale = (max - min) / 15, zero = rint(-min / scale), q = clip(rint(w / scale) + zero)."""
    v, d = w.shape
    g = w.reshape(v, d // group, group).astype(np.float32)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = (hi - lo) / np.float32(15)
    scale = np.where(scale == 0, np.where(hi != 0, np.abs(hi), np.float32(1)), scale)
    zero = np.rint(-lo / scale)
    q = np.clip(np.rint(g / scale) + zero, 0, 15)
    return ((scale * (q - zero) - g) ** 2).sum(-1)


@pytest.mark.parametrize("d", [64, 96, 576])
def test_the_4bit_grid_is_offq_grid_and_never_worse_than_min_max(d):
    """Codes in [0, 15], zero points integers, w_hat = scale * (q - zero) per group of
    lm_head_group(d) inputs, and each group's squared error at most the min / max grid's (the
    clip search keeps ratio 1 as a candidate); rows beyond one quantization step (8192) too."""
    rng = np.random.default_rng(d)
    v = 8192 + 37 if d == 64 else 300
    w = rng.standard_normal((v, d)).astype(np.float32)
    w[::7, :3] *= 40  # outlier inputs in some rows, as heads have
    qw = quantize_lm_head4(w)
    g = lm_head_group(d)
    assert (qw.bits, qw.group_size, qw.symmetric) == (4, g, False)
    assert qw.codes.shape == (v, d) and qw.codes.max() <= 15
    assert np.array_equal(qw.zero, np.rint(qw.zero))
    w_hat = (qw.scale[..., None] * (qw.codes.reshape(v, d // g, g).astype(np.float32)
                                    - qw.zero[..., None]))
    np.testing.assert_array_equal(w_hat.reshape(v, d), qw.dequantized)
    err, plain = ((w_hat - w.reshape(v, d // g, g)) ** 2).sum(-1), minmax_error(w, g)
    assert np.all(err <= plain * (1 + 1e-5) + 1e-12)
    assert np.mean(err < 0.99 * plain) > 0.25  # and the search does find better clips


def test_4bit_lm_head_checkpoint(tmp_path):
    """--lm-head-bits 4: stored as packed codes + scales + zero points, reloaded packed
    (PackedWeightLinear, ~1/7 of the float head's bytes); logits = the dequantized head's
    product, decoder layers unchanged, close to the float head's logits."""
    ckpt, fp_head, model, cfg = head_bits_checkpoint(tmp_path, 4)
    assert cfg.lm_head_bits == 4 and "head:int4" in cfg.describe()
    head = model.lm_head
    assert isinstance(head, PackedWeightLinear) and (head.bits, head.group) == (4, lm_head_group(64))
    v, d = ckpt.config.vocab_size, ckpt.config.hidden_size
    assert head.nbytes == v * d // 2 + 2 * 4 * v * (d // head.group)

    ref = fp_head.model("real")
    ids = token_ids(v, 1, 20, 3)
    np.testing.assert_array_equal(model.hidden_states(ids), ref.hidden_states(ids))
    # the head is the float head's 4-bit grid, applied exactly (up to float32 summation order)
    w_fp = ref.lm_head.weight
    w_hat = quantize_lm_head4(w_fp).dequantized
    x = np.random.default_rng(0).standard_normal((5, d)).astype(np.float32)
    np.testing.assert_allclose(head(x), x.astype(np.float64) @ w_hat.T.astype(np.float64),
                               rtol=1e-5, atol=1e-5 * np.abs(x @ w_hat.T).max())
    a, b = model.forward(ids), ref.forward(ids)
    assert np.abs(a - b).max() <= 0.15 * np.abs(b).max()  # 4-bit groups of 64: a coarse head


def test_4bit_lm_head_tensors_are_checked(tmp_path):
    """A 4-bit head checkpoint without its zero points, or with a non-finite one, is refused
    naming the tensor; 2- and 3-bit weights beside it do not read the head's packed bytes as
    2/3-bit codes."""
    import json

    from offq.formats.safetensors import load_safetensors, write_safetensors

    ckpt = tiny_checkpoint(1, arch="llama")
    calib = calibration(ckpt, 4, 32, 1)
    pipeline.quantize(ckpt, QuantConfig(method="gptq", w_bits=3, a_bits=16, kv_bits=16,
                                        lm_head_bits=4), calib, out_dir=tmp_path, progress=False)
    model, _, cfg = load_quantized(tmp_path, mode="real")  # packed bytes up to 255 pass
    assert cfg.w_bits == 3 and isinstance(model.lm_head, PackedWeightLinear)
    path = tmp_path / "model.safetensors"
    tensors, file_meta = load_safetensors(path)
    _, _, zname = lm_head_names("lm_head.weight")
    assert zname in tensors
    bad = dict(tensors)
    bad[zname] = bad[zname].copy()
    bad[zname][0, 0] = np.nan
    meta = json.loads((tmp_path / "config.json").read_text())
    for spoiled, message in ((bad, f"tensor '{zname}' contains NaN or Inf"),
                             ({k: t for k, t in tensors.items() if k != zname},
                              f"missing tensor '{zname}'")):
        write_safetensors(path, spoiled, file_meta)
        with pytest.raises(ValueError, match=message):
            load_quantized(tmp_path, mode="real")
    assert json.loads((tmp_path / "config.json").read_text()) == meta
