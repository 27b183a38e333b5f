"""``offq.quantize``: the whole recipe, as one short readable function.

    fuse norms  ->  statistics pass (top-1 PCA, only when R1/R2 need it)  ->  R1, R2
                ->  for each layer: fuse + rotate its weights, capture its inputs (after the
                    already-quantized earlier layers), GPTQ / RTN (optionally OSAQ first),
                    write it, push the calibration batch through the quantized layer
                ->  assemble the offq checkpoint directory

Only one decoder layer's weights are resident at a time; the calibration hidden states
``[samples, seqlen, d]`` are (float32). Linear inputs are captured after the online transforms
(R3 on Q/K, R4 before down_proj), so GPTQ sees exactly what the runtime multiplies. During the
calibration passes activations and KV stay in float (weights-only quantized earlier layers, as
QuaRot calibrates GPTQ); the runtime then adds the activation and KV quantizers.

Method table (QuantConfig.method): ``offq`` R1 = U1 P H1 from the pooled top-1 second moment of
the attention and MLP inputs; ``quarot`` R1 = random-sign Hadamard (seeded); both use R2/R3/R4;
``gptq`` / ``rtn`` no rotation; ``fp`` nothing quantized (norms still fused).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import rotations as rot
from .checkpoint import (CONFIG_FILE, MODEL_FILE, PARTIAL_DIR, atomic_write_json, load_safetensors,
                         offq_block, save_safetensors)
from .config import OFF, QuantConfig
from .model.linear import DenseLinear, LINEAR_NAMES
from .model.llama import CAPTURE_SITES, Model, layer_tensor_names, load_decoder_layer
from .quantizers.gptq import HessianAccumulator, factor_hessian, gptq_quantize
from .quantizers.osaq import osaq_absorb
from .quantizers.rtn import rtn_quantize
from .runtime import build_layer, install_online, pack_codes

logger = logging.getLogger(__name__)



@dataclass
class QuantizeResult:
    """What :func:`quantize` produced: the stored tensors (in memory when no ``out_dir``) and
    the wall time of each stage in seconds."""

    model_config: Any
    quant_config: QuantConfig
    out_dir: Path | None
    tensors: dict[str, np.ndarray] | None
    timings: dict[str, float] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)

    def model(self, mode: str = "real"):
        """The runnable quantized model (``mode`` "real" or "fake")."""
        from .checkpoint import load_quantized
        from .runtime import build_model

        if self.tensors is not None:
            return build_model(self.model_config, self.quant_config, self.tensors, mode=mode)
        return load_quantized(self.out_dir, mode=mode)[0]


# ---------------------------------------------------------------------------------- the recipe
def quantize(ckpt: Any, config: QuantConfig, calibration: np.ndarray | None = None, *,
             out_dir: str | Path | None = None, resume: bool = False, batch_size: int = 4,
             progress: bool | None = None) -> QuantizeResult:
    """Quantize a checkpoint (``offq.formats.open_checkpoint`` result) with ``config``.

    Args:
        ckpt: has ``.config`` (ModelConfig), ``.tensors`` (HF names -> float32), ``.name`` and
            optionally ``.tokenizer`` (saved with the checkpoint).
        config: the QuantConfig.
        calibration: int token ids ``[samples, seqlen]`` (needed by GPTQ, OSAQ and PCA).
        out_dir: write the offq checkpoint there (layers as they finish); None keeps the result
            in memory (tests, quick experiments).
        resume: continue an interrupted run in ``out_dir`` (same config and calibration).
        batch_size: calibration sequences per layer forward.
        progress: tqdm bar (default: only on a TTY).
    """
    mc = ckpt.config.replace(tie_word_embeddings=False)
    store = _Store(out_dir, resume, _fingerprint(ckpt, config, calibration))
    calib = _check_calibration(calibration, config, mc.vocab_size)
    timings: dict[str, float] = {}
    reports: dict[str, Any] = {}
    show = sys.stderr.isatty() if progress is None else progress

    # 1. fused global tensors (final norm -> lm_head, embeddings untied)
    glob = {rot.EMBED: ckpt.tensors[rot.EMBED], rot.FINAL_NORM: ckpt.tensors[rot.FINAL_NORM]}
    glob[rot.LM_HEAD] = ckpt.tensors[rot.LM_HEAD if rot.LM_HEAD in ckpt.tensors else rot.EMBED]
    rot.fuse_final_norm(glob)

    # 2. rotations (statistics pass when the method needs one)
    t0 = time.perf_counter()
    r1, r2, rot_meta = store.load_rotations() if store.has_rotations() else (None, None, None)
    if rot_meta is None:
        r1, r2, rot_meta = compute_rotations(ckpt, mc, config, calib, batch_size, show)
        store.save_rotations(r1, r2, rot_meta)
    if r1 is not None:
        rot.rotate_embeddings(glob, r1)
        rot.rotate_head(glob, r1)
    timings["rotations"] = time.perf_counter() - t0

    # 3. layer by layer: fuse + rotate, capture, quantize, write, propagate
    weights_only = dataclasses.replace(config, a_bits=OFF, kv_bits=OFF)
    runner = _runner(mc, glob)
    h = runner.embed(calib).astype(np.float32) if needs_hessians(config) else None
    t_capture = t_quant = t_prop = 0.0
    for i in tqdm(range(mc.num_hidden_layers), desc="quantize layers", disable=not show):
        stored = store.load_layer(i)
        if stored is None:
            w = fused_layer(ckpt, mc, i, r1, None if r2 is None else r2[i], config)
            t = time.perf_counter()
            hessians = capture_hessians(runner, w, mc, weights_only, h, i, batch_size) \
                if h is not None else {}
            t_capture += time.perf_counter() - t
            t = time.perf_counter()
            stored, rep = quantize_layer(w, hessians, mc, config, i)
            reports.update(rep)
            t_quant += time.perf_counter() - t
            store.save_layer(i, stored)
        if h is not None and i + 1 < mc.num_hidden_layers:
            t = time.perf_counter()
            layer = build_layer(stored, mc, weights_only, i, "fake")
            for s in range(0, h.shape[0], batch_size):
                runner.layer_forward(layer, h[s:s + batch_size])
            t_prop += time.perf_counter() - t
        del stored
    timings.update(capture=t_capture, quantize=t_quant, propagate=t_prop)

    # 4. assemble
    t = time.perf_counter()
    tensors = store.finish(glob, mc, config, rot_meta, getattr(ckpt, "tokenizer", None))
    timings["write"] = time.perf_counter() - t
    logger.info("quantized %s (%s) in %s", getattr(ckpt, "name", "?"), config.describe(),
                ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return QuantizeResult(mc, config, None if out_dir is None else Path(out_dir), tensors,
                          timings, reports)


# ---------------------------------------------------------------------------------- stages
def needs_hessians(cfg: QuantConfig) -> bool:
    return cfg.w_bits != OFF and (cfg.weight_rounding == "gptq" or cfg.uses_osaq)


def needs_statistics(cfg: QuantConfig) -> bool:
    return (cfg.method == "offq" and cfg.pca != "none") or (cfg.rotates and cfg.r2 == "pca_hadamard")


def fused_layer(ckpt: Any, mc: Any, i: int, r1: np.ndarray | None, r2: np.ndarray | None,
                cfg: QuantConfig) -> dict[str, np.ndarray]:
    """Layer ``i``'s float32 tensors (HF names) with norms fused and R1/R2/R4 applied."""
    names = [n for n in ckpt.tensors.keys() if n.startswith(f"model.layers.{i}.")]
    w = {n: ckpt.tensors[n] for n in names}
    rot.fuse_layer_norms(w, i)
    if cfg.rotates:
        rot.rotate_layer(w, i, mc, r1=r1, r2=r2, r4=cfg.r4)
    return w


