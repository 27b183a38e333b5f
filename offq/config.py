"""QuantConfig: every setting of a quantization run, with the documented defaults.

Each **(choice)** of docs/METHODS.md is a field here (and a CLI flag of ``offq quantize``), so that the
ablation tables are produced by changing one field. The defaults are the OffQ W4A4KV4 recipe:

- weights: 4-bit, symmetric, per output channel (``w_group_size=-1``), MSE clip search, GPTQ;
- activations: 4-bit, asymmetric, per token, per group of 128 consecutive channels (the largest
  power of two dividing the dimension when 128 does not: 64 for SmolLM2's d = 576), clip 1.0;
- KV cache: 4-bit, asymmetric, per token and head (group = head_dim), keys centred (each KV head's
  calibrated mean key subtracted before quantization; softmax is invariant to it);
- rotations: R1 = U1 P H1 (top-1 PCA basis, uncentred, pooled over layers and both sites;
  sorted grouping; block Hadamard aligned with the activation groups; statistics from the first
  8 calibration sequences), R2 = per-head Hadamard,
  R3 (online Hadamard on Q/K after RoPE) and R4 (online Hadamard on the down_proj input) on;
- calibration: 128 sequences x 2048 tokens, seed 0, carried through the quantized layers with
  activations rounded as at run time, so the products run on the real W4A4 kernels
  (``calib_activations="quantized"``; ``"float"`` keeps them float, QuaRot's way);
- GPTQ: damping 0.01 * mean(diag H), act-order on, lazy blocks of 128, no coordinate-descent
  sweeps after it (``gptq_cd_sweeps``, OSAQ's ``+CD`` variant: offq/quantizers/cd.py);
- OSAQ (only with ``w_quantizer="osaq+gptq"``/``"osaq+rtn"``): gamma 1e-4, tau_rel 0.03,
  mu1 1e-2, mu2 100 (both relative), one solve round (see offq/quantizers/osaq.py).

docs/METHODS.md lists every field with its flag and the reasoning behind each default.

Bits equal to 16 switch a quantizer off (``a_bits=16`` is W4A16). ``method`` picks the rotation:
``offq`` (PCA + block Hadamard R1), ``quarot`` (random-sign full Hadamard R1), ``gptq``/``rtn`` (no
rotation at all: the in-house baselines) and ``fp`` (no rotation, no quantization).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .quant.grid import SUPPORTED_BITS, resolve_group
from .quantizers.registry import parse_weight_quantizer

logger = logging.getLogger(__name__)

METHODS = ("offq", "quarot", "gptq", "rtn", "fp")
PCA_MODES = ("top1", "standard", "none")
OUTLIER_INDEX = ("ones", "other")
OSAQ_TAILS = ("auto", "exact", "subspace")
R2_MODES = ("hadamard", "pca_hadamard", "none")
CALIB_ACTIVATIONS = ("float", "quantized")
GPTQ_DTYPES = ("auto", "float64", "float32")
OFF = 16  # a bit width of 16 switches that quantizer off

CONFIG_VERSION = 1


def _default_weight_quantizer(method: str) -> str:
    return "rtn" if method == "rtn" else "gptq"


def largest_pow2_divisor_at_most(d: int, g: int) -> int:
    """The largest power of two that divides ``d`` and is at most ``g``."""
    p = 1
    while p * 2 <= g and d % (p * 2) == 0:
        p *= 2
    return p


@dataclass
class QuantConfig:
    """All settings of one quantization run (see the module docstring for the defaults)."""

    method: str = "offq"  # "fp" sets every width below to 16 whatever was passed
    # --- bits (16 = that quantizer is off) ---
    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 4
    lm_head_bits: int = 16  # 8 / 4: the LM head stored in 8 or 4 bits (offq.quant.lm_head)
    # --- weights ---
    w_quantizer: str | None = None  # None: "rtn" for method rtn, else "gptq"
    w_group_size: int = -1  # -1 = one group per output channel
    w_symmetric: bool = True
    w_clip_search: bool = True  # MSE search over the clip ratio per group
    # --- activations (every linear input) ---
    a_group_size: int = 128  # -1 = per token; shrunk to a power of two dividing d when needed
    a_symmetric: bool = False
    a_clip: float = 1.0
    # --- KV cache ---
    kv_group_size: int = -1  # -1 = head_dim (per token, per head)
    kv_symmetric: bool = False
    # the key offset: each KV head's mean key (in the cache's basis, from the calibration pass)
    # subtracted before K is quantized; softmax ignores it (docs/METHODS.md, "KV cache")
    kv_centre_keys: bool = True
    # --- R1 (OffQ) ---
    pca: str = "top1"  # top1 | standard | none
    pca_centred: bool = False
    pca_pooled: bool = True
    # calibration sequences the statistics pass reads (the first N; 0 = all): the dominant
    # direction stops moving after one, the top-4 subspace by about eight (docs/METHODS.md)
    pca_samples: int = 8
    sorted_grouping: bool = True
    outlier_index: str = "ones"  # ones (all-ones Hadamard row, OffQ) | other (ablation)
    # --- R2, R3, R4 ---
    r2: str = "hadamard"  # hadamard | pca_hadamard | none
    r3: bool = True
    r4: bool = True
    # --- calibration ---
    calib_samples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    # what the calibration batch carries through the quantized layers: "quantized" (the
    # activations rounded by the run-time quantizer, so the 4-bit products run on the real W4A4
    # kernels and the Hessians see the rounding the model runs with) or "float" (weights
    # quantized, activations in float, as QuaRot calibrates GPTQ; the products in float32 sgemm).
    # KV stays float either way. "quantized" is the default since 2026-12-06: the same
    # perplexity within the seed-to-seed spread, a third less calibration time (docs/METHODS.md)
    calib_activations: str = "quantized"
    # --- GPTQ ---
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    gptq_block_size: int = 128
    gptq_static_groups: bool = False  # forced on with act-order and groups (storage layout)
    gptq_cd_sweeps: int = 0  # coordinate-descent re-quantization sweeps after GPTQ (+CD)
    # GPTQ's arithmetic: the Hessian's Cholesky factorization, the rounding errors and the weight
    # updates. float32 (the reference GPTQ code's) runs them at twice float64's rate (down_proj's
    # K = 8960: factor 1.0 instead of 2.0 s, updates 0.4 instead of 0.7 s on two Zen5 cores);
    # "auto" takes float64 below GPTQ_FLOAT32_FROM_K inputs, where it costs little, and float32
    # from there, where the K x K factor and the updates are most of GPTQ's time
    gptq_dtype: str = "auto"
    # --- OSAQ ---
    osaq_gamma: float = 1e-4
    osaq_tau_rel: float = 0.03
    osaq_mu1: float = 1e-2
    osaq_mu2: float = 100.0
    osaq_iters: int = 1  # solve rounds (Lawson reweighting between them)
    osaq_tail: str = "auto"  # auto | exact | subspace: how the Hessian tail is found

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # NumPy scalars as the Python values JSON stores
            value = getattr(self, f.name)
            if (isinstance(value, np.generic) or isinstance(value, np.ndarray)
                    and value.ndim == 0) and value.dtype.kind in "biuf":
                setattr(self, f.name, value.item())
        if self.w_quantizer is None:
            self.w_quantizer = _default_weight_quantizer(self.method)
        if self.method == "fp":
            self.w_bits = self.a_bits = self.kv_bits = OFF
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is not allowed."""

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")

        def bits(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value not in SUPPORTED_BITS + (OFF,):
                raise ValueError(f"{name}: expected one of 2, 3, 4, 8 or 16 (off), got {value!r}")

        def group(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (value != -1 and value < 1):
                raise ValueError(f"{name}: expected -1 or a positive integer, got {value!r}")

        def positive(name: str, *, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value >= 0 if allow_zero else value > 0) and math.isfinite(value)
            if not ok:
                kind = "a finite non-negative" if allow_zero else "a finite positive"
                raise ValueError(f"{name}: expected {kind} number, got {value!r}")

        def flag(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")

        choice("method", METHODS)
        _, rounding = parse_weight_quantizer(self.w_quantizer)
        # method rtn never hides GPTQ rounding (the reverse, method gptq with w_quantizer rtn,
        # is the unrotated RTN baseline of the weight-only tables)
        if self.method == "rtn" and rounding != "rtn":
            raise ValueError(f"w_quantizer: method 'rtn' rounds weights to nearest, got "
                             f"{self.w_quantizer!r}; unrotated {rounding.upper()} weights are "
                             f"method 'gptq' with w_quantizer {self.w_quantizer!r}")
        choice("pca", PCA_MODES)
        choice("outlier_index", OUTLIER_INDEX)
        choice("r2", R2_MODES)
        choice("osaq_tail", OSAQ_TAILS)
        choice("calib_activations", CALIB_ACTIVATIONS)
        choice("gptq_dtype", GPTQ_DTYPES)
        for name in ("w_bits", "a_bits", "kv_bits"):
            bits(name)
        for name in ("w_group_size", "a_group_size", "kv_group_size"):
            group(name)
        for name in ("w_symmetric", "w_clip_search", "a_symmetric", "kv_symmetric", "kv_centre_keys",
                     "pca_centred",
                     "pca_pooled", "sorted_grouping", "r3", "r4", "gptq_act_order",
                     "gptq_static_groups"):
            flag(name)
        if not isinstance(self.lm_head_bits, int) or isinstance(self.lm_head_bits, bool) or \
                self.lm_head_bits not in (4, 8, OFF):
            raise ValueError(f"lm_head_bits: expected 4, 8 or 16 (float32), got "
                             f"{self.lm_head_bits!r}")
        if isinstance(self.a_clip, bool) or not (isinstance(self.a_clip, (int, float))
                                                  and 0 < self.a_clip <= 1):
            raise ValueError(f"a_clip: expected a ratio in (0, 1], got {self.a_clip!r}")
        for name in ("calib_samples", "gptq_block_size", "osaq_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.calib_seqlen, int) or isinstance(self.calib_seqlen, bool) or \
                self.calib_seqlen < 2:  # one token predicts nothing
            raise ValueError(f"calib_seqlen: expected an integer >= 2, got {self.calib_seqlen!r}")
        for name in ("seed", "gptq_cd_sweeps", "pca_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
        if self.gptq_cd_sweeps and not self.w_quantizer.endswith("gptq"):
            raise ValueError(f"gptq_cd_sweeps: the sweeps follow GPTQ; w_quantizer is "
                             f"{self.w_quantizer!r}")
        positive("gptq_damp", allow_zero=True)
        positive("osaq_gamma")
        positive("osaq_tau_rel")
        positive("osaq_mu1", allow_zero=True)
        positive("osaq_mu2", allow_zero=True)
        if not (self.osaq_gamma < 1):
            raise ValueError(f"osaq_gamma: expected a fraction in (0, 1), got {self.osaq_gamma!r}")
        if not self.pca_pooled:
            raise ValueError(
                "pca_pooled: per-layer R1 is not supported: the residual stream has one basis, so "
                "a per-layer basis would need an online d x d rotation before every layer; "
                "use pca_pooled=True")
        if self.method == "fp" and (self.w_bits, self.a_bits, self.kv_bits,
                                    self.lm_head_bits) != (OFF, OFF, OFF, OFF):
            raise ValueError("method: 'fp' quantizes nothing; w_bits/a_bits/kv_bits/lm_head_bits "
                             "must be 16")

    # ------------------------------------------------------------------ derived settings
    @property
    def rotates(self) -> bool:
        """Whether R1..R4 are used at all (offq and quarot; the baselines run unrotated)."""
        return self.method in ("offq", "quarot")

    @property
    def centres_keys(self) -> bool:
        """Whether the K cache is quantized and stores keys minus each head's offset."""
        return self.kv_centre_keys and self.kv_bits != OFF

    def activation_group(self, d: int) -> int:
        """Activation group size for a linear input of dimension ``d``: ``a_group_size`` when it
        divides d, else the largest power of two (at most a_group_size) that does; d itself for
        per-token (-1)."""
        g = self.a_group_size
        if g == -1 or g >= d:
            return d
        if d % g == 0:
            return g
        shrunk = largest_pow2_divisor_at_most(d, g)
        logger.debug("activation group %d does not divide %d: using %d", g, d, shrunk)
        return shrunk

    def weight_group(self, k: int) -> int:
        """Weight group size over an input dimension ``k`` (k itself when per channel)."""
        return resolve_group(self.w_group_size, k, "w_group_size")

    def kv_group(self, head_dim: int) -> int:
        """KV group size over head_dim (head_dim itself for -1)."""
        return resolve_group(self.kv_group_size, head_dim, "kv_group_size")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the ``offq`` block of a checkpoint's config.json)."""
        out = dataclasses.asdict(self)
        out["config_version"] = CONFIG_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        """Inverse of :meth:`to_dict`; unknown keys or a newer version raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"offq config: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        if data.get("extra") == {}:  # an always-empty field of offq 0.1.0 checkpoints
            del data["extra"]
        version = data.pop("config_version", CONFIG_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"offq config: config_version must be a positive integer, got "
                             f"{version!r}")
        if version > CONFIG_VERSION:
            raise ValueError(f"offq config: config_version {version!r} is newer than this offq "
                             f"supports ({CONFIG_VERSION})")
        # checkpoints written before the key offset existed hold none (their keys are not centred)
        data.setdefault("kv_centre_keys", False)
        # ... and those written before pca_samples existed took statistics from every sequence
        data.setdefault("pca_samples", 0)
        # ... and those of 2026-12-03 06:32-08:07 UTC (6dfdbda to b2607d0) name a factor-only
        # precision (gptq_factor_dtype), the setting gptq_dtype replaced; their GPTQ updates ran
        # in float64, which is what their record reads as (as for every checkpoint written
        # before gptq_dtype existed, and before its default became "auto")
        data.pop("gptq_factor_dtype", None)
        data.setdefault("gptq_dtype", "float64")
        # ... and those written before calib_activations existed calibrated on float activations
        data.setdefault("calib_activations", "float")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"offq config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def describe(self, hidden_size: int | None = None) -> str:
        """One-line protocol string printed with every number (with ``hidden_size``, the
        activation group actually used on the residual stream is shown when it was shrunk)."""
        if self.method == "fp":
            return "fp (no quantization)"
        parts = [self.method, f"W{self.w_bits}A{self.a_bits}KV{self.kv_bits}"]
        if self.w_bits != OFF:
            g = "ch" if self.w_group_size == -1 else f"g{self.w_group_size}"
            cd = f"+cd{self.gptq_cd_sweeps}" if self.gptq_cd_sweeps else ""
            if self.w_quantizer.endswith("gptq") and self.gptq_dtype != "auto":
                cd += "(f32)" if self.gptq_dtype == "float32" else "(f64)"
            parts.append(f"w:{self.w_quantizer}{cd},{'sym' if self.w_symmetric else 'asym'},{g}"
                         f"{',mse' if self.w_clip_search else ''}")
        if self.a_bits != OFF:
            g = "tok" if self.a_group_size == -1 else f"g{self.a_group_size}"
            if hidden_size and self.a_group_size != -1:
                used = self.activation_group(hidden_size)
                g += f"(d{hidden_size}:g{used})" if used != self.a_group_size else ""
            parts.append(f"a:{'sym' if self.a_symmetric else 'asym'},{g},clip{self.a_clip:g}")
        if self.kv_bits != OFF:
            g = "hd" if self.kv_group_size == -1 else f"g{self.kv_group_size}"
            parts.append(f"kv:{'sym' if self.kv_symmetric else 'asym'},{g}"
                         f"{',centred' if self.kv_centre_keys else ''}")
        if self.method == "offq":
            seqs = f"({self.pca_samples}seq)" if self.pca != "none" and 0 < self.pca_samples < \
                self.calib_samples else ""
            parts.append(f"r1:{self.pca}{seqs}{',centred' if self.pca_centred else ''}"
                         f"{',sorted' if self.sorted_grouping else ',unsorted'},{self.outlier_index}")
        if self.rotates:
            parts.append(f"r2:{self.r2},r3:{int(self.r3)},r4:{int(self.r4)}")
        if self.lm_head_bits != OFF:
            parts.append(f"head:int{self.lm_head_bits}")
        from .recipe.pipeline import needs_calibration  # the recipe decides what it reads
        # named either way when activations are quantized at all: the default changed (float
        # until 2026-12-06), and a protocol line must not depend on which offq printed it
        act = f",act-{self.calib_activations}" if self.a_bits != OFF else ""
        parts.append(f"calib:{self.calib_samples}x{self.calib_seqlen},seed{self.seed}{act}"
                     if needs_calibration(self) else "calib:none")
        return " ".join(parts)
