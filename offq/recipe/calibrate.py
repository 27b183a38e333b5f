"""Sequential calibration of one decoder layer: each input site's Hessian is taken after the sites
before it are quantized, and the same pass carries the calibration batch through the quantized
layer to the next one (docs/METHODS.md, "GPTQ", calibration order).

    attn_in   RMSNorm(h)                             -> H_qkv  -> quantize q, k, v
    o_in      attention with the quantized q, k, v   -> H_o    -> quantize o_proj
              (kept in memory: [samples, seqlen, heads * head_dim], the mean key recorded)
    mlp_in    h += o_proj(o_in); RMSNorm(h)          -> H_mlp  -> quantize gate, up
    down_in   SwiGLU of the quantized gate/up, R4    -> H_down -> quantize down_proj
              (spilled to a temporary file: 1.2 GB for Qwen2.5-1.5B at 16 x 2048; on the real
              kernels held in memory as down_proj's 4-bit activation codes, 0.17 GB)
    out       h += down_proj(down_in)                   the next layer's calibration input

Every product of the layer runs once. The older two-pass order (a float pass of the whole layer
for every site's Hessian, then a second pass through the quantized layer) computed each product
twice; this order is GPTQ's "true sequential" one and also lets a site's Hessian see the rounding
of the sites before it, as the runtime will. The result is exactly the quantized layer's forward
(the stages are :class:`~offq.model.decoder.LayerRunner`'s own), so a resumed run, which
propagates through the stored layer instead, continues bit for bit.

The layers the batch crosses have their weights quantized and KV in float; their activations are
rounded as the runtime does with ``calib_activations="quantized"`` (the default), which runs the
4-bit products on the real W4A4 kernels, and float with ``"float"`` (:func:`propagation_setting`).

The weight method stays outside: ``quantize_site(site, accumulator)`` (the recipe's) returns the
site's quantized linears; this module only decides when each Hessian is complete.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import OFF, QuantConfig
from ..kernels.quant import QTensor
from ..model.arch import architecture_of
from ..model.decoder import LayerRunner
from ..model.linear import DenseLinear
from ..quant.activation import ActQuant, activation_quantizer
from ..quant.assemble import build_layer
from ..quantizers.gptq import HessianAccumulator
from .key_offset import KeyMean

__all__ = ["LayerCalibration", "calibrate_layer", "propagation_setting", "SITE_ORDER"]

#: the input sites in the order the forward reaches them
SITE_ORDER = ("attn_in", "o_in", "mlp_in", "down_in")

#: ``quantize_site(site, finished accumulator or None) -> ({linear short name: quantized},
#: reports)``: the callee takes the Hessian (:meth:`HessianAccumulator.take`), so nothing here
#: keeps it alive once the weight method is done with it
QuantizeSite = Callable[[str, "HessianAccumulator | None"],
                        tuple[dict[str, Any], dict[str, Any]]]


def propagation_setting(cfg: QuantConfig) -> tuple[QuantConfig, str]:
    """The config and build mode of the layers the calibration batch crosses.

    KV stays float either way (the key offset it would need is what the pass measures). With
    ``calib_activations="float"`` the activations stay float too and the products run on the
    dequantized weights ("fake": sgemm). With ``"quantized"`` they are rounded by the run-time
    quantizer, and the layer is the real one: 4-bit x 4-bit products on ``matmul_w4a4``, whose
    results are the fake path's bit for bit (README, "Fake and real paths";
    tests/test_calibrate.py)."""
    if cfg.calib_activations == "quantized" and cfg.a_bits != OFF:
        return dataclasses.replace(cfg, kv_bits=OFF), "real"
    return dataclasses.replace(cfg, a_bits=OFF, kv_bits=OFF), "fake"


@dataclass
class LayerCalibration:
    """What :func:`calibrate_layer` produced for one layer."""

    linears: dict[str, Any]  # short name -> QuantizedWeight (or DenseLinear, weights in float)
    reports: dict[str, Any]
    key_mean: np.ndarray  # [Hkv, hd]: each KV head's mean key (the cache's basis)
    quantize_seconds: float  # of the wall time, in quantize_site (GPTQ, OSAQ, ...)


def calibrate_layer(runner: LayerRunner, w: dict[str, np.ndarray], mc: Any, cfg: QuantConfig,
                    h: np.ndarray, i: int, batch_size: int, quantize_site: QuantizeSite, *,
                    hessians: bool = True, propagate: bool = True) -> LayerCalibration:
    """Quantize layer ``i`` (its fused, rotated float tensors ``w``) site by site on the
    calibration hidden states ``h[samples, seqlen, d]``, which are advanced in place through the
    quantized layer when ``propagate`` (without it, for the last layer, ``h`` is left part-way:
    attention added, the MLP not). Without ``hessians`` (RTN with centred keys) every site is
    quantized first and one forward records the mean key."""
    arch = architecture_of(mc)
    crossing, mode = propagation_setting(cfg)
    linears: dict[str, Any] = {n: DenseLinear(w[arch.weight(i, n)], w.get(arch.bias(i, n)))
                               for n in arch.linear_names}
    reports: dict[str, Any] = {}
    batches = [slice(s, s + batch_size) for s in range(0, h.shape[0], batch_size)]
    spent = 0.0

    def current_layer() -> Any:
        """The layer with the sites quantized so far (the others still float)."""
        return build_layer(linears, w[arch.norm(i, "input_norm")], w[arch.norm(i, "post_norm")],
                           mc, crossing, i, mode)

    def quantize(site: str, acc: HessianAccumulator | None) -> Any:
        """Quantize ``site``, install its linears, return the layer as it now stands."""
        nonlocal spent
        t = time.perf_counter()
        new, rep = quantize_site(site, None if acc is None else _checked(acc, i, site))
        spent += time.perf_counter() - t
        linears.update(new)
        reports.update(rep)
        return current_layer()

    if not hessians:
        for site in SITE_ORDER:
            layer = quantize(site, None)
        keys = KeyMean(layer.qk_transform)
        layer.qk_transform = keys
        for b in batches:
            runner.forward(layer, h[b] if propagate else h[b].copy())
        return LayerCalibration(linears, reports, keys.mean(), spent)

    d = h.shape[-1]
    acc = HessianAccumulator(d)
    layer = current_layer()
    for b in batches:
        acc.update(runner.attention_input(layer, h[b]))
    layer = quantize("attn_in", acc)

    keys = KeyMean(layer.qk_transform)
    layer.qk_transform = keys
    acc, attended = HessianAccumulator(mc.num_attention_heads * runner.head_dim), []
    for b in batches:
        o = runner.attend(layer, runner.attention_input(layer, h[b]))
        acc.update(o)
        attended.append(o)
    key_mean = keys.mean()
    layer = quantize("o_in", acc)

    acc = HessianAccumulator(d)
    for b, o in zip(batches, attended):
        hb = h[b]  # a view: the residual advances in place
        runner.add_output(layer, "o_proj", hb, o)
        acc.update(runner.mlp_input(layer, hb))
    attended = o = None  # with the loop's last o_proj input (50 MB at 4 x 2048)
    layer = quantize("mlp_in", acc)

    acc = HessianAccumulator(mc.intermediate_size)
    down_act = _integer_input_quantizer(crossing, mode, mc.intermediate_size)
    # what down_proj's product starts from on the real kernels: 7x fewer bytes than float, so
    # kept in memory (writing and reading them back cost ~0.3 s a Qwen2.5-1.5B layer)
    held: list[QTensor | None] = []
    with tempfile.TemporaryFile(prefix="offq-down-in-") as spill:
        for b in batches:
            u = runner.mlp_hidden(layer, runner.mlp_input(layer, h[b]))
            acc.update(u)
            if propagate and down_act is None:
                _write(spill, u)
            elif propagate:
                held.append(_input_codes(down_act, u, i))
        u = None  # the last batch's down_proj input (294 MB at 4 x 2048): not beside GPTQ
        layer = quantize("down_in", acc)  # the weight method took the 640 MB Hessian and dropped it
        if propagate:
            spill.seek(0)
            if down_act is not None:
                _check_input_quantizer(layer.linears["down_proj"], down_act)
            for k, b in enumerate(batches):
                hb = h[b]
                if down_act is None:
                    u = _read(spill, hb.shape[:-1] + (mc.intermediate_size,))
                    runner.add_output(layer, "down_proj", hb, u)
                else:
                    runner.add_quantized_output(layer, "down_proj", hb, held[k])
                    held[k] = None
    return LayerCalibration(linears, reports, key_mean, spent)


def _integer_input_quantizer(crossing: QuantConfig, mode: str, k: int) -> ActQuant | None:
    """down_proj's run-time input quantizer when the batch crosses it on the real 4-bit x 4-bit
    product (then its inputs are spilled as that quantizer's codes), else None."""
    act = activation_quantizer(crossing, k)
    if mode != "real" or act is None or act.bits != 4 or crossing.w_bits != 4:
        return None
    return act


def _input_codes(act: ActQuant, u: np.ndarray, i: int) -> QTensor:
    """down_proj's input ``u`` as its run-time quantizer's codes. These are made before the
    site's Hessian is checked, so a NaN or Inf in ``u`` is named here as the check would."""
    try:
        return act.quantize(np.ascontiguousarray(u.reshape(-1, u.shape[-1])))
    except ValueError as e:
        if np.all(np.isfinite(u)):
            raise
        raise ValueError(_nonfinite(i, "down_in")) from e


def _nonfinite(i: int, site: str) -> str:
    return (f"layer {i} site {site}: the calibration activations contain NaN or Inf (a broken "
            f"checkpoint or an overflow in an earlier layer)")


def _check_input_quantizer(linear: Any, act: ActQuant) -> None:
    """The spilled codes are the product's input only if down_proj quantizes with ``act``."""
    if not (getattr(linear, "integer", False) and linear.act == act):
        raise RuntimeError(f"calibration: down_proj was built as {type(linear).__name__} with "
                           f"input quantizer {getattr(linear, 'act', None)}, not the integer "
                           f"product on {act} its inputs were spilled for")


def _checked(acc: HessianAccumulator, i: int, site: str) -> HessianAccumulator:
    """The accumulator, finished; refused when its inputs held NaN/Inf or were all zero."""
    if not np.all(np.isfinite(acc.sum)):  # one NaN anywhere in the site's inputs reaches the sum
        raise ValueError(_nonfinite(i, site))
    if not np.any(np.diag(acc.sum)):  # every input dead: GPTQ would zero the whole weight
        raise ValueError(f"layer {i} site {site}: every calibration activation is zero (an "
                         f"overflow in an earlier layer's RMSNorm?)")
    acc.finish()
    return acc


def _write(f: Any, a: np.ndarray, dtype: type = np.float32) -> None:
    f.write(memoryview(np.ascontiguousarray(a, dtype=dtype)).cast("B"))


def _read(f: Any, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    out = np.empty(shape, dtype=dtype)
    view = memoryview(out).cast("B")
    got = f.readinto(view)
    if got != view.nbytes:
        raise OSError(f"calibration spill file: read {got} of {view.nbytes} bytes")
    return out
