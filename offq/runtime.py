"""Running a quantized model: fake-quant (simulated) and real (packed 4-bit kernels) linears,
KV codecs, online rotations, and :func:`build_model` over the stored tensors of an offq model.

Two execution paths that compute the same thing:

* ``mode="fake"``: weights dequantized to float32 once; each linear input is quantized and
  dequantized per token and group (``offq.kernels.quantize`` / ``dequantize``) and multiplied in
  float32; K and V are round-tripped through the KV quantizer before entering the cache. When
  weights and activations are both 4-bit the product is formed by :class:`GroupProduct`, the
  arithmetic of the W4A4 kernel written in NumPy (exact integer products per group, then the
  kernel's float32 steps in its order), not by sgemm.
* ``mode="real"``: weights stay packed (``QTensor``); each linear input is quantized on the fly and
  ``offq.kernels.matmul_w4a4`` multiplies the codes with the zero-point correction (W4A4); the KV
  cache stores packed codes. Other bit widths (e.g. W4A8) dequantize the weight and use sgemm on
  the fake-quantized activations, so both paths stay defined for every row of the results table.

The two paths compute the same float32 numbers (bit for bit; see :class:`GroupProduct` for the one
~2^-29-probability exception). Why not just sgemm on the dequantized operands: a 4-bit activation
quantizer turns a one-ulp difference in its input into a one-step difference (a rounding flip)
once in a while, and 30 layers amplify those flips chaotically. On SmolLM2-135M W4A4KV4 (OffQ,
512-token windows) a sgemm-based fake path and the real kernel differed by ~3% in perplexity over
4 windows, and so did two sgemm fake paths that merely summed in different orders; the difference
averages out only slowly with more windows.

Stored tensor names (HF names; see offq/checkpoint.py): a quantized linear ``X.weight`` is stored as
``X.qweight`` (uint8 codes, two 4-bit codes per byte with element 2i in the low nibble, else one
per byte), ``X.scales`` and ``X.zeros`` (float32 [out, groups]); biases, norms, embeddings and
lm_head stay float32 under their own names (lm_head is not quantized).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import _C
from .config import OFF, QuantConfig
from .kernels import QTensor, dequantize, quantize
from .model.kv_cache import FakeQuantKVCodec, grow_token_major
from .model.linear import FUSED_LINEARS, LINEAR_NAMES, DenseLinear, SlicedLinear
from .model.llama import DecoderLayer, Model, layer_tensor_names
from .model.parallel import num_threads, run_tasks
from .quantizers.grid import dequantize_codes
from .rotations import r3_qk_transform, r4_input_transform

logger = logging.getLogger(__name__)

MODES = ("fake", "real")


# ---------------------------------------------------------------------------------- codes
def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Storage layout of unpacked uint8 codes [..., K]: 4-bit -> [..., ceil(K/2)] (element 2i in
    the low nibble, 2i+1 in the high nibble); other widths unchanged."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits != 4:
        return codes
    k = codes.shape[-1]
    if k % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` -> uint8 [..., k]."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits != 4:
        return np.ascontiguousarray(packed[..., :k])
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return np.ascontiguousarray(out[..., :k])


@dataclass(frozen=True)
class StoredLinear:
    """A quantized linear as stored: unpacked codes [N, K], scale/zero [N, G], optional bias."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    group_size: int
    symmetric: bool
    bias: np.ndarray | None = None

    def dequantized(self) -> np.ndarray:
        """float32 ``[N, K]`` weight ``scale * (codes - zero)``."""
        g = self.group_size
        return dequantize_codes(self.codes, np.repeat(self.scale, g, axis=1),
                                np.repeat(self.zero, g, axis=1))

    def qtensor(self):
        """The packed :class:`offq.kernels.QTensor` of the codes."""
        return QTensor.from_codes(self.codes, self.scale, self.zero, bits=self.bits,
                                  group_size=self.group_size, symmetric=self.symmetric)


# ---------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActQuant:
    """Dynamic per-token, per-group activation quantizer (min/max, optional clip)."""

    bits: int
    group_size: int
    symmetric: bool
    clip: float = 1.0

    def quantize(self, x2d: np.ndarray):
        """QTensor of float32 ``x2d[M, K]`` (C-contiguous)."""
        return quantize(x2d, bits=self.bits, group_size=self.group_size,
                        symmetric=self.symmetric, clip=self.clip)

    def fake(self, x: np.ndarray) -> np.ndarray:
        """Round trip of ``x[..., K]`` (float32, same shape)."""
        k = x.shape[-1]
        x2d = np.ascontiguousarray(x.reshape(-1, k), dtype=np.float32)
        return dequantize(self.quantize(x2d)).reshape(x.shape)