def compute_rotations(ckpt: Any, mc: Any, cfg: QuantConfig, calib: np.ndarray | None,
                      batch_size: int, show: bool):
    """R1 [d, d] (or None), R2 [layers, n_kv, hd, hd] (or None), and their description."""
    d, hd, n_kv = mc.hidden_size, mc.head_dim, mc.num_key_value_heads
    if not cfg.rotates:
        return None, None, {"r1": None, "r2": None}
    group = cfg.activation_group(d)
    cov = vcovs = None
    if needs_statistics(cfg):
        cov, vcovs = collect_statistics(ckpt, mc, cfg, calib, batch_size, show)
    if cfg.method == "quarot":
        r1 = rot.quarot_r1(d, cfg.seed)
        meta = {"r1": f"quarot random-sign Hadamard {d} (seed {cfg.seed})"}
    else:
        r1 = rot.offq_r1(cov, d, group, pca=cfg.pca, sorted_groups=cfg.sorted_grouping,
                         outlier_index=cfg.outlier_index)
        meta = {"r1": f"offq U1 P H1: pca {cfg.pca}{' centred' if cfg.pca_centred else ''}, "
                      f"{'sorted' if cfg.sorted_grouping else 'eigen-order'} grouping, outlier at "
                      f"{cfg.outlier_index} index, block Hadamard {group}"}
    if cfg.r2 == "none":
        r2 = None
    elif cfg.r2 == "hadamard":
        one = rot.r2_matrices(hd, n_kv)
        r2 = np.broadcast_to(one, (mc.num_hidden_layers,) + one.shape)
    else:
        r2 = np.stack([rot.r2_matrices(hd, n_kv, c) for c in vcovs])
    meta["r2"] = None if r2 is None else f"per head {cfg.r2} ({hd})"
    meta["r1_group"] = group
    return r1, r2, meta


