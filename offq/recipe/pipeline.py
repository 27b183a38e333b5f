"""``offq.quantize``: the whole method as one short linear recipe (docs/METHODS.md).

    fuse norms       final norm -> lm_head (embeddings untied); each layer's norms -> its linears
    statistics       one float pass over the first pca_samples sequences collecting the top-1 PCA
                     second moment (only when R1/R2 need it)
    rotations        R1 (OffQ: U1 P H1; QuaRot: random-sign Hadamard), R2 per head, R3/R4 online
    per layer        fuse + rotate its weights -> site by site (calibrate.py): capture the site's
                     inputs (after the earlier layers and this layer's earlier sites are
                     quantized) -> quantize its linears (pre-steps such as OSAQ, then RTN or
                     GPTQ) -> on through the quantized site; write the layer (with its key
                     offset); the batch leaves it as the next layer's calibration input
    save             the offq checkpoint directory (config.json last)

The loop never knows which weight method runs: it asks :mod:`offq.quantizers.registry` for the
pre-steps and the rounding quantizer of the QuantConfig, and both follow one interface
(:mod:`offq.quantizers.base`). Only one decoder layer's weights are resident at a time, plus the
calibration hidden states ``[samples, seqlen, d]`` (float32). Linear inputs are captured after the
online transforms (R3 on Q/K, R4 before down_proj), so GPTQ sees what the runtime multiplies.
During calibration KV stays in float, and the activations are rounded by the run-time quantizer
(``calib_activations="quantized"``, the default: the products run on the real W4A4 kernels) or
kept float (``"float"``, as QuaRot calibrates GPTQ); the runtime adds the KV quantizer.

Method table (``QuantConfig.method``): ``offq`` R1 = U1 P H1 from the pooled top-1 second moment of
the attention and MLP inputs; ``quarot`` R1 = random-sign Hadamard (seeded); both use R2/R3/R4;
``gptq`` / ``rtn`` no rotation; ``fp`` nothing quantized (norms still fused).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import OFF, QuantConfig
from ..formats.files import DirectoryLock, check_output_dir, read_json_object
from ..formats.registry import TensorStore
from ..model.arch import architecture_of
from ..model.decoder import LayerRunner
from ..model.linear import DenseLinear
from ..process import freed_memory_held
from ..progress import track
from ..quant.assemble import layer_from_tensors
from ..quant.weight import QuantizedWeight
from ..quantizers.gptq import HessianAccumulator
from ..quantizers.registry import build_weight_quantizer
from . import rotations as rot
from .calibrate import calibrate_layer, propagation_setting
from .key_offset import key_offset_from_bias
from .statistics import collect_statistics, fused_layer
from .store import CheckpointStore, calibration_record, fingerprint, write_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["QuantizeResult", "quantize", "check_hadamard_sizes"]


@dataclass
class QuantizeResult:
    """What :func:`quantize` produced: the stored tensors (in memory when no ``out_dir``), the
    wall time of each stage in seconds, and per-linear reports (OSAQ)."""

    model_config: Any
    quant_config: QuantConfig
    out_dir: Path | None
    tensors: dict[str, np.ndarray] | None
    timings: dict[str, float] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)
    rotations: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    tokenizer: Any = None
    name: str = ""
    #: seconds the pre-steps (OSAQ) took, part of ``timings["quantize"]``
    pre_step_seconds: float = 0.0
    #: the file or directory the float model was read from (None: a model given in memory)
    source: Path | None = None

    def save(self, out_dir: str | Path) -> Path:
        """Write the in-memory result as an offq checkpoint directory (what ``out_dir=`` of
        :func:`quantize` writes); ``offq.load_quantized`` reads it back."""
        if self.tensors is None:
            raise ValueError(f"save: this result is already on disk in {self.out_dir}")
        if not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(f"out_dir: expected a directory path, got {type(out_dir).__name__}")
        # the refusals of quantize(out_dir=): never into the model being read, a file, a
        # directory of other files, or a finished checkpoint made with another config
        check_output_dir(out_dir, self.source, reusable=_reusable_output)
        with DirectoryLock(out_dir):  # not while a run (or another save) writes there
            check_output_dir(out_dir, self.source, reusable=_reusable_output)  # now, locked
            _check_replaced_checkpoint(Path(out_dir), self.quant_config, self.calibration)
            write_checkpoint(out_dir, self.tensors, self.model_config, self.quant_config,
                             self.rotations, self.tokenizer, calibration=self.calibration,
                             reports=self.reports)
        return Path(out_dir)

    def model(self, mode: str = "real", attention: str = "float"):
        """The runnable quantized model (``mode``: "real", "fake", "fused" or "auto";
        ``attention="int8"``: the fused decoder's 8-bit attention, see ``load_quantized``)."""
        from ..quant.assemble import build_model, load_quantized

        if self.tensors is None:
            return load_quantized(self.out_dir, mode=mode, attention=attention)[0]
        model = build_model(self.model_config, self.quant_config, self.tensors, mode=mode,
                            attention=attention, name=self.name)
        model.tokenizer = self.tokenizer  # generate(model) and perplexity(model, text) use it
        return model


# ---------------------------------------------------------------------------------- the recipe
def quantize(ckpt: Any, config: QuantConfig, calibration: np.ndarray | None = None, *,
             out_dir: str | Path | None = None, resume: bool = False, batch_size: int = 4,
             progress: bool | None = None, calibration_source: str | None = None,
             calibration_seed: int | None = None,
             hold_freed_memory: bool = True) -> QuantizeResult:
    """Quantize a checkpoint (``offq.formats.open_checkpoint`` result) with ``config``.

    Args:
        ckpt: has ``.config`` (ModelConfig), ``.tensors`` (HF names -> float32), ``.name`` and
            optionally ``.tokenizer`` (saved with the checkpoint).
        config: the QuantConfig.
        calibration: int token ids ``[samples, seqlen]`` (needed by GPTQ, OSAQ and PCA).
        out_dir: write the offq checkpoint there (layers as they finish); None keeps the result
            in memory (tests, quick experiments).
        resume: continue an interrupted run in ``out_dir`` (same model, config, calibration,
            batch size and offq version).
        batch_size: calibration sequences per layer forward.
        progress: True = progress bar, False = silent, None (default) = a bar on a terminal,
            a log line every few seconds per stage otherwise (``offq.progress``).
        calibration_source, calibration_seed: where the calibration tokens came from, recorded
            in config.json with their shape and hash.
        hold_freed_memory: glibc keeps freed memory for reuse from the rotations to the write
            (:func:`offq.process.freed_memory_held`: each batch's large temporaries are not
            page-faulted in again) and gives it back on return. False: glibc's usual behaviour
            throughout. The checkpoint is the same either way.
    """
    if not hasattr(ckpt, "config") or not hasattr(ckpt, "tensors"):
        raise TypeError(f"ckpt: expected an opened checkpoint (offq.load(...)), got "
                        f"{type(ckpt).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config: expected a QuantConfig, got {type(config).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    mc = ckpt.config.replace(tie_word_embeddings=False)
    arch = architecture_of(mc)
    calib = _check_calibration(calibration, config, mc.vocab_size)
    if calib is not None:  # record what was used, not the defaults
        if calib.shape[1] > mc.max_position_embeddings:
            raise ValueError(f"calibration: sequences of {calib.shape[1]} tokens exceed the "
                             f"model's context of {mc.max_position_embeddings}")
        config = dataclasses.replace(config, calib_samples=int(calib.shape[0]),
                                     calib_seqlen=int(calib.shape[1]))
    check_group_sizes(mc, config)
    check_hadamard_sizes(mc, config)
    if out_dir is not None:  # before the lock creates the directory
        check_output_dir(out_dir, _source_path(ckpt), reusable=_reusable_output)
    calib_record = calibration_record(calib, calibration_source, calibration_seed)
    # one writer at a time: what the directory holds is judged, and the run writes, under its lock
    lock = None if out_dir is None else DirectoryLock(out_dir)
    try:
        if out_dir is not None:
            check_output_dir(out_dir, _source_path(ckpt), reusable=_reusable_output)
            _check_replaced_checkpoint(Path(out_dir), config, calib_record)
        store = CheckpointStore(out_dir, resume, fingerprint(ckpt, config, calib_record, batch_size))
        return _run_recipe(ckpt, mc, arch, config, calib, calib_record, store, out_dir=out_dir,
                           batch_size=batch_size, progress=progress,
                           hold_freed_memory=hold_freed_memory)
    finally:
        if lock is not None:
            lock.release()  # finished or not


def _run_recipe(ckpt: Any, mc: Any, arch: Any, config: QuantConfig, calib: np.ndarray | None,
                calib_record: dict[str, Any] | None, store: CheckpointStore, *,
                out_dir: str | Path | None, batch_size: int, progress: bool | None,
                hold_freed_memory: bool) -> QuantizeResult:
    """:func:`quantize`'s stages on checked arguments: rotations, the layers, the write."""
    timings: dict[str, float] = {}
    reports: dict[str, Any] = {}
    show = progress
    pre_steps, quantizer = build_weight_quantizer(config)
    pre_clock = [0.0]  # seconds in the pre-steps, summed over sites

    # 1. the global tensors must be finite (checked now, not after an hour of layers); the
    # embeddings' calibration rows are kept, so that the vocabulary-sized matrix is read (and,
    # from GGUF, dequantized) here and at the final write only
    embedded = None
    for name in {arch.embed[0], arch.final_norm[0], _head_source(ckpt, arch)}:
        tensor = ckpt.tensors[name]
        if not np.all(np.isfinite(tensor)):
            raise ValueError(f"weight {name!r} contains NaN or Inf")
        if name == arch.embed[0] and calib is not None:
            embedded = np.asarray(tensor, dtype=np.float32)[calib]
        tensor = None

    # stages 2-4 hold freed memory in the heap (offq.process): their large temporaries come
    # back every batch and every layer, and a fresh page is dear where the host reclaims
    # freed ones; the scope's end gives the heap back
    with freed_memory_held() if hold_freed_memory else contextlib.nullcontext():
        # 2. rotations (statistics pass when the method needs one)
        t0 = time.perf_counter()
        r1, r2, rot_meta = (store.load_rotations(mc, config) if store.has_rotations()
                             else (None, None, None))
        if rot_meta is None:
            r1, r2, rot_meta = compute_rotations(ckpt, mc, config, calib, batch_size, show,
                                                 embedded=embedded)
            store.save_rotations(r1, r2, rot_meta)
        timings["rotations"] = time.perf_counter() - t0

        # 3. layer by layer: fuse + rotate, then site by site capture + quantize (calibrate.py),
        # which also carries the calibration batch through the quantized layer; write
        crossing, crossing_mode = propagation_setting(config)
        runner = LayerRunner(mc)
        hessians_needed = needs_hessians(config)
        propagate = calib is not None and (hessians_needed or config.centres_keys)
        # the calibration hidden states: the embeddings' rows, rotated on their own (in place:
        # ``embedded`` is this function's), not the whole matrix (151,936 rows against 32,768 for
        # Qwen2.5-1.5B at 16 x 2048)
        # (neither it nor the LM head stays resident during the layer loop)
        h = None
        if propagate:
            h = embedded if r1 is None else rot.rotate_rows(embedded, r1, in_place=True)
        embedded = None
        t_calib = t_quant = 0.0
        for i in track(range(mc.num_hidden_layers), "quantize layers", unit="layer", show=show):
            last = i + 1 == mc.num_hidden_layers
            stored = store.load_layer(i, mc, config)  # a resumed layer is checked first
            w = None
            t = time.perf_counter()
            if stored is None:
                w = fused_layer(ckpt, mc, i)
                if config.rotates:
                    rot.rotate_layer(w, i, mc, r1=r1, r2=None if r2 is None else r2[i], r4=config.r4)

                def quantize_site(site: str, hess: HessianAccumulator | None):
                    return quantize_site_linears(w, hess, mc, config, i, site, pre_steps, quantizer,
                                                 pre_clock)

                if h is not None:
                    done = calibrate_layer(runner, w, mc, config, h, i, batch_size, quantize_site,
                                           hessians=hessians_needed, propagate=not last)
                    linears, key_mean, t_site = done.linears, done.key_mean, done.quantize_seconds
                    reports.update(done.reports)
                else:  # no calibration data: every site from its weights alone
                    linears, rep = quantize_layer(w, {}, mc, config, i, pre_steps, quantizer,
                                                  pre_clock)
                    reports.update(rep)
                    key_mean, t_site = None, time.perf_counter() - t
                t_quant += t_site
                t_calib += time.perf_counter() - t - t_site
                stored = layer_tensors(w, linears, mc, i)
                if config.centres_keys:
                    stored[arch.key_offset(i)] = key_mean if key_mean is not None else \
                        key_offset_from_bias(w.get(arch.bias(i, "k_proj")), mc, config.calib_seqlen,
                                             config.rotates and config.r3)
                store.save_layer(i, stored)
            elif h is not None and not last:  # resumed: propagate through the stored layer
                layer = layer_from_tensors(stored, mc, crossing, i, crossing_mode)
                for s in range(0, h.shape[0], batch_size):
                    runner.forward(layer, h[s:s + batch_size])
                t_calib += time.perf_counter() - t
            # drop the layer's float weights and quantized linears (with their cached dequantized
            # weights) now: alive, they coexist with the next layer's and, after the last layer,
            # with the final write
            stored = w = linears = layer = done = None
        timings.update(calibrate=t_calib, quantize=t_quant)

        # 4. save: the fused, rotated global tensors (the LM head in 8 or 4 bits when asked:
        # after R1 and the final norm are fused into it)
        del h
        t = time.perf_counter()
        glob = global_tensors(ckpt, arch, r1)
        if config.lm_head_bits in (4, 8):
            from ..quant.lm_head import store_lm_head

            store_lm_head(glob, arch.lm_head[0], config.lm_head_bits)
        tensors = store.finish(glob, mc, config, rot_meta, getattr(ckpt, "tokenizer", None),
                               calibration=calib_record, reports=reports)
        timings["write"] = time.perf_counter() - t
    logger.info("quantized %s (%s) in %s%s", getattr(ckpt, "name", "?"),
                config.describe(mc.hidden_size),
                ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()),
                f" (pre-steps {pre_clock[0]:.1f}s of quantize)" if pre_steps else "")
    return QuantizeResult(mc, config, None if out_dir is None else Path(out_dir), tensors,
                          timings, reports, rotations=rot_meta, calibration=calib_record,
                          tokenizer=getattr(ckpt, "tokenizer", None),
                          name=str(getattr(ckpt, "name", "")), pre_step_seconds=pre_clock[0],
                          source=_source_path(ckpt))


# ---------------------------------------------------------------------------------- stages
def _head_source(ckpt: Any, arch: Any) -> str:
    """The tensor the LM head is read from (the embeddings when the model ties them)."""
    return arch.lm_head[0] if arch.lm_head[0] in ckpt.tensors else arch.embed[0]


def global_tensors(ckpt: Any, arch: Any, r1: np.ndarray | None, *,
                   head: bool = True) -> dict[str, np.ndarray]:
    """The embeddings, final norm and (with ``head``) LM head as stored: the final norm fused
    into the LM head (embeddings untied), R1 fused into both (float32 products). Each step
    works in place on an array this function owns, so no vocabulary-sized tensor is ever held
    twice (0.93 GB each on Qwen2.5-1.5B: the copies were the peak of quantization)."""
    glob = {arch.embed[0]: _owned_tensor(ckpt, arch.embed[0]),
            arch.final_norm[0]: _owned_tensor(ckpt, arch.final_norm[0])}
    if head:
        glob[arch.lm_head[0]] = _owned_tensor(ckpt, _head_source(ckpt, arch))
        rot.fuse_final_norm(glob, arch, in_place=True)
    if r1 is not None:
        rot.rotate_embeddings(glob, r1, arch, in_place=True)
        if head:
            rot.rotate_head(glob, r1, arch, in_place=True)
    return glob


def _owned_tensor(ckpt: Any, name: str) -> np.ndarray:
    """A float32 array of tensor ``name`` that nothing else references: what a
    :class:`~offq.formats.TensorStore` returns by contract (a fresh array per read, so a tied
    head and embedding are two arrays); any other mapping's value is copied."""
    if isinstance(ckpt.tensors, TensorStore):
        return ckpt.tensors[name]
    return np.array(ckpt.tensors[name], dtype=np.float32, order="C", copy=True)


def needs_statistics(cfg: QuantConfig) -> bool:
    return (cfg.method == "offq" and cfg.pca != "none") or (cfg.rotates and cfg.r2 == "pca_hadamard")


def needs_hessians(cfg: QuantConfig) -> bool:
    """Whether a weight step of ``cfg`` (GPTQ, OSAQ) needs its input sites' Hessians."""
    if cfg.w_bits == OFF:
        return False
    pre, quantizer = build_weight_quantizer(cfg)
    return quantizer.needs_hessian or any(p.needs_hessian for p in pre)


def needs_calibration(cfg: QuantConfig) -> bool:
    """Whether ``cfg`` needs calibration tokens (Hessians for a weight step, or statistics)."""
    return needs_statistics(cfg) or needs_hessians(cfg)


def check_group_sizes(mc: Any, cfg: QuantConfig) -> None:
    """Fail before any pass when the weight group does not divide a linear's input width (the
    hidden size, q_proj's output width feeding o_proj, the intermediate size) or the KV group
    does not divide head_dim; warn when an activation group that is no power of two does not
    divide a width (it shrinks to one there, which the config line shows)."""
    if cfg.w_bits < 16:  # each raises naming w_group_size / kv_group_size
        for k in (mc.hidden_size, mc.q_dim, mc.intermediate_size):
            cfg.weight_group(k)
    if cfg.kv_bits < 16:
        cfg.kv_group(mc.head_dim)
    g = cfg.a_group_size
    if cfg.a_bits < 16 and g > 0 and g & (g - 1):  # a power of two shrinks as documented
        for k in dict.fromkeys((mc.hidden_size, mc.q_dim, mc.intermediate_size)):
            used = cfg.activation_group(k)
            if used != g and used != k:  # e.g. 7 over 576: groups of 4, far slower products
                logger.warning("a_group_size %d does not divide the width %d: its activations "
                               "are quantized in groups of %d (the largest power of two that "
                               "does), not %d", g, k, used, g)


def check_hadamard_sizes(mc: Any, cfg: QuantConfig) -> None:
    """Fail before any pass when a Hadamard size this run needs has no construction (R1's block
    or QuaRot's full size, R2/R3 over head_dim, R4 over the intermediate size)."""
    if not cfg.rotates:
        return
    from ..kernels import fwht, is_supported

    # each size with what a user can change (the kernel's own advice, a block= argument, is
    # not a quantize option)
    need = {}
    if cfg.r2 != "none" or cfg.r3:
        need["R2/R3 (head_dim)"] = (mc.head_dim, "--r2 none --no-r3 leave the heads unrotated")
    if cfg.method == "quarot":
        need["R1 (hidden size)"] = (mc.hidden_size, "QuaRot-style rotates the whole hidden "
                                    "size; --method offq rotates blocks of --a-group-size")
    else:
        need["R1 block (activation group)"] = (cfg.activation_group(mc.hidden_size),
                                               "choose another --a-group-size")
    if cfg.r4:
        need["R4 (intermediate size)"] = (mc.intermediate_size, "--no-r4 turns R4 off")
    for what, (n, advice) in need.items():
        if not is_supported(n):
            try:  # the kernel's own message, without its advice
                fwht(np.zeros((1, n), np.float32))
            except ValueError as e:
                msg = str(e).removeprefix("x: ").split("; use block=")[0]
                raise ValueError(f"{what}: {msg}; {advice}") from None


def compute_rotations(ckpt: Any, mc: Any, cfg: QuantConfig, calib: np.ndarray | None,
                      batch_size: int, show: bool | None, *,
                      embedded: np.ndarray | None = None):
    """R1 [d, d] (or None), R2 [layers, n_kv, hd, hd] (or None), and their description.
    ``embedded``: the embeddings' rows of ``calib`` when the caller has them (not modified)."""
    d, hd, n_kv = mc.hidden_size, mc.head_dim, mc.num_key_value_heads
    if not cfg.rotates:
        return None, None, {"r1": None, "r2": None}
    group = cfg.activation_group(d)
    cov = vcovs = None
    if needs_statistics(cfg):  # from the first pca_samples sequences (docs/METHODS.md)
        n = calib.shape[0] if cfg.pca_samples == 0 else cfg.pca_samples
        cov, vcovs = collect_statistics(ckpt, mc, cfg, calib[:n], batch_size, show,
                                        embedded=None if embedded is None else embedded[:n])
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


def quantize_layer(w: dict[str, np.ndarray], hessians: dict[str, HessianAccumulator], mc: Any,
                   cfg: QuantConfig, i: int, pre_steps: list, quantizer: Any,
                   pre_clock: list[float] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Layer ``i``'s linears by short name and the pre-steps' reports, every site at once
    (``hessians``: site -> finished accumulator, where the methods need one)."""
    out: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    for site in architecture_of(mc).sites:
        lin, rep = quantize_site_linears(w, hessians.get(site), mc, cfg, i, site, pre_steps,
                                         quantizer, pre_clock)
        out.update(lin)
        reports.update(rep)
    return out, reports


def quantize_site_linears(w: dict[str, np.ndarray], source: HessianAccumulator | None, mc: Any,
                          cfg: QuantConfig, i: int, site: str, pre_steps: list, quantizer: Any,
                          pre_clock: list[float] | None = None
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The linears of layer ``i`` reading ``site`` (``QuantizedWeight``, or float
    ``DenseLinear`` when weights stay in float) and the pre-steps' per-linear reports.

    Every quantizer treats output rows independently, so the linears that read one input
    (q/k/v; gate/up) are quantized as one stacked matrix with one per-site preparation. The
    Hessian is taken from its finished accumulator ``source`` and dropped once every step is
    prepared: what a method still needs, its prepared state holds (GPTQ's factor; the Hessian
    itself only with CD sweeps), so at K = 8960 the 640 MB Hessian is gone while GPTQ runs.
    ``pre_clock[0]``, when given, gains the seconds the pre-steps took."""
    arch = architecture_of(mc)
    lins = arch.sites[site]
    bias = {n: w.get(arch.bias(i, n)) for n in lins}
    reports: dict[str, Any] = {}
    if cfg.w_bits == OFF:
        return {n: DenseLinear(w[arch.weight(i, n)], bias[n]) for n in lins}, reports
    where = f"layer {i} {site}"
    hess = None if source is None else source.take()
    t0 = time.perf_counter()
    for step in pre_steps:
        step_state = step.prepare(hess, where)
        for lin in lins:
            name = arch.weight(i, lin)
            w[name], reports[name] = step.apply(w[name], step_state)
            logger.info("%s %s: %s", type(step).__name__, name, reports[name])
        step_state = None
    if pre_clock is not None and pre_steps:  # no pre-steps: nothing to time (GPTQ alone read 0.0 s)
        pre_clock[0] += time.perf_counter() - t0
    state = quantizer.prepare(hess, where)
    hess = None
    weights = [w[arch.weight(i, lin)] for lin in lins]
    q: QuantizedWeight = quantizer.quantize(np.concatenate(weights, axis=0), state)
    out: dict[str, Any] = {}
    row = 0
    for lin, weight in zip(lins, weights):
        out[lin] = q.rows(row, row + weight.shape[0]).with_bias(bias[lin])
        row += weight.shape[0]
    return out, reports


def layer_tensors(w: dict[str, np.ndarray], linears: dict[str, Any], mc: Any,
                  i: int) -> dict[str, np.ndarray]:
    """The stored tensors of layer ``i``: norms and biases as they are, each quantized linear as
    packed codes, scales and zero-points, float linears as their weight."""
    arch = architecture_of(mc)
    out = {arch.norm(i, k): w[arch.norm(i, k)] for k in arch.norms}
    for lin, value in linears.items():
        name = arch.weight(i, lin)
        if arch.bias(i, lin) in w:
            out[arch.bias(i, lin)] = w[arch.bias(i, lin)]
        if isinstance(value, QuantizedWeight):
            codes, scales, zeros = arch.quantized_names(name)
            out[codes] = value.packed_codes()
            out[scales] = np.ascontiguousarray(value.scale)
            out[zeros] = np.ascontiguousarray(value.zero)
        else:
            out[name] = w[name]
    return out


# ---------------------------------------------------------------------------------- helpers
def _source_path(ckpt: Any) -> Path | None:
    """The file or directory a checkpoint was read from (None when it was given in memory)."""
    if getattr(ckpt, "source_format", "") == "memory":  # its path is a label, "<name>"
        return None
    path = getattr(ckpt, "path", None)
    return Path(path) if isinstance(path, (str, os.PathLike)) else None


def _reusable_output(directory: Path) -> bool:
    """An existing directory quantize may write into: an offq checkpoint or an unfinished run."""
    from ..formats.checkpoint import PARTIAL_DIR, is_offq_checkpoint

    return is_offq_checkpoint(directory) or (directory / PARTIAL_DIR).is_dir()


def _check_replaced_checkpoint(directory: Path, config: QuantConfig,
                               calib_record: dict[str, Any] | None) -> None:
    """Refuse to overwrite a finished offq checkpoint that another command wrote: one whose stored
    quantization config or calibration differs from this run's (rerunning the same command
    rewrites it; an unfinished run is handled by the checkpoint store)."""
    from ..formats.checkpoint import CONFIG_FILE, PARTIAL_DIR, is_offq_checkpoint

    if (directory / PARTIAL_DIR).is_dir() or not is_offq_checkpoint(directory):
        return
    stored = read_json_object(directory / CONFIG_FILE)["offq"]
    if not isinstance(stored, dict):  # a corrupt block: unreadable, so never silently replaced
        stored = {}
    try:
        old_cfg = QuantConfig.from_dict(stored.get("quant_config"))
    except (TypeError, ValueError):
        old_cfg = None
    # both sides as JSON stores them (tuples become lists)
    old = json.loads(json.dumps({"quant_config": None if old_cfg is None else old_cfg.to_dict(),
                                 "calibration": stored.get("calibration")}))
    new = json.loads(json.dumps({"quant_config": config.to_dict(), "calibration": calib_record}))
    if old == new:  # the same command again: allowed, but never silently
        logger.warning("%s: replacing the finished offq checkpoint there (made with the same "
                       "quantization config and calibration)", directory)
        return
    if old_cfg is None:
        diff = ["quant_config (unreadable)"]
    else:
        diff = sorted(k for k in new["quant_config"]
                      if new["quant_config"][k] != old["quant_config"].get(k))
        if old["calibration"] != new["calibration"]:
            diff.append("calibration")
    raise ValueError(f"out_dir: {directory} holds a finished offq checkpoint made with a "
                     f"different {', '.join(diff)}; write to a new directory, or delete that "
                     "one first to replace it")


def _check_calibration(calib: np.ndarray | None, cfg: QuantConfig, vocab: int) -> np.ndarray | None:
    if not needs_calibration(cfg):
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