def activation_quantizer(cfg: QuantConfig, k: int) -> ActQuant | None:
    """The run-time quantizer of a linear input of dimension ``k`` (None when activations stay
    in float)."""
    if cfg.a_bits == OFF:
        return None
    return ActQuant(cfg.a_bits, cfg.activation_group(k), cfg.a_symmetric, float(cfg.a_clip))


# ---------------------------------------------------------------------------------- linears
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

    def __init__(self, stored: "StoredLinear", a_group: int) -> None:
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

    def __init__(self, stored: StoredLinear, act: ActQuant | None) -> None:
        self.w = stored.qtensor()
        self.bias = None if stored.bias is None else np.ascontiguousarray(stored.bias, np.float32)
        self.act = act
        self.out_features, self.in_features = stored.codes.shape
        self._integer = integer_product(stored, act)
        self._dense = None if self._integer else DenseLinear(stored.dequantized(), self.bias)

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
        # the C core directly (it validates its arguments): the Python wrappers' checks cost more
        # than a decode-size product
        w, act = self.w, self.act
        codes, scale, zero, _ = _C.quantize(x2d, 4, act.group_size, act.symmetric, act.clip)
        y = _C.matmul_w4a4(codes, scale, zero, act.group_size, w.codes, w.scale, w.zero,
                           w.group_size, self.in_features, None, "auto")
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features)


def integer_product(stored: StoredLinear, act: ActQuant | None) -> bool:
    """Whether a linear runs the 4-bit x 4-bit integer product (``matmul_w4a4`` on the real
    path, :class:`GroupProduct` on the fake path)."""
    return act is not None and act.bits == 4 and stored.bits == 4


# ---------------------------------------------------------------------------------- KV cache
#: Elements per dequantize call when reading a packed cache: the kernels start an OpenMP team at
#: 2^15 elements, and for a few microseconds of work a team start can cost milliseconds on a busy
#: machine, so reads are cut into calls below that size.
_KV_READ_ELEMS = (1 << 15) - 1


@dataclass(frozen=True)
class PackedKVCodec:
    """K/V quantizer ``[B, Hkv, T, hd]`` -> QTensor (per token and head, groups along head_dim);
    its :meth:`new_store` keeps the cache packed (:class:`PackedKVStore`)."""

    bits: int
    group_size: int
    symmetric: bool

    def encode(self, x: np.ndarray, *, kind: str):
        """QTensor of ``x[..., head_dim]``."""
        return quantize(np.ascontiguousarray(x, dtype=np.float32), bits=self.bits,
                        group_size=self.group_size, symmetric=self.symmetric)

    def decode(self, enc: Any, *, kind: str) -> np.ndarray:
        """float32 values of an encoded block."""
        return dequantize(enc)

    def new_store(self) -> "PackedKVStore":
        """An empty packed store for a layer's keys and values."""
        return PackedKVStore(self)