def collect_statistics(ckpt: Any, mc: Any, cfg: QuantConfig, calib: np.ndarray,
                       batch_size: int, show: bool):
    """One float pass of the norm-fused model: the pooled second moment of the attention and MLP
    inputs (top-1 token per sequence and site, or all tokens) and, for R2 = PCA + Hadamard,
    per-layer per-kv-head second moments of the value vectors (top-1 token per sequence)."""
    d, hd, n_kv = mc.hidden_size, mc.head_dim, mc.num_key_value_heads
    stats = _SecondMoment(d, cfg.pca_centred)
    want_v = cfg.r2 == "pca_hadamard"
    vcovs = np.zeros((mc.num_hidden_layers, n_kv, hd, hd)) if want_v else None
    glob = {rot.EMBED: ckpt.tensors[rot.EMBED]}
    runner = _runner(mc, {**glob, rot.LM_HEAD: glob[rot.EMBED][:1],
                          rot.FINAL_NORM: np.ones(d, np.float32)})
    h = runner.embed(calib).astype(np.float32)
    top1 = cfg.pca == "top1"
    for i in tqdm(range(mc.num_hidden_layers), desc="statistics", disable=not show):
        w = fused_layer(ckpt, mc, i, None, None, dataclasses.replace(cfg, method="rtn"))
        layer = load_decoder_layer(w, mc, i)
        wv = w[layer_tensor_names(i)["v_proj"]].astype(np.float64)
        bv = w.get(layer_tensor_names(i)["v_proj"][: -len("weight")] + "bias")

        def capture(site: str, _i: int, x: np.ndarray) -> None:
            if site in ("attn_in", "mlp_in"):
                stats.add(x, top1=top1)
            if want_v and site == "attn_in":
                v = x.astype(np.float64) @ wv.T + (0 if bv is None else bv)
                v = v.reshape(x.shape[0], x.shape[1], n_kv, hd)
                for head in range(n_kv):
                    vcovs[i, head] += _top1_moment(v[:, :, head])

        for s in range(0, h.shape[0], batch_size):
            runner.layer_forward(layer, h[s:s + batch_size], capture=capture)
    return stats.matrix(), vcovs


def capture_hessians(runner: Model, w: dict[str, np.ndarray], mc: Any, weights_only: QuantConfig,
                     h: np.ndarray, i: int, batch_size: int) -> dict[str, HessianAccumulator]:
    """``2 X^T X / n`` of every capture site of layer ``i`` (float layer, online transforms on),
    on copies of the calibration hidden states ``h`` (which are left unchanged)."""
    layer = install_online(load_decoder_layer(w, mc, i), mc, weights_only, "fake")
    acc: dict[str, HessianAccumulator] = {}

    def capture(site: str, _i: int, x: np.ndarray) -> None:
        if site not in acc:
            acc[site] = HessianAccumulator(x.shape[-1])
        acc[site].update(x)

    for s in range(0, h.shape[0], batch_size):
        runner.layer_forward(layer, h[s:s + batch_size].copy(), capture=capture)
    return acc


