"""Quantized linears: the simulated one (fake quantization in float32) and the real one (packed
4-bit weights, activations quantized on the fly, the W4A4 integer kernel).

Two execution paths that compute the same thing:

* fake (:class:`FakeQuantLinear`): weights dequantized to float32 once; each input is quantized
  and dequantized per token and group and multiplied in float32. When weights and activations are
  both 4-bit the product is formed by :class:`GroupProduct`, the arithmetic of the W4A4 kernel
  written in NumPy (exact integer products per group, then the kernel's float32 steps in its
  order), not by sgemm.
* real (:class:`W4A4Linear`): weights stay packed (``QTensor``); each input is quantized on the
  fly and ``offq.kernels.matmul_w4a4`` multiplies the codes with the zero-point correction. Other
  bit widths (e.g. W4A8) dequantize the weight and use sgemm on the fake-quantized activations,
  so both paths stay defined for every row of the results table.
* real weight-only (:class:`PackedWeightLinear`, float activations, 2/3/4/8-bit weights): the codes
  stay packed (``bits`` bits a weight plus float32 scale and zero per group) and
  ``offq.kernels.matmul_wq.matmul_wq`` dequantizes them on the fly. It equals the fake path's
  float32 product with the dequantized weight up to float32 summation order (not bit for bit:
  with float activations there is no rounding step that would amplify the difference).

The two paths compute the same float32 numbers (bit for bit; see :class:`GroupProduct` for the one
~2^-29-probability exception). Why not just sgemm on the dequantized operands: a 4-bit activation
quantizer turns a one-ulp difference in its input into a one-step difference (a rounding flip)
once in a while, and 30 layers amplify those flips chaotically. On SmolLM2-135M W4A4KV4 (OffQ,
512-token windows) a sgemm-based fake path and the real kernel differed by ~3% in perplexity over
4 windows, and so did two sgemm fake paths that merely summed in different orders.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..kernels import matmul_w4a4
from ..kernels.quant import QTensor
from ..kernels.matmul_wq import WQ_BITS, matmul_wq, pack_wq
from ..model.linear import DenseLinear
from ..model.parallel import run_tasks
from .activation import ActQuant
from .weight import QuantizedWeight

__all__ = ["GroupProduct", "FakeQuantLinear", "W4A4Linear", "PackedWeightLinear",
           "integer_product", "packed_weight_only"]


_EXACT = float(1 << 24)  # float32 represents every integer of magnitude up to 2^24 exactly


class GroupProduct:
    """``dequantize(a) @ W_hat.T`` for 4-bit ``a`` and 4-bit stored weights, in NumPy, with the
    arithmetic of ``offq.kernels.matmul_w4a4`` (so the fake and the real path agree bit for bit).

    Per block ``b`` of ``blk = min(a.group_size, w.group_size)`` inputs the kernel forms the
    integer dot product ``D = sum qa qw``, the code sums ``Sa`` (activations) and ``Sw``
    (weights), and in float32 ::

        wT = Sw - blk * zw                     (float32 product, then float32 difference)
        E  = fma(-za, wT, fma(-Sa, zw, D))     (= sum (qa - za)(qw - zw), each step rounded once)
        y  = fma(sa * sw, E, y)                (blocks in order, y starting at 0)

    While ``blk * (15 + max|za|) * (15 + max|zw|) < 2^24`` every intermediate is an integer
    below 2^24, so ``E`` is exact and is computed here as one float32 product of the
    integer-valued ``(qa - za)`` and ``(qw - zw)`` (exact in any summation order); otherwise
    (massive-outlier groups with huge zero-points) each fused step is reproduced in float64 and
    rounded to float32 once. The last fused multiply-add is computed in float64 (``sa*sw*E`` is
    exact there) and rounded to float32: this equals the fused result except when the float64
    sum falls exactly on a float32 rounding midpoint (double rounding, probability ~2^-29).
    """

    def __init__(self, stored: QuantizedWeight, a_group: int) -> None:
        if stored.bits != 4:
            raise ValueError(f"stored: expected 4-bit weights, got bits={stored.bits}")
        n, k = stored.codes.shape
        gw = stored.group_size
        blk = min(a_group, gw)
        if max(a_group, gw) % blk or k % blk:
            raise ValueError(f"a_group: {a_group} and the weight group {gw} must divide each "
                             f"other and K={k}")
        self.in_features, self.out_features = k, n
        self.blk, self.nb, self.a_group = blk, k // blk, a_group
        gidx = np.arange(self.nb) * blk // gw  # weight group of each block
        self.zw = np.ascontiguousarray(stored.zero[:, gidx].T)  # [nb, N]
        self.sw = np.ascontiguousarray(stored.scale[:, gidx].T)
        sums = stored.codes.reshape(n, self.nb, blk).sum(axis=-1, dtype=np.int64)
        self.wT = (sums.T.astype(np.float32) - np.float32(blk) * self.zw).astype(np.float32)
        self.zw_max = float(np.abs(stored.zero).max(initial=0.0))
        # integer-valued (qw - zw), exact while |zw| < 2^24 - 15; per block, transposed [blk, N]
        wc = stored.codes.astype(np.float32) - np.repeat(stored.zero, gw, axis=1)
        self.wcT = np.ascontiguousarray(wc.reshape(n, self.nb, blk).transpose(1, 2, 0))

    @property
    def nbytes(self) -> int:
        """Bytes of the weight operand and per-block parameters."""
        return int(self.wcT.nbytes + 3 * self.zw.nbytes)

    def __call__(self, aq: Any) -> np.ndarray:
        """float32 ``[M, N]`` for a 4-bit QTensor ``aq`` ``[M, K]`` (group ``a_group``)."""
        if aq.bits != 4 or aq.group_size != self.a_group or aq.shape[-1] != self.in_features:
            raise ValueError(f"aq: expected a 4-bit QTensor [M, {self.in_features}] with group "
                             f"{self.a_group}, got {aq!r}")
        qa = aq.unpacked_codes()
        m = qa.shape[0]
        out = np.empty((m, self.out_features), dtype=np.float32)
        za_max = float(np.abs(aq.zero).max(initial=0.0))
        fast = self.blk * (15.0 + za_max) * (15.0 + self.zw_max) < _EXACT
        ratio = self.a_group // self.blk  # blocks per activation group

        def rows(sl: slice) -> None:
            q = qa[sl].astype(np.float32)
            za, sa = aq.zero[sl], aq.scale[sl]
            r = q.shape[0]
            if fast:
                q -= np.repeat(za, self.a_group, axis=1)  # integer-valued (qa - za), exact
            else:
                asum = q.reshape(r, self.nb, self.blk).sum(axis=-1, dtype=np.float64)
            y = out[sl]
            e = np.empty((r, self.out_features), dtype=np.float32)
            sc = np.empty_like(e)
            t = np.empty((r, self.out_features), dtype=np.float64)
            for b in range(self.nb):
                ks = slice(b * self.blk, (b + 1) * self.blk)
                g = b // ratio
                if fast:
                    np.matmul(q[:, ks], self.wcT[b], out=e)  # exact integers
                else:
                    wq = self.wcT[b] + self.zw[b]  # the codes again (exact)
                    d = np.matmul(q[:, ks], wq).astype(np.float64)  # exact
                    d -= asum[:, b, None] * self.zw[b].astype(np.float64)
                    d = d.astype(np.float32).astype(np.float64)
                    d -= za[:, g, None].astype(np.float64) * self.wT[b].astype(np.float64)
                    e[...] = d
                np.multiply(sa[:, g, None], self.sw[b], out=sc)  # float32 sa * sw
                np.multiply(sc, e, out=t, dtype=np.float64)  # exact
                if b:
                    t += y
                y[...] = t  # one rounding to float32

        # 32-row pieces: the float64 temporaries of a piece stay in L2
        run_tasks(rows, [slice(i, min(m, i + 32)) for i in range(0, m, 32)])
        return out


class FakeQuantLinear:
    """``y = fq(x) @ W_hat.T + b`` in float32 (W_hat: the dequantized stored weight).

    With ``product`` (4-bit weights and 4-bit activations) the product is formed by
    :class:`GroupProduct`, the kernel's arithmetic on dequantized operands, instead of sgemm.
    """

    def __init__(self, weight: np.ndarray | None, bias: np.ndarray | None, act: ActQuant | None,
                 product: GroupProduct | None = None) -> None:
        self.product = product
        self.dense = None if product is not None else DenseLinear(weight, bias)
        self.bias = None if bias is None else np.ascontiguousarray(bias, np.float32)
        self.act = act

    @property
    def in_features(self) -> int:
        """Input dimension K."""
        return self.dense.in_features if self.dense is not None else self.product.in_features

    @property
    def out_features(self) -> int:
        """Output dimension N."""
        return self.dense.out_features if self.dense is not None else self.product.out_features

    @property
    def rows_independent(self) -> bool:
        """Whether each output row has the same bits whatever rows are computed beside it (the
        integer product's arithmetic is exact and row-wise; sgemm makes no such promise)."""
        return self.product is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the weight (and bias)."""
        if self.dense is not None:
            return self.dense.nbytes
        return self.product.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.product is None:
            return self.dense(x if self.act is None else self.act.fake(x))
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last axis {self.in_features}, got shape {x.shape}")
        lead = x.shape[:-1]
        x2d = np.ascontiguousarray(x.reshape(-1, self.in_features), dtype=np.float32)
        y = self.product(self.act.quantize(x2d))
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features)


class W4A4Linear:
    """Real low-bit linear: packed weight QTensor; activations quantized on the fly; integer
    matmul with offset correction (``matmul_w4a4``) when weights and activations are both 4-bit,
    else sgemm on dequantized operands."""

    def __init__(self, stored: QuantizedWeight, act: ActQuant | None) -> None:
        self.w = stored.qtensor()
        self.bias = None if stored.bias is None else np.ascontiguousarray(stored.bias, np.float32)
        self.act = act
        self.out_features, self.in_features = stored.codes.shape
        self._integer = integer_product(stored, act)
        self._dense = None if self._integer else DenseLinear(stored.dequantized, self.bias)

    @property
    def integer(self) -> bool:
        """Whether this linear runs the 4-bit x 4-bit integer product (``matmul_w4a4``)."""
        return self._integer

    @property
    def rows_independent(self) -> bool:
        """Whether each output row has the same bits whatever rows are computed beside it, for
        calls of more rows than ``matmul_w4a4``'s few-rows path takes (its exact integer terms
        are row-wise; the few-rows path agrees only while they stay below 2^24). The forward's
        row blocks (``offq.model.decoder._fused_swiglu``) are far above it;
        tests/test_runtime.py checks the bits."""
        return self._integer

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (and bias)."""
        return int(self.w.nbytes) + (0 if self.bias is None else self.bias.nbytes)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last axis {self.in_features}, got shape {x.shape}")
        if not self._integer:
            return self._dense(x if self.act is None else self.act.fake(x))
        lead = x.shape[:-1]
        x2d = np.ascontiguousarray(x.reshape(-1, self.in_features), dtype=np.float32)
        return self.from_quantized(self.act.quantize(x2d)).reshape(*lead, self.out_features)

    def from_quantized(self, qx: QTensor) -> np.ndarray:
        """``[M, N]`` output of the integer product for an input its own activation quantizer
        already rounded (``qx = self.act.quantize(x2d)``): the same bits as ``self(x2d)``."""
        if not self._integer:
            raise ValueError("from_quantized: this linear does not run the 4-bit x 4-bit product")
        y = matmul_w4a4(qx, self.w)
        if self.bias is not None:
            y += self.bias
        return y