class PackedKVStore:
    """One layer's K and V as packed codes, scales and zero-points in token-major buffers
    (``[capacity, 2, B, Hkv, ...]``, K then V, grown geometrically). ``append`` quantizes the new
    keys and values with one call; ``read`` dequantizes the ``length`` cached tokens (a
    contiguous prefix) and returns ``[B, Hkv, length, hd]`` views. The values are exactly
    ``codec.decode(codec.encode(x))`` of what was appended (groups lie inside one token's head
    vector, so encoding K and V together changes nothing)."""

    def __init__(self, codec: PackedKVCodec) -> None:
        self.codec = codec
        self.length = 0
        self._codes = self._scale = self._zero = None
        self._hd = 0

    def append(self, k: np.ndarray, v: np.ndarray) -> None:
        """Quantize and store ``k, v[B, Hkv, t, hd]`` after the cached tokens."""
        B, H, t, hd = k.shape
        if self._codes is not None and (self._codes.shape[2:4] != (B, H) or hd != self._hd):
            raise ValueError(f"k: shape {k.shape} does not match the cache "
                             f"[{self._codes.shape[2]}, {self._codes.shape[3]}, *, {self._hd}]")
        self._hd = hd
        x = np.empty((t, 2, B, H, hd), dtype=np.float32)
        x[:, 0] = k.transpose(2, 0, 1, 3)
        x[:, 1] = v.transpose(2, 0, 1, 3)
        c = self.codec
        codes, scale, zero, _ = _C.quantize(x, c.bits, c.group_size, c.symmetric, 1.0)
        end = self.length + t
        self._codes = grow_token_major(self._codes, self.length, end, codes.shape[1:], np.uint8)
        self._scale = grow_token_major(self._scale, self.length, end, scale.shape[1:],
                                       np.float32)
        self._zero = grow_token_major(self._zero, self.length, end, zero.shape[1:], np.float32)
        self._codes[self.length:end] = codes
        self._scale[self.length:end] = scale
        self._zero[self.length:end] = zero
        self.length = end

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """Dequantized keys and values ``[B, Hkv, length, hd]`` (views of one fresh array)."""
        c, n = self.codec, self.length
        per_token = int(np.prod(self._codes.shape[1:4])) * self._hd
        step = n if num_threads() == 1 else max(1, _KV_READ_ELEMS // per_token)
        if step >= n:
            kv = _C.dequantize(self._codes[:n], self._scale[:n], self._zero[:n], c.bits,
                               c.group_size, self._hd)
        else:
            kv = np.empty((n,) + self._codes.shape[1:4] + (self._hd,), dtype=np.float32)
            for s in range(0, n, step):
                e = min(n, s + step)
                kv[s:e] = _C.dequantize(self._codes[s:e], self._scale[s:e], self._zero[s:e],
                                        c.bits, c.group_size, self._hd)
        return kv[:, 0].transpose(1, 2, 0, 3), kv[:, 1].transpose(1, 2, 0, 3)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached tokens' codes, scales and zero-points."""
        if self._codes is None:
            return 0
        n = self.length
        return int(self._codes[:n].nbytes + self._scale[:n].nbytes + self._zero[:n].nbytes)


def kv_codec(cfg: QuantConfig, head_dim: int, mode: str):
    """The layer's KV codec: packed (:class:`PackedKVCodec`, a packed cache) on the real path, a
    float round trip through the same quantizer on the fake path, None without KV quantization."""
    if cfg.kv_bits == OFF:
        return None
    packed = PackedKVCodec(cfg.kv_bits, cfg.kv_group(head_dim), cfg.kv_symmetric)
    if mode == "real":
        return packed
    return FakeQuantKVCodec(lambda x, kind: packed.decode(packed.encode(x, kind=kind), kind=kind))


# ---------------------------------------------------------------------------------- model
def stored_linear(tensors: Mapping[str, np.ndarray], weight_name: str, cfg: QuantConfig,
                  in_features: int) -> StoredLinear | None:
    """Read a quantized linear's stored tensors (None when it is stored in float)."""
    base = weight_name[: -len(".weight")]
    if base + ".qweight" not in tensors:
        return None
    g = cfg.weight_group(in_features)
    packed = np.asarray(tensors[base + ".qweight"])
    scale = np.asarray(tensors[base + ".scales"], dtype=np.float32)
    zero = np.asarray(tensors[base + ".zeros"], dtype=np.float32)
    n = packed.shape[0]
    expect_cols = (in_features + 1) // 2 if cfg.w_bits == 4 else in_features
    if packed.dtype != np.uint8 or packed.shape != (n, expect_cols):
        raise ValueError(f"{base}.qweight: expected uint8 [{n}, {expect_cols}] for {cfg.w_bits}-bit "
                         f"codes of {in_features} inputs, got {packed.dtype} {list(packed.shape)}")
    if scale.shape != (n, in_features // g) or zero.shape != scale.shape:
        raise ValueError(f"{base}.scales/zeros: expected [{n}, {in_features // g}] (group {g}), got "
                         f"{list(scale.shape)} / {list(zero.shape)}")
    codes = unpack_codes(packed, cfg.w_bits, in_features)
    if codes.max(initial=0) > 2 ** cfg.w_bits - 1:
        raise ValueError(f"{base}.qweight: codes exceed {cfg.w_bits} bits")
    bias = tensors[base + ".bias"] if base + ".bias" in tensors else None
    return StoredLinear(codes, scale, zero, cfg.w_bits, g, cfg.w_symmetric,
                        None if bias is None else np.asarray(bias, dtype=np.float32))


def build_layer(tensors: Mapping[str, np.ndarray], model_config: Any, cfg: QuantConfig, i: int,
                mode: str) -> DecoderLayer:
    """Decoder layer ``i`` with quantized linears and the online transforms of ``cfg``."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    names = layer_tensor_names(i)
    linears: dict[str, Any] = {}
    fused: dict[str, Any] = {}
    stored_all, acts = {}, {}
    for lin in LINEAR_NAMES:
        shape_in = (model_config.intermediate_size if lin == "down_proj"
                    else model_config.num_attention_heads * model_config.head_dim if lin == "o_proj"
                    else model_config.hidden_size)
        acts[lin] = activation_quantizer(cfg, shape_in)
        stored_all[lin] = stored_linear(tensors, names[lin], cfg, shape_in)
    for key, members in FUSED_LINEARS.items():
        parts = [stored_all[n] for n in members]
        if not all(p is not None and integer_product(p, acts[n]) for p, n in zip(parts, members)):
            continue
        # one activation quantization and one product for the input site; each output column
        # is computed exactly as in the separate product (the integer path is column-wise)
        whole = concat_stored(parts)
        act = acts[members[0]]
        fused[key] = (W4A4Linear(whole, act) if mode == "real" else
                      FakeQuantLinear(None, whole.bias, act, GroupProduct(whole, act.group_size)))
        start = 0
        for n, p in zip(members, parts):
            linears[n] = SlicedLinear(fused[key], start, start + p.codes.shape[0])
            start += p.codes.shape[0]
    for lin in LINEAR_NAMES:
        if lin in linears:
            continue
        name = names[lin]
        act, stored = acts[lin], stored_all[lin]
        if stored is None:
            bias_name = name[: -len("weight")] + "bias"
            w = np.asarray(tensors[name], dtype=np.float32)
            b = np.asarray(tensors[bias_name], dtype=np.float32) if bias_name in tensors else None
            linears[lin] = FakeQuantLinear(w, b, act)
        elif mode == "fake" and integer_product(stored, act):
            linears[lin] = FakeQuantLinear(None, stored.bias, act,
                                           GroupProduct(stored, act.group_size))
        elif mode == "fake":
            linears[lin] = FakeQuantLinear(stored.dequantized(), stored.bias, act)
        else:
            linears[lin] = W4A4Linear(stored, act)
    layer = DecoderLayer(index=i, input_norm=np.asarray(tensors[names["input_norm"]], np.float32),
                         post_attention_norm=np.asarray(tensors[names["post_norm"]], np.float32),
                         linears=linears, fused=fused)
    return install_online(layer, model_config, cfg, mode)


def concat_stored(parts: list[StoredLinear]) -> StoredLinear:
    """The linears ``parts`` (same inputs and grid) as one, output features concatenated in
    order; a missing bias is zeros when another part has one."""
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.symmetric) != (first.bits, first.group_size, first.symmetric) \
                or p.codes.shape[1] != first.codes.shape[1]:
            raise ValueError("parts: linears of different input size or grid cannot be fused")
    bias = None
    if any(p.bias is not None for p in parts):
        bias = np.concatenate([p.bias if p.bias is not None
                               else np.zeros(p.codes.shape[0], np.float32) for p in parts])
    return StoredLinear(np.concatenate([p.codes for p in parts]),
                        np.concatenate([p.scale for p in parts]),
                        np.concatenate([p.zero for p in parts]),
                        first.bits, first.group_size, first.symmetric, bias)


def install_online(layer: DecoderLayer, model_config: Any, cfg: QuantConfig,
                   mode: str) -> DecoderLayer:
    """Attach R3 (qk_transform), R4 (down_input_transform) and the KV codec to a layer."""
    if cfg.rotates and cfg.r3:
        layer.qk_transform = r3_qk_transform(model_config.head_dim)
    if cfg.rotates and cfg.r4:
        layer.down_input_transform = r4_input_transform(model_config.intermediate_size)
    layer.kv_codec = kv_codec(cfg, model_config.head_dim, mode)
    return layer


def build_model(model_config: Any, cfg: QuantConfig, tensors: Mapping[str, np.ndarray], *,
                mode: str = "real", resident: bool = True, name: str = "") -> Model:
    """A runnable :class:`offq.model.Model` over the stored tensors of a quantized model."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    embed = np.asarray(tensors["model.embed_tokens.weight"], dtype=np.float32)
    head = tensors["lm_head.weight"] if "lm_head.weight" in tensors else embed
    return Model(model_config, embed_tokens=embed,
                 final_norm=np.asarray(tensors["model.norm.weight"], np.float32),
                 lm_head=DenseLinear(np.asarray(head, np.float32)),
                 layer_loader=lambda i: build_layer(tensors, model_config, cfg, i, mode),
                 resident=resident, name=name)