def quantize_layer(w: dict[str, np.ndarray], hessians: dict[str, HessianAccumulator], mc: Any,
                   cfg: QuantConfig, i: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Stored tensors of layer ``i`` (codes packed) and per-linear reports (OSAQ)."""
    names = layer_tensor_names(i)
    out = {n: a for n, a in w.items() if not n.endswith("_proj.weight")}
    reports: dict[str, Any] = {}
    if cfg.w_bits == OFF:
        out.update({names[lin]: w[names[lin]] for lin in LINEAR_NAMES})
        return out, reports
    # GPTQ and RTN treat output rows independently, so the linears that read the same input
    # (q/k/v; gate/up) are quantized as one stacked matrix with one Hessian factorization.
    for site, lins in CAPTURE_SITES.items():
        hess = hessians[site].hessian if site in hessians else None
        weights = []
        for lin in lins:
            weight = w[names[lin]]
            if cfg.uses_osaq:
                weight, rep = osaq_absorb(weight, hess, gamma=cfg.osaq_gamma,
                                          tau_rel=cfg.osaq_tau_rel, mu1=cfg.osaq_mu1,
                                          mu2=cfg.osaq_mu2)
                reports[names[lin]] = dataclasses.asdict(rep)
            weights.append(weight)
        stacked = np.concatenate(weights, axis=0)
        k = stacked.shape[1]
        common = dict(bits=cfg.w_bits, group_size=cfg.weight_group(k), symmetric=cfg.w_symmetric,
                      clip_search=cfg.w_clip_search)
        if cfg.weight_rounding == "gptq":
            factor = factor_hessian(hess, damp=cfg.gptq_damp, act_order=cfg.gptq_act_order)
            q = gptq_quantize(stacked, factor=factor, block_size=cfg.gptq_block_size,
                              static_groups=cfg.gptq_static_groups, **common)
        else:
            q = rtn_quantize(stacked, **common)
        row = 0
        for lin, weight in zip(lins, weights):
            rows = slice(row, row + weight.shape[0])
            row += weight.shape[0]
            base = names[lin][: -len(".weight")]
            out[base + ".qweight"] = pack_codes(q.codes[rows], cfg.w_bits)
            out[base + ".scales"] = np.ascontiguousarray(q.scale[rows])
            out[base + ".zeros"] = np.ascontiguousarray(q.zero[rows])
    return out, reports


# ---------------------------------------------------------------------------------- helpers
def _runner(mc: Any, glob: dict[str, np.ndarray]) -> Model:
    """A Model used only for embed() / layer_forward() (layers are passed in explicitly)."""
    def no_loader(i: int):
        raise RuntimeError("pipeline runner: layers are passed explicitly")

    return Model(mc, embed_tokens=glob[rot.EMBED], final_norm=glob[rot.FINAL_NORM],
                 lm_head=DenseLinear(glob[rot.LM_HEAD]), layer_loader=no_loader, resident=False)


def _check_calibration(calib: np.ndarray | None, cfg: QuantConfig, vocab: int) -> np.ndarray | None:
    if not (needs_hessians(cfg) or needs_statistics(cfg)):
        return None
    if calib is None:
        raise ValueError("calibration: this configuration needs calibration token ids "
                         f"[samples, seqlen] ({cfg.describe()})")
    calib = np.asarray(calib)
    if calib.ndim != 2 or calib.shape[0] < 1 or calib.shape[1] < 2 or calib.dtype.kind not in "iu":
        raise ValueError(f"calibration: expected int token ids [samples, seqlen >= 2], got "
                         f"{calib.dtype} {list(calib.shape)}")
    if calib.min() < 0 or calib.max() >= vocab:
        raise ValueError(f"calibration: token ids outside [0, {vocab})")
    return calib.astype(np.int64)


def _top1_moment(x: np.ndarray) -> np.ndarray:
    """``sum t t^T`` over each sequence's largest-L-inf token of ``x[B, T, k]`` (float64)."""
    idx = np.abs(x).max(axis=-1).argmax(axis=1)
    t = x[np.arange(x.shape[0]), idx].astype(np.float64)
    return t.T @ t


class _SecondMoment:
    """Pooled second moment of captured inputs (top-1 token per sequence, or every token),
    uncentred or centred, accumulated in float64."""

    def __init__(self, d: int, centred: bool) -> None:
        self.acc = np.zeros((d, d), dtype=np.float64)
        self.sum = np.zeros(d, dtype=np.float64)
        self.n = 0
        self.centred = centred

    def add(self, x: np.ndarray, *, top1: bool) -> None:
        if not self.centred:  # the streaming covariance kernel (syrk; top-1 selection in C)
            from .kernels import cov_update

            x = np.ascontiguousarray(x, dtype=np.float32)
            cov_update(self.acc, x if top1 else x.reshape(-1, x.shape[-1]), top1=top1)
            self.n += x.shape[0] if top1 else x.size // x.shape[-1]
            return
        if top1:
            idx = np.abs(x).max(axis=-1).argmax(axis=1)
            rows = x[np.arange(x.shape[0]), idx]
        else:
            rows = x.reshape(-1, x.shape[-1])
        rows = rows.astype(np.float64)
        self.acc += rows.T @ rows
        self.sum += rows.sum(axis=0)
        self.n += rows.shape[0]

    def matrix(self) -> np.ndarray:
        if not self.centred or self.n == 0:
            return self.acc
        mean = self.sum / self.n
        return self.acc - self.n * np.outer(mean, mean)


def _fingerprint(ckpt: Any, cfg: QuantConfig, calib: np.ndarray | None) -> dict[str, Any]:
    h = hashlib.sha256()
    if calib is not None:
        c = np.ascontiguousarray(np.asarray(calib, dtype=np.int64))
        h.update(str(c.shape).encode())
        h.update(c.tobytes())
    return {"model": getattr(ckpt, "name", ""), "quant_config": cfg.to_dict(),
            "model_config": ckpt.config.to_hf() if hasattr(ckpt.config, "to_hf") else None,
            "calibration_sha256": h.hexdigest()}


class _Store:
    """Where finished pieces go: memory, or ``out_dir/.offq-partial`` then the final directory."""

    def __init__(self, out_dir: str | Path | None, resume: bool, fingerprint: dict[str, Any]):
        self.mem: dict[str, Any] = {}
        self.dir = None if out_dir is None else Path(out_dir)
        if self.dir is None:
            if resume:
                raise ValueError("resume: needs an output directory")
            return
        self.partial = self.dir / PARTIAL_DIR
        state = self.partial / "state.json"
        fp = json.loads(json.dumps(fingerprint))  # normalised as stored
        if resume and state.is_file():
            old = json.loads(state.read_text())
            if old != fp:
                diff = sorted(k for k in fp if old.get(k) != fp[k])
                raise ValueError(f"resume: {self.partial} was started with a different "
                                 f"{', '.join(diff)}; rerun without --resume to start over")
            logger.info("resuming from %s", self.partial)
        else:
            if self.partial.exists():
                logger.warning("discarding the unfinished run in %s", self.partial)
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
            atomic_write_json(state, fp)

    def has_rotations(self) -> bool:
        return (self.dir is None and "rot" in self.mem) or (
            self.dir is not None and (self.partial / "rotations.json").is_file())

    def save_rotations(self, r1, r2, meta) -> None:
        if self.dir is None:
            self.mem["rot"] = (r1, r2, meta)
            return
        arrays = {k: np.ascontiguousarray(v, dtype=np.float64)
                  for k, v in (("r1", r1), ("r2", r2)) if v is not None}
        save_safetensors(self.partial / "rotations.safetensors", arrays)
        atomic_write_json(self.partial / "rotations.json", meta)

    def load_rotations(self):
        if self.dir is None:
            return self.mem["rot"]
        meta = json.loads((self.partial / "rotations.json").read_text())
        arrays, _ = load_safetensors(self.partial / "rotations.safetensors")
        return (np.array(arrays["r1"]) if "r1" in arrays else None,
                np.array(arrays["r2"]) if "r2" in arrays else None, meta)

    def _layer_path(self, i: int) -> Path:
        return self.partial / f"layer_{i:04d}.safetensors"

    def save_layer(self, i: int, tensors: dict[str, np.ndarray]) -> None:
        if self.dir is None:
            self.mem[i] = tensors
        else:
            save_safetensors(self._layer_path(i), tensors)

    def load_layer(self, i: int) -> dict[str, np.ndarray] | None:
        if self.dir is None:
            return self.mem.get(i)
        path = self._layer_path(i)
        return load_safetensors(path)[0] if path.is_file() else None

    def finish(self, glob, mc, cfg, rot_meta, tokenizer) -> dict[str, np.ndarray] | None:
        tensors = dict(glob)
        for i in range(mc.num_hidden_layers):
            tensors.update(self.load_layer(i))
        if self.dir is None:
            return tensors
        save_safetensors(self.dir / MODEL_FILE, tensors, {"format": "offq"})
        hf = mc.to_hf()
        hf["offq"] = offq_block(cfg, mc, rot_meta)
        if tokenizer is not None:
            tokenizer.save(self.dir)
        atomic_write_json(self.dir / CONFIG_FILE, hf)
        shutil.rmtree(self.partial)
        return None
