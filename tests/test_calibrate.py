"""The sequential calibration of one layer (offq/recipe/calibrate.py) against a plain reference
built from the runner's whole-layer forward: each site's Hessian is that of the layer with the
earlier sites quantized and the later ones in float, the mean key is that of the quantized q/k/v,
and the calibration batch leaves the layer exactly as the quantized layer's forward sends it.

Both settings of ``calib_activations`` are checked against the float32 simulation ("fake"):
"float" (activations and KV in float) and "quantized" (activations rounded as at run time; the
calibration then runs the real W4A4 kernels, which must give the simulation's numbers bit for
bit)."""
import dataclasses

import numpy as np
import pytest

from offq.config import OFF, QuantConfig
from offq.model.arch import architecture_of
from offq.model.decoder import LayerRunner
from offq.model.linear import DenseLinear
from offq.quant.assemble import build_layer
from offq.quantizers.gptq import HessianAccumulator
from offq.quantizers.registry import build_weight_quantizer
from offq.recipe import rotations as rot
from offq.recipe.calibrate import SITE_ORDER, calibrate_layer
from offq.recipe.key_offset import KeyMean
from offq.recipe.pipeline import quantize_site_linears
from offq.recipe.statistics import fused_layer
from tiny_models import tiny_checkpoint


CALIB = ["float", "quantized"]


def _setup(arch, seed=0, calib="float"):
    ckpt = tiny_checkpoint(seed, arch=arch, layers=1, d=64, hd=16, nh=4, nkv=2, f=128)
    mc = ckpt.config
    # coarse grids: big differences (4-bit weights with quantized activations: the integer
    # product, whose real kernel is what the "quantized" calibration runs)
    cfg = QuantConfig(method="quarot", w_bits=3 if calib == "float" else 4, a_group_size=32,
                      calib_activations=calib)
    w = fused_layer(ckpt, mc, 0)
    rot.rotate_layer(w, 0, mc, r1=rot.quarot_r1(mc.hidden_size, 0),
                     r2=rot.r2_matrices(mc.head_dim, mc.num_key_value_heads), r4=cfg.r4)
    h = np.random.default_rng(seed).standard_normal((5, 24, mc.hidden_size)).astype(np.float32)
    h[:, 0] *= 20  # a massive first token, as in an LLM
    return mc, cfg, w, h


def _run(mc, cfg, w, h, batch_size=2, propagate=True):
    pre, quantizer = build_weight_quantizer(cfg)
    seen = {}

    def quantize_site(site, hess):
        seen[site] = hess.hessian  # a copy: the accumulator is finished
        return quantize_site_linears(w, hess, mc, cfg, 0, site, pre, quantizer)

    out = h.copy()
    done = calibrate_layer(LayerRunner(mc), dict(w), mc, cfg, out, 0, batch_size, quantize_site,
                           propagate=propagate)
    return done, seen, out


def _crossing(cfg):
    """The simulated layer the calibration batch must cross (KV float; activations as set)."""
    if cfg.calib_activations == "quantized":
        return dataclasses.replace(cfg, kv_bits=OFF)
    return dataclasses.replace(cfg, a_bits=OFF, kv_bits=OFF)


@pytest.mark.parametrize("calib", CALIB)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_site_hessians_see_the_earlier_sites_quantized(arch, calib):
    mc, cfg, w, h = _setup(arch, calib=calib)
    done, seen, out = _run(mc, cfg, w, h)
    a = architecture_of(mc)
    weights_only = _crossing(cfg)
    norms = w[a.norm(0, "input_norm")], w[a.norm(0, "post_norm")]
    runner = LayerRunner(mc)
    for k, site in enumerate(SITE_ORDER):
        quantized = {n for s in SITE_ORDER[:k] for n in a.sites[s]}
        mix = {n: done.linears[n] if n in quantized else
               DenseLinear(w[a.weight(0, n)], w.get(a.bias(0, n))) for n in a.linear_names}
        layer = build_layer(mix, *norms, mc, weights_only, 0, "fake")
        acc = {}

        def capture(s, _i, x):
            acc.setdefault(s, HessianAccumulator(x.shape[-1])).update(x)

        for s in range(0, h.shape[0], 2):
            runner.forward(layer, h[s:s + 2].copy(), capture=capture)
        ref = acc[site].finish()
        np.testing.assert_allclose(seen[site], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(),
                                   err_msg=site)
        if k:  # the order matters: with this site's own inputs from the float layer it differs
            layer = build_layer({n: DenseLinear(w[a.weight(0, n)], w.get(a.bias(0, n)))
                                 for n in a.linear_names}, *norms, mc, weights_only, 0, "fake")
            acc = {}
            runner.forward(layer, h.copy(), capture=capture)
            assert np.abs(acc[site].finish() - ref).max() > 1e-3 * np.abs(ref).max(), site