def integer_product(stored: QuantizedWeight, act: ActQuant | None) -> bool:
    """Whether a linear runs the 4-bit x 4-bit integer product (``matmul_w4a4`` on the real
    path, :class:`GroupProduct` on the fake path)."""
    return act is not None and act.bits == 4 and stored.bits == 4


class PackedWeightLinear:
    """Real weight-only linear ``y = x @ W_hat.T + b``: float32 activations, the weight kept
    packed at 2, 3, 4 or 8 bits (:func:`offq.kernels.matmul_wq.pack_wq`) with float32 scale and
    zero-point per (row, group), dequantized on the fly by ``matmul_wq``.

    Memory: ``bits / 8`` bytes a weight plus 8 bytes a group (a 4-bit g128 linear is ~1/7.1 of
    its float32 size); the one-code-per-byte ``stored.codes`` and ``stored.dequantized`` are not
    kept.
    """

    def __init__(self, stored: QuantizedWeight) -> None:
        if stored.bits not in WQ_BITS:
            raise ValueError(f"stored: expected a {WQ_BITS}-bit weight, got bits={stored.bits}")
        self.out_features, self.in_features = (int(d) for d in stored.codes.shape)
        self.bits, self.group = int(stored.bits), int(stored.group_size)
        self.packed = pack_wq(np.ascontiguousarray(stored.codes, dtype=np.uint8), self.bits)
        self.scale = np.ascontiguousarray(stored.scale, dtype=np.float32)
        self.zero = np.ascontiguousarray(stored.zero, dtype=np.float32)
        self.bias = None if stored.bias is None else np.ascontiguousarray(stored.bias, np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes, scales, zero-points (and bias)."""
        return int(self.packed.nbytes + self.scale.nbytes + self.zero.nbytes
                   + (0 if self.bias is None else self.bias.nbytes))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last axis {self.in_features}, got shape {x.shape}")
        lead = x.shape[:-1]
        x2d = np.ascontiguousarray(x.reshape(-1, self.in_features), dtype=np.float32)
        y = matmul_wq(x2d, self.packed, self.scale, self.zero, self.bits, self.group)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features)


def packed_weight_only(stored: QuantizedWeight, act: ActQuant | None) -> bool:
    """Whether a linear runs weight-only on packed codes (:class:`PackedWeightLinear` on the real
    path): float activations and a 2-, 3-, 4- or 8-bit weight."""
    return act is None and stored.bits in WQ_BITS