@pytest.mark.parametrize("calib", CALIB)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batch_leaves_as_the_quantized_layer_sends_it(arch, calib):
    """Bit for bit: a resumed run propagates through the stored layer instead."""
    mc, cfg, w, h = _setup(arch, seed=1, calib=calib)
    done, _, out = _run(mc, cfg, w, h)
    a = architecture_of(mc)
    weights_only = _crossing(cfg)
    layer = build_layer(done.linears, w[a.norm(0, "input_norm")], w[a.norm(0, "post_norm")], mc,
                        weights_only, 0, "fake")
    keys = KeyMean(layer.qk_transform)
    layer.qk_transform = keys
    ref = h.copy()
    for s in range(0, h.shape[0], 2):
        LayerRunner(mc).forward(layer, ref[s:s + 2])
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(done.key_mean, keys.mean())
    assert not np.array_equal(out, h)
    _, _, untouched = _run(mc, cfg, w, h, propagate=False)  # the last layer: no propagation
    assert np.abs(untouched - h).max() > 0  # o_proj is applied for the MLP's Hessian ...
    assert not np.array_equal(untouched, out)  # ... but not down_proj


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_calibration_runs_the_integer_kernels_and_sees_rounded_activations(
        arch, monkeypatch):
    """With ``calib_activations="quantized"`` the 4-bit products of the calibration are
    ``matmul_w4a4`` calls (the speed it exists for), and the Hessians after the first site
    differ from those of the float calibration of the same weights."""
    import offq.quant.linears as linears_module

    mc, cfg, w, h = _setup(arch, seed=2, calib="quantized")
    calls = []
    real_matmul = linears_module.matmul_w4a4

    def counting(a, wq, **kw):
        calls.append(a.shape)
        return real_matmul(a, wq, **kw)

    monkeypatch.setattr(linears_module, "matmul_w4a4", counting)
    _, seen_q, out_q = _run(mc, cfg, w, h)
    monkeypatch.undo()
    # q/k/v fused, o_proj, gate/up fused, down_proj: one call each per batch (5 sequences in
    # batches of 2: 3 batches)
    assert len(calls) == 4 * 3
    _, seen_f, out_f = _run(mc, dataclasses.replace(cfg, calib_activations="float"), w, h)
    np.testing.assert_array_equal(seen_q["attn_in"], seen_f["attn_in"])  # nothing rounded yet
    for site in SITE_ORDER[1:]:
        ref = seen_f[site]
        assert np.abs(seen_q[site] - ref).max() > 1e-3 * np.abs(ref).max(), site
    assert not np.array_equal(out_q, out_f)


@pytest.mark.parametrize("extra,kept", [({}, False), ({"w_quantizer": "osaq+gptq"}, False),
                                        ({"gptq_cd_sweeps": 1}, True)])
def test_the_hessian_is_dropped_before_the_weights_are_quantized(extra, kept):
    """quantize_site_linears takes the site's Hessian from its accumulator and drops it once the
    weight method is prepared, so GPTQ's product loop runs without it (640 MB at K = 8960, a
    Qwen2.5-1.5B layer's peak). Only a method that needs it later (CD sweeps) keeps it alive."""
    import weakref

    from offq.quantizers.gptq import GPTQ

    mc, cfg, w, h = _setup("qwen2")
    cfg = dataclasses.replace(cfg, **extra)
    pre, quantizer = build_weight_quantizer(cfg)
    assert isinstance(quantizer, GPTQ)
    acc = HessianAccumulator(mc.hidden_size)
    acc.update(h)
    acc.finish()
    ref = weakref.ref(acc.sum)
    alive = []

    @dataclasses.dataclass(frozen=True)
    class Probe(type(quantizer)):
        def quantize(self, w, prepared):
            alive.append(ref() is not None)
            return super().quantize(w, prepared)

    probe = Probe(**{f.name: getattr(quantizer, f.name) for f in dataclasses.fields(quantizer)})
    out, _ = quantize_site_linears(dict(w), acc, mc, cfg, 0, "attn_in", pre, probe)
    assert set(out) == {"q_proj", "k_proj", "v_proj"}
    assert alive == [kept]
    with pytest.raises(ValueError, match="handed over"):
        acc.finish()


@pytest.mark.parametrize("calib", CALIB)
def test_down_proj_inputs_are_held_as_its_activation_codes(calib, monkeypatch):
    """On the real kernels down_proj's inputs are held in memory as its own activation quantizer
    rounds them (4-bit codes and group parameters, about 1/7 of float32), nothing spilled; the
    float calibration spills float32. Either way the batch leaves bit for bit as the layer sends
    it (test above); a spill or a hold of the wrong kind fails these counts."""
    import offq.recipe.calibrate as calibrate_module
    from offq.kernels.quant import QTensor
    from offq.model.decoder import LayerRunner

    mc, cfg, w, h = _setup("llama", seed=4, calib=calib)
    written, held = [], []
    real_write = calibrate_module._write
    real_add = LayerRunner.add_quantized_output

    def counting(f, a, dtype=np.float32):
        written.append(np.asarray(a).astype(dtype).nbytes)
        real_write(f, a, dtype)

    def holding(self, layer, linear, hb, qx):
        assert isinstance(qx, QTensor) and linear == "down_proj"
        held.append(qx.codes.nbytes + qx.scale.nbytes + qx.zero.nbytes + qx.code_sums.nbytes)
        return real_add(self, layer, linear, hb, qx)

    monkeypatch.setattr(calibrate_module, "_write", counting)
    monkeypatch.setattr(LayerRunner, "add_quantized_output", holding)
    _run(mc, cfg, w, h)
    as_float = h.shape[0] * h.shape[1] * mc.intermediate_size * 4
    if calib == "float":
        assert sum(written) == as_float and not held
    else:  # codes: K/2 bytes a row; scale, zero and code sum: 12 bytes a group of 32
        assert not written
        assert sum(held) == as_float * (1 / 8 + 12 / (32 * 4))
