"""Robustness fixes, each pinned by a test that fails when the fix is undone:

1. GPTQ damping retries (rank-deficient Hessians with ``gptq_damp = 0``; a warning names the layer
   and site) and a clear error for a Hessian that stays singular;
2. NaN/Inf in weights, in calibration activations, in run-time activations and in a stored
   checkpoint (and unknown tensors) raise errors that name the tensor / layer / site;
3. the checkpoint directory is written model first, config.json last, stale files removed and the
   directory fsync'd;
4. ``--resume`` refuses a changed source model, batch size or offq version, and a stored layer
   or rotations file that is not what the run stores (checked like a checkpoint), and resumes
   otherwise;
5. Hadamard sizes are checked before any pass;
6. the activation clip shrinks the range about its midpoint, and the C kernel agrees with the grid;
7. tensor names live in offq/model/arch.py only, and its GGUF <-> HF maps round-trip;
8. untrusted files: a pipe given as a model (or beside one) is refused without blocking, a
   spoiled resume state or deeply nested calibration JSON is a ValueError naming the file, and
   an offq checkpoint's config errors name its config.json.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import tokenize
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import offq
from offq.config import QuantConfig
from offq.formats.checkpoint import load_safetensors, save_safetensors
from offq.formats.files import MAX_JSON_BYTES
from offq.quant.assemble import load_quantized
from offq.quant.grid import dequantize_codes, grid_params, quantize_codes
from offq.quantizers.gptq import (GPTQ, MAX_DAMP_RETRIES, factor_hessian, gptq_quantize,
                                  layer_output_error)
from offq.quantizers.rtn import rtn_quantize
from offq.recipe import pipeline
from offq.recipe.store import CheckpointStore
from tiny_models import calibration, tiny_checkpoint, with_source_id

OFFQ_SRC = Path(offq.__file__).resolve().parent
GPTQ_LOGGER = "offq.quantizers.gptq"


# ============================================================================ 1. GPTQ damping
def _rank_deficient_inputs(seed=0, n=256, k=64):
    """Inputs ``[n, k]`` whose columns repeat (3 == 10 == 20, 0..8 == 40..48): H is singular."""
    x = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    x[:, 10] = x[:, 3]
    x[:, 20] = x[:, 3]
    x[:, 40:48] = x[:, 0:8]
    return x


def _hessian(x):
    x = np.asarray(x, np.float64)
    return 2.0 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("inputs", ["duplicated columns", "fewer tokens than inputs"])
def test_gptq_damp_zero_retries_on_a_rank_deficient_hessian(inputs, caplog):
    x = (_rank_deficient_inputs() if inputs == "duplicated columns" else
         np.random.default_rng(1).standard_normal((20, 64)).astype(np.float32))
    h = _hessian(x)
    assert np.linalg.matrix_rank(h) < 64
    with caplog.at_level(logging.WARNING, logger=GPTQ_LOGGER):
        f = factor_hessian(h, damp=0.0, where="layer 7 mlp_in")
    assert np.all(np.isfinite(f.s)) and np.array_equal(f.s, np.triu(f.s)) and np.all(f.d > 0)
    warnings = [r.getMessage() for r in caplog.records if r.name == GPTQ_LOGGER]
    assert len(warnings) == 1 and "layer 7 mlp_in" in warnings[0], warnings
    assert "damping 0" in warnings[0]

    # gptq_quantize directly: damp 0 works, close to the default damping and better than RTN
    w = (np.random.default_rng(2).standard_normal((32, 64)) * 0.1).astype(np.float32)
    e0 = layer_output_error(x, w, gptq_quantize(w, h, damp=0.0).dequantized)
    e1 = layer_output_error(x, w, gptq_quantize(w, h, damp=0.01).dequantized)
    e_rtn = layer_output_error(x, w, rtn_quantize(w).dequantized)
    assert np.isfinite(e0) and e0 < 1.5 * e1 and e0 < e_rtn, (e0, e1, e_rtn)


def test_gptq_hessian_that_stays_singular_names_the_site():
    """Damping cannot repair an indefinite 'Hessian' (a corrupted accumulation): after
    MAX_DAMP_RETRIES retries the error names the site."""
    k = 16
    v = np.ones(k) / np.sqrt(k)
    h = np.eye(k) - 3.0 * np.outer(v, v)  # eigenvalue -2, mean diag ~0.8
    with pytest.raises(ValueError, match=r"GPTQ layer 3 mlp_in: the Hessian stays singular"):
        factor_hessian(h, damp=0.0, where="layer 3 mlp_in")
    with pytest.raises(ValueError, match=r"layer 5 o_in.*singular"):
        GPTQ(damp=0.0).prepare(h, "layer 5 o_in")
    assert MAX_DAMP_RETRIES >= 1


def test_pipeline_gptq_damp_zero_with_fewer_tokens_than_hidden_size(caplog):
    ckpt = tiny_checkpoint(0)  # d = 64
    calib = calibration(ckpt, 1, 20)  # 20 tokens < 64 inputs: every Hessian is rank-deficient
    with caplog.at_level(logging.WARNING, logger=GPTQ_LOGGER):
        res = pipeline.quantize(ckpt, QuantConfig(method="gptq", gptq_damp=0.0), calib)
    msgs = [r.getMessage() for r in caplog.records if r.name == GPTQ_LOGGER]
    assert any("layer 0 attn_in" in m for m in msgs), msgs
    assert any("layer 1 down_in" in m for m in msgs), msgs
    assert all(re.search(r"layer \d (attn_in|o_in|mlp_in|down_in)", m) for m in msgs), msgs
    nll = res.model("fake").nll(calibration(ckpt, 1, 16, seed=3))
    assert np.all(np.isfinite(nll))


# ============================================================================ 2. NaN / Inf
@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.up_proj.weight",
                                    "model.layers.1.input_layernorm.weight"])
def test_nan_weight_names_the_tensor_and_layer(method, tensor):
    ckpt = tiny_checkpoint(0)
    ckpt.tensors[tensor][3] = np.nan
    calib = calibration(ckpt, 2, 16) if method == "gptq" else None
    with pytest.raises(ValueError, match=rf"layer 1: weight '{re.escape(tensor)}' contains NaN"):
        pipeline.quantize(ckpt, QuantConfig(method=method), calib)


def test_inf_embedding_row_is_named():
    """An Inf embedding row of a calibration token is caught as a weight error before any pass."""
    ckpt = tiny_checkpoint(0)
    calib = calibration(ckpt, 2, 16)
    ckpt.tensors["model.embed_tokens.weight"][int(calib[0, 3])] = np.inf
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' contains NaN or Inf"):
        pipeline.quantize(ckpt, QuantConfig(method="gptq"), calib)


@pytest.mark.parametrize("calib", ["quantized", "float"])
@pytest.mark.parametrize("w_quantizer", ["gptq", "osaq+rtn"])
def test_nonfinite_calibration_activations_name_layer_and_site(w_quantizer, calib):
    """Finite but huge layer-0 gate/up weights overflow silu(gate) * up to Inf: the down_proj
    input of layer 0 is named, whichever quantizer consumes the Hessian, and whether the batch
    crosses on the real kernels (whose input quantizer meets the Inf first) or in float."""
    ckpt = tiny_checkpoint(0)
    for lin in ("gate_proj", "up_proj"):
        ckpt.tensors[f"model.layers.0.mlp.{lin}.weight"] *= np.float32(1e30)
    cfg = QuantConfig(method="gptq", w_quantizer=w_quantizer, calib_activations=calib)
    with np.errstate(all="ignore"), pytest.raises(
            ValueError, match=r"layer 0 site down_in: the calibration activations contain NaN or Inf"):
        pipeline.quantize(ckpt, cfg, calibration(ckpt, 2, 16))


def test_all_zero_calibration_activations_name_layer_and_site():
    """A huge (finite) layer-0 up_proj makes layer 1's RMSNorm square overflow, so its inputs are
    exactly zero: every input looks dead and GPTQ would zero the whole weight without a word.
    The run stops instead, naming layer 1's first site."""
    ckpt = tiny_checkpoint(0)
    ckpt.tensors["model.layers.0.mlp.up_proj.weight"] *= np.float32(1e20)
    with np.errstate(all="ignore"), pytest.raises(
            ValueError, match=r"layer 1 site attn_in: every calibration activation is zero"):
        pipeline.quantize(ckpt, QuantConfig(method="gptq"), calibration(ckpt, 2, 16))


@pytest.fixture(scope="module")
def rtn_checkpoint(tmp_path_factory):
    """A tiny RTN offq checkpoint directory and a copy of its tensors."""
    out = tmp_path_factory.mktemp("rtn") / "q"
    ckpt = tiny_checkpoint(2)
    pipeline.quantize(ckpt, QuantConfig(method="rtn"), None, out_dir=out)
    tensors, meta = load_safetensors(out / "model.safetensors")
    return out, {k: np.array(v) for k, v in tensors.items()}, dict(meta)


def _with_tensors(src, dst, tensors, meta):
    shutil.copytree(src, dst)
    save_safetensors(dst / "model.safetensors", tensors, meta)
    return dst


@pytest.mark.parametrize("name,value", [("model.layers.1.self_attn.k_proj.scales", np.nan),
                                        ("model.layers.0.mlp.down_proj.zeros", np.inf),
                                        ("model.layers.0.mlp.gate_proj.scales", -np.inf)])
def test_load_quantized_rejects_nonfinite_scale_or_zero(rtn_checkpoint, tmp_path, name, value):
    out, tensors, meta = rtn_checkpoint
    load_quantized(out)  # the original loads
    bad = dict(tensors)
    bad[name] = bad[name].copy()
    bad[name][1, 0] = value
    d = _with_tensors(out, tmp_path / "bad", bad, meta)
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(name)}' contains NaN or Inf"):
        load_quantized(d)


def test_load_quantized_rejects_an_unknown_tensor(rtn_checkpoint, tmp_path):
    out, tensors, meta = rtn_checkpoint
    extra = dict(tensors, **{"model.layers.0.self_attn.q_proj.extra": np.zeros(3, np.float32)})
    d = _with_tensors(out, tmp_path / "extra", extra, meta)
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) 'model.layers.0.self_attn.q_proj.extra'"):
        load_quantized(d)


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_activations_that_overflow_at_run_time_name_the_layer(rtn_checkpoint, tmp_path, mode):
    """A quantized checkpoint whose layer-1 gate/up scales are finite but huge: silu(gate) * up
    overflows to Inf, and the activation quantizer's refusal names layer 1 instead of only its
    argument "x"."""
    out, tensors, meta = rtn_checkpoint
    bad = dict(tensors)
    for lin in ("gate_proj", "up_proj"):
        name = f"model.layers.1.mlp.{lin}.scales"
        bad[name] = bad[name] * np.float32(1e30)
    d = _with_tensors(out, tmp_path / "huge", bad, meta)
    ids = list(range(3, 40))
    offq.perplexity(out, ids, seqlen=16, max_windows=1, mode=mode, quiet=True)  # the original runs
    with np.errstate(all="ignore"), pytest.raises(
            ValueError, match=r"layer 1: its activations became NaN or Inf .* x: contains NaN"):
        offq.perplexity(d, ids, seqlen=16, max_windows=1, mode=mode, quiet=True)


# ============================================================================ 3. writing the directory
class _Tok:
    """A stand-in tokenizer: ``save`` writes the two HF tokenizer files."""

    def save(self, directory):
        for n in ("tokenizer.json", "tokenizer_config.json"):
            (Path(directory) / n).write_text("{}")


def _record_file_events(monkeypatch, out: Path):
    """Record, in order, renames into ``out`` (with whether config.json existed at that moment),
    fsyncs of directories, and rmtree calls."""
    events = []
    real_replace, real_fsync, real_rmtree = os.replace, os.fsync, shutil.rmtree

    def replace(src, dst, *a, **k):
        dst = Path(dst)
        if dst.parent == out:
            events.append(("replace", dst.name, (out / "config.json").exists()))
        return real_replace(src, dst, *a, **k)

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("fsync_dir", Path(os.readlink(f"/proc/self/fd/{fd}")), None))
        return real_fsync(fd)

    def rmtree(path, *a, **k):
        events.append(("rmtree", Path(path), None))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_rerun_into_a_used_directory_writes_model_then_config_and_fsyncs(tmp_path, monkeypatch):
    out = tmp_path / "q"
    first = tiny_checkpoint(0)
    first.tokenizer = _Tok()
    pipeline.quantize(first, QuantConfig(method="rtn", w_group_size=32), None, out_dir=out)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"}
    (out / ".model.safetensors.tmp-123").write_bytes(b"half a file")
    (out / ".model.safetensors.data-456").write_bytes(b"spill")

    events = _record_file_events(monkeypatch, out.resolve())
    # the same command on the source without its tokenizer (another configuration is refused:
    # test_pipeline.py)
    pipeline.quantize(tiny_checkpoint(0), QuantConfig(method="rtn", w_group_size=32), None,
                      out_dir=out)
    monkeypatch.undo()

    # only the new run's files (no stale tokenizer), and its config
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    block = json.loads((out / "config.json").read_text())["offq"]
    assert block["quant_config"]["w_group_size"] == 32
    load_quantized(out)

    # model.safetensors (with no config.json present any more), then config.json, last
    into_out = [(name, had_config) for kind, name, had_config in events if kind == "replace"]
    assert [n for n, _ in into_out] == ["model.safetensors", "config.json"], into_out
    assert into_out[0][1] is False, "the old config.json was still there when the model was written"
    # every rename into the directory and the removal of the partial run are followed by an
    # fsync of the directory before anything else happens to it
    resolved = out.resolve()
    for j, (kind, what, _) in enumerate(events):
        if kind == "replace" or (kind == "rmtree" and what.parent.resolve() == resolved):
            later = events[j + 1:]
            nxt = next((e for e in later if e[0] != "fsync_dir" or e[1] == resolved), None)
            assert nxt is not None and nxt[0] == "fsync_dir", (kind, what, later[:3])
    assert events[-1][:2] == ("fsync_dir", resolved), events[-3:]


# ============================================================================ 4. resume fingerprint
def _partial_run(ckpt, cfg, calib, out, monkeypatch, batch_size=2):
    """quantize into ``out`` and crash right after layer 0 is stored."""
    real_save = CheckpointStore.save_layer

    def save_then_crash(self, i, tensors):
        real_save(self, i, tensors)
        if i == 0:
            raise KeyboardInterrupt("simulated crash after layer 0")

    with monkeypatch.context() as m:
        m.setattr(CheckpointStore, "save_layer", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            pipeline.quantize(ckpt, cfg, calib, out_dir=out, batch_size=batch_size)
    partial = out / ".offq-partial"
    assert (partial / "layer_0000.safetensors").is_file()
    assert not (partial / "layer_0001.safetensors").exists()


RESUME_CFG = QuantConfig(method="gptq")


@pytest.mark.parametrize("change", ["source weights", "batch size", "offq version"])
def test_resume_refuses_a_changed_run(change, tmp_path, monkeypatch):
    ckpt = with_source_id(tiny_checkpoint(5, layers=3))
    calib = calibration(ckpt, 4, 16)
    out = tmp_path / "q"
    _partial_run(ckpt, RESUME_CFG, calib, out, monkeypatch)
    batch_size, key = 2, None
    if change == "source weights":  # same names, shapes and dtypes; one value differs
        ckpt = with_source_id(tiny_checkpoint(5, layers=3))
        ckpt.tensors["model.layers.2.mlp.down_proj.weight"][0, 0] += 0.5
        key = "source_sha256"
    elif change == "batch size":
        batch_size, key = 4, "batch_size"
    else:
        monkeypatch.setattr(offq, "__version__", offq.__version__ + ".post1")
        key = "offq_version"
    with pytest.raises(ValueError, match=rf"resume: .* different {key}; rerun without --resume"):
        pipeline.quantize(ckpt, RESUME_CFG, calib, out_dir=out, resume=True,
                          batch_size=batch_size)
    # the unfinished run is left as it was
    assert (out / ".offq-partial" / "layer_0000.safetensors").is_file()
    assert not (out / "config.json").exists()


def test_resume_continues_an_unchanged_run(tmp_path, monkeypatch):
    ckpt = with_source_id(tiny_checkpoint(5, layers=3))
    calib = calibration(ckpt, 4, 16)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    pipeline.quantize(ckpt, RESUME_CFG, calib, out_dir=whole, batch_size=2)
    _partial_run(ckpt, RESUME_CFG, calib, cut, monkeypatch)

    ckpt = with_source_id(tiny_checkpoint(5, layers=3))  # a fresh object, same model
    quantized = []
    real_fused = pipeline.fused_layer

    def fused(c, mc, i):
        quantized.append(i)
        return real_fused(c, mc, i)

    monkeypatch.setattr(pipeline, "fused_layer", fused)
    pipeline.quantize(ckpt, RESUME_CFG, calib, out_dir=cut, resume=True, batch_size=2)
    assert quantized == [1, 2]  # layer 0 came back from the partial run
    for name in ("model.safetensors", "config.json"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name
    assert not (cut / ".offq-partial").exists()


def _spoil_layer(path: Path, change: str) -> str:
    """Rewrite a stored layer file with one tensor spoiled; returns the expected message."""
    tensors, meta = load_safetensors(path)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    name = "model.layers.0.mlp.down_proj." + ("zeros" if change == "missing" else
                                              "qweight" if change == "shape" else "scales")
    if change == "nan norm":  # checked beyond the checkpoint's scales: a fresh run refuses it
        name = "model.layers.0.post_attention_layernorm.weight"
        tensors[name][2] = np.nan
        message = f"tensor '{name}' contains NaN or Inf"
    elif change == "truncated":
        save_safetensors(path, tensors, meta)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 8)
        return "tensor .* lies outside the data region"
    elif change == "nan":
        tensors[name][1, 0] = np.nan
        message = f"tensor '{name}' contains NaN or Inf"
    elif change == "shape":
        tensors[name] = np.ascontiguousarray(tensors[name][:, :-1])
        message = rf"tensor '{name}' is uint8 \[64, 63\], expected U8 \[64, 64\]"
    else:
        del tensors[name]
        message = f"missing tensor '{name}'"
    save_safetensors(path, tensors, meta)
    return message


@pytest.mark.parametrize("change,layers", [("nan", 3), ("shape", 3), ("missing", 3),
                                           ("nan", 1), ("nan norm", 1), ("truncated", 3)])
def test_resume_refuses_a_spoiled_stored_layer(change, layers, tmp_path, monkeypatch):
    """A stored layer is checked like a checkpoint's before --resume uses it: unchecked, a NaN
    scale was blamed on 'the calibration activations', a short qweight on the kernel argument
    'packed', a missing tensor was a KeyError, and in the last layer (which no calibration
    batch crosses) a NaN scale went into a checkpoint written with success."""
    ckpt = with_source_id(tiny_checkpoint(5, layers=layers))
    calib = calibration(ckpt, 4, 16)
    out = tmp_path / "cut"
    _partial_run(ckpt, RESUME_CFG, calib, out, monkeypatch)
    layer = out / ".offq-partial" / "layer_0000.safetensors"
    message = _spoil_layer(layer, change)
    with pytest.raises(ValueError, match=rf"^resume: .*layer_0000.safetensors: {message}.*"
                                         "rerun without --resume"):
        pipeline.quantize(ckpt, RESUME_CFG, calib, out_dir=out, resume=True, batch_size=2)
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("change", ["r1 missing", "r1 short", "r2 nan"])
def test_resume_refuses_spoiled_rotations(change, tmp_path, monkeypatch):
    """Without the check, a rotations file that lost R1 resumed silently: the remaining layers
    and the embeddings were quantized unrotated beside a rotated layer 0 (a broken model,
    written with success and loading fine)."""
    cfg = QuantConfig(method="offq")
    ckpt = with_source_id(tiny_checkpoint(5, layers=3))
    calib = calibration(ckpt, 4, 16)
    out = tmp_path / "cut"
    _partial_run(ckpt, cfg, calib, out, monkeypatch)
    path = out / ".offq-partial" / "rotations.safetensors"
    arrays = {k: np.array(v) for k, v in load_safetensors(path)[0].items()}
    assert set(arrays) == {"r1", "r2"}
    if change == "r1 missing":
        del arrays["r1"]
        message = r" holds \['r2'\], expected \['r1', 'r2'\]"
    elif change == "r1 short":
        arrays["r1"] = np.ascontiguousarray(arrays["r1"][:-1])
        message = r": 'r1' is float64 \[63, 64\], expected float64 \[64, 64\]"
    else:
        arrays["r2"][1, 0, 2, 3] = np.nan
        message = ": 'r2' contains NaN or Inf"
    save_safetensors(path, arrays)
    with pytest.raises(ValueError, match=rf"^resume: .*rotations.safetensors{message}; "
                                         "rerun without --resume"):
        pipeline.quantize(ckpt, cfg, calib, out_dir=out, resume=True, batch_size=2)
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("change", ["layer from another run", "layer tensors swapped",
                                    "layer unstamped", "r1 scaled", "rotations.json edited"])
def test_resume_refuses_files_another_run_wrote_or_that_changed(change, tmp_path, monkeypatch):
    """Each stored file carries its run's id and a digest of its tensors: found by fuzzing,
    layer 0 of another method's run, two same-shaped tensors swapped, R1 scaled by 3 (no longer
    a rotation) and a rewritten rotations.json all resumed silently into a different model (or,
    for an extreme value, failed later blaming the model)."""
    cfg = QuantConfig(method="offq")
    ckpt = with_source_id(tiny_checkpoint(5, layers=3))
    calib = calibration(ckpt, 4, 16)
    out = tmp_path / "cut"
    _partial_run(ckpt, cfg, calib, out, monkeypatch)
    partial = out / ".offq-partial"
    layer, rot = partial / "layer_0000.safetensors", partial / "rotations.safetensors"
    tensors, meta = load_safetensors(layer)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    if change == "layer from another run":
        other = tmp_path / "other"
        _partial_run(ckpt, QuantConfig(method="quarot"), calib, other, monkeypatch)
        (other / ".offq-partial" / "layer_0000.safetensors").replace(layer)
        message = "layer_0000.safetensors was not written by this run"
    elif change in ("layer tensors swapped", "layer unstamped"):
        a, b = (f"model.layers.0.self_attn.{n}_proj.scales" for n in ("q", "o"))
        tensors[a], tensors[b] = tensors[b], tensors[a]
        unstamped = change == "layer unstamped"
        save_safetensors(layer, tensors, None if unstamped else meta)
        message = ("layer_0000.safetensors was not written by this run" if unstamped else
                   "layer_0000.safetensors changed since this run wrote it")
    elif change == "r1 scaled":
        arrays, rmeta = load_safetensors(rot)
        arrays = {k: np.array(v) for k, v in arrays.items()}
        arrays["r1"] *= 3
        save_safetensors(rot, arrays, rmeta)
        message = "rotations.safetensors changed since this run wrote it"
    else:
        info = json.loads((partial / "rotations.json").read_text())
        (partial / "rotations.json").write_text(json.dumps({**info, "note": "another rotation"}))
        message = "rotations.safetensors changed since this run wrote it"
    with pytest.raises(ValueError, match=rf"^resume: .*{message}.*rerun without --resume"):
        pipeline.quantize(ckpt, cfg, calib, out_dir=out, resume=True, batch_size=2)
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_partial_directory_that_is_a_link_is_refused_first(resume, tmp_path, monkeypatch):
    """Found by fuzzing: .offq-partial as a link to a directory failed with shutil's "Cannot call
    rmtree on a symbolic link" (no path), under --resume after config.json was written."""
    ckpt = with_source_id(tiny_checkpoint(5, layers=3))
    calib = calibration(ckpt, 4, 16)
    elsewhere = tmp_path / "elsewhere"
    _partial_run(ckpt, RESUME_CFG, calib, elsewhere, monkeypatch)
    out = tmp_path / "q"
    out.mkdir()
    (out / ".offq-partial").symlink_to(elsewhere / ".offq-partial")
    with pytest.raises(ValueError, match=r"\.offq-partial: not a directory of its own"):
        pipeline.quantize(ckpt, RESUME_CFG, calib, out_dir=out, resume=resume, batch_size=2)
    assert not (out / "config.json").exists()
    assert (elsewhere / ".offq-partial" / "layer_0000.safetensors").is_file()


# ============================================================================ 5. Hadamard sizes
@pytest.mark.parametrize("f", [376, 408])  # 188 * 2 = 47 * 8, 204 * 2 = 51 * 8: no construction
def test_unsupported_r4_size_fails_before_any_pass(f, monkeypatch):
    ckpt = tiny_checkpoint(0, f=f)
    calib = calibration(ckpt, 2, 16)

    def no_pass(*a, **k):
        pytest.fail("the statistics pass ran before the Hadamard sizes were checked")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "collect_statistics", no_pass)
        with pytest.raises(ValueError, match=rf"R4 \(intermediate size\): no Hadamard construction "
                                             rf"is available for length {f}.*--no-r4") as err:
            pipeline.quantize(ckpt, QuantConfig(method="offq"), calib)
        assert "block=" not in str(err.value)  # the kernel's advice is no quantize option
    # R4 off: the same model quantizes
    res = pipeline.quantize(ckpt, QuantConfig(method="offq", r4=False), calib)
    assert np.all(np.isfinite(res.model("fake").nll(calibration(ckpt, 1, 8, seed=4))))


# ============================================================================ 6. clip about the midpoint
@pytest.mark.parametrize("clip", [0.5, 0.8, 0.95])
def test_grid_clip_keeps_the_offset_of_an_offset_group(clip):
    rng = np.random.default_rng(3)
    noise = 0.01
    x = (100.0 + noise * rng.standard_normal((16, 64))).astype(np.float32)
    x[8:] -= 200.0  # negative offsets as well
    for bits in (2, 4, 8):
        s, z = grid_params(x, bits, False, clip)
        y = dequantize_codes(quantize_codes(x, s[:, None], z[:, None], bits), s[:, None], z[:, None])
        err = np.abs(y - x).max()
        assert err < 6 * noise, (bits, err)  # clipping to about clip * 100 would cost ~ 100 * (1 - clip)
        # the clipped range is centred on the group's midpoint
        mid = (x.max(1) + x.min(1)) / 2
        centre = s * ((2 ** bits - 1) / 2 - z)
        assert np.all(np.abs(centre - mid) <= s), bits


def test_grid_clip_one_is_exactly_min_and_max():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1000, 32)) * rng.uniform(0.1, 100, (1000, 1))
         + rng.uniform(-50, 50, (1000, 1))).astype(np.float32)
    mn, mx = x.min(-1), x.max(-1)
    f32 = np.float32
    # rows where mid -/+ half do not land exactly on min/max in float32 (what clip 1 must avoid)
    assert np.any((mn + mx) * f32(0.5) - (mx - mn) * f32(0.5) != mn)
    for bits in (2, 3, 4, 8):
        s, z = grid_params(x, bits, False, 1.0)
        np.testing.assert_array_equal(s, ((mx - mn) / f32(2 ** bits - 1)).astype(f32))
        np.testing.assert_array_equal(z, np.rint(-mn / s).astype(f32))


def _kernel_vs_grid(symmetric, clip, bits, exact=True):
    from offq.kernels import quantize

    rng = np.random.default_rng(int(clip * 1000) + symmetric)
    x = (rng.standard_normal((12, 256)) * rng.uniform(0.01, 10, (12, 1))
         + rng.uniform(-5, 5, (12, 1))).astype(np.float32)
    x[3] = 100.0 + 0.01 * x[3]  # an offset row
    x[5, :64] = 0.0  # an all-zero group
    x[6, 64:128] = -2.5  # a constant group
    g = 64
    qt = quantize(x, bits=bits, group_size=g, symmetric=symmetric, clip=clip)
    xg = x.reshape(12, 256 // g, g)
    s, z = grid_params(xg, bits, symmetric, clip)
    codes = quantize_codes(xg, s[..., None], z[..., None], bits).reshape(x.shape)
    if exact:
        np.testing.assert_array_equal(qt.scale, s)
        np.testing.assert_array_equal(qt.zero, z)
        np.testing.assert_array_equal(qt.unpacked_codes(), codes)
    else:  # the same clipped range up to float32 rounding of its end points (an ulp of the
        # group's magnitude, which moves the zero-point of an offset group by several codes):
        # the two reconstructions differ by at most one step
        ulp = np.spacing(np.abs(xg).max(-1))
        assert np.all(np.abs(qt.scale - s) <= 4 * ulp / np.float32(2 ** bits - 1) + 1e-6 * s)
        y_kernel = qt.dequantize().reshape(xg.shape)
        y_grid = dequantize_codes(codes.reshape(xg.shape), s[..., None], z[..., None])
        assert np.all(np.abs(y_kernel - y_grid) <= (1.01 * s + 8 * ulp)[..., None])


CLIPS = [0.37, 0.5, 0.8, 0.9, 0.99, 1.0]
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("symmetric", [
    True, pytest.param(False, id="asym")])
def test_kernel_quantize_equals_grid_params_and_quantize_codes(symmetric, clip, bits):
    """The C kernel and the Python grid (GPTQ/RTN's path) give the same scale, zero and codes,
    bit for bit, for every clip (tests/test_quant.py compares the kernel with its own NumPy
    formula instead)."""
    _kernel_vs_grid(symmetric, clip, bits)


# ============================================================================ 7. architecture as data
def _tiny_configs():
    from offq.model.config import ModelConfig

    base = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    return [ModelConfig(architecture="llama", attention_bias=True, mlp_bias=True,
                        tie_word_embeddings=False, **base),
            ModelConfig(architecture="llama", **base),
            ModelConfig(architecture="qwen2", attention_bias=True, tie_word_embeddings=False,
                        **base)]


@pytest.mark.parametrize("cfg", _tiny_configs(), ids=["llama-biases", "llama", "qwen2"])
def test_gguf_and_hf_names_round_trip(cfg):
    from offq.model.arch import architecture_of

    arch = architecture_of(cfg)
    names = list(cfg.tensor_shapes())
    ggufs = {}
    for x in names:
        g = arch.gguf_name(x)
        assert g is not None, x
        assert arch.hf_name(g) == x, (x, g)
        ggufs[x] = g
    assert len(set(ggufs.values())) == len(names)
    if cfg.mlp_bias:
        for i in range(cfg.num_hidden_layers):
            for stem in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                         "ffn_down"):
                assert f"blk.{i}.{stem}.bias" in ggufs.values(), (i, stem)
        assert ggufs["model.layers.2.self_attn.o_proj.bias"] == "blk.2.attn_output.bias"
        assert ggufs["model.layers.1.mlp.down_proj.bias"] == "blk.1.ffn_down.bias"


def test_tiny_llama_gguf_with_attention_and_mlp_biases_loads(tmp_path):
    pytest.importorskip("gguf")
    from test_formats_gguf import _tiny_config, _write_tiny_gguf

    from offq.formats import open_checkpoint

    cfg = _tiny_config("llama").replace(attention_bias=True, mlp_bias=True)
    hf = _write_tiny_gguf(tmp_path / "b.gguf", cfg)
    assert "model.layers.1.self_attn.o_proj.bias" in hf and "model.layers.0.mlp.up_proj.bias" in hf
    with open_checkpoint(tmp_path / "b.gguf") as ck:
        assert ck.config.attention_bias and ck.config.mlp_bias
        assert set(ck.tensors.keys()) == set(hf)
        for i in range(cfg.num_hidden_layers):
            for lin in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                k = f"model.layers.{i}.{lin}.bias"
                np.testing.assert_array_equal(ck.tensors[k], hf[k])


#: Tensor-name fragments that only offq/model/arch.py may spell.
NAME_FRAGMENTS = ("model.layers", "self_attn", "mlp.", "embed_tokens", "lm_head.weight",
                  "model.norm", "input_layernorm", "post_attention_layernorm", "attn_q", "ffn_")

#: Known occurrences in docstrings (documentation, not code that formats a name), by file and
#: fragment, with their count: a new occurrence anywhere fails the test.
ALLOWED = {
    # module docstring: examples of the GGUF -> HF name map
    ("formats/gguf.py", "embed_tokens"): 1, ("formats/gguf.py", "model.layers"): 1,
    ("formats/gguf.py", "self_attn"): 1, ("formats/gguf.py", "attn_q"): 1,
    ("formats/gguf.py", "model.norm"): 1,
    # ModelConfig docstring: what tie_word_embeddings means
    ("model/config.py", "embed_tokens"): 1,
    # Model(embed_tokens=...): the argument's name in the class docstring and in its error
    # message (an f-string that also reads self.embed_tokens)
    ("model/decoder.py", "embed_tokens"): 3,
}


def _strings_and_comments(path: Path):
    """(line, text) of every string literal (docstrings, f-string pieces) and comment."""
    kinds = {tokenize.STRING, tokenize.COMMENT}
    kinds |= {getattr(tokenize, n) for n in ("FSTRING_MIDDLE",) if hasattr(tokenize, n)}
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in kinds:
                yield tok.start[0], tok.string


def test_tensor_names_are_spelled_only_in_arch():
    found = Counter()
    where: dict[tuple[str, str], list[int]] = {}
    files = sorted(p for p in OFFQ_SRC.rglob("*.py") if p != OFFQ_SRC / "model" / "arch.py")
    assert len(files) > 20
    for p in files:
        rel = p.relative_to(OFFQ_SRC).as_posix()
        for line, text in _strings_and_comments(p):
            for frag in NAME_FRAGMENTS:
                n = text.count(frag)
                if n:
                    found[rel, frag] += n
                    where.setdefault((rel, frag), []).append(line)
    extra = {k: (v, where[k]) for k, v in found.items() if v > ALLOWED.get(k, 0)}
    assert not extra, f"tensor names outside offq/model/arch.py (file, fragment): (count, lines) {extra}"


# ============================================================================ 8. untrusted files
def _hf_dir(path: Path, ckpt=None) -> Path:
    """A tiny Llama (or ``ckpt``) as an HF directory (config.json, model.safetensors, a
    word-level tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    ckpt = tiny_checkpoint(1) if ckpt is None else ckpt
    path.mkdir()
    save_safetensors(path / "model.safetensors", dict(ckpt.tensors))
    (path / "config.json").write_text(json.dumps(ckpt.config.to_hf()))
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


def _finishes(fn, seconds: float = 20.0):
    """fn()'s result, or a failure when it blocks (it runs in a daemon thread: a read of a pipe
    with no writer never returns)."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test below
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked for {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file or a directory"):
        _finishes(lambda: offq.open_checkpoint(str(fifo)))
    hf = _hf_dir(tmp_path / "hf")
    os.mkfifo(hf / "extra.json")  # a pipe beside the model files: source_id must skip it
    with offq.open_checkpoint(str(hf)) as ckpt:
        assert len(_finishes(ckpt.source_id)) == 64


def test_source_id_sees_a_same_shaped_fine_tune_past_the_header(tmp_path):
    """--resume compares source_id: it hashed the first MiB only, so weights changed past it
    with the same shapes and file size (a fine-tune) resumed into a mix of two models."""
    d = _hf_dir(tmp_path / "hf", tiny_checkpoint(1, v=12000))  # 3 MiB of embeddings, layers
    tensors = {k: np.array(v) for k, v in load_safetensors(d / "model.safetensors")[0].items()}
    assert (d / "model.safetensors").stat().st_size > 3 << 20
    with offq.open_checkpoint(str(d)) as c:
        before = c.source_id()
    for name in tensors:
        if name.startswith("model.layers."):
            tensors[name] = tensors[name] * np.float32(1.01)
    save_safetensors(d / "model.safetensors", tensors)
    with offq.open_checkpoint(str(d)) as c:
        assert c.source_id() != before


@pytest.mark.parametrize("content,match", [("[]", "expected a JSON object, got list"),
                                           ("{bad", "not valid JSON"),
                                           (None, rf"{MAX_JSON_BYTES + 1} bytes, more than")])
def test_a_spoiled_resume_state_names_its_file(content, match, tmp_path, monkeypatch):
    """None: a sparse file past MAX_JSON_BYTES, refused before the parser reads it."""
    ckpt = with_source_id(tiny_checkpoint(5, layers=3))
    calib = calibration(ckpt, 4, 16)
    out = tmp_path / "cut"
    _partial_run(ckpt, RESUME_CFG, calib, out, monkeypatch)
    state = out / ".offq-partial" / "state.json"
    if content is None:
        with open(state, "wb") as f:
            f.truncate(MAX_JSON_BYTES + 1)
    else:
        state.write_text(content)
    with pytest.raises(ValueError, match=rf"state.json: {match}.*rerun without --resume"):
        pipeline.quantize(ckpt, RESUME_CFG, calib, out_dir=out, resume=True, batch_size=2)


def test_deeply_nested_calibration_json_is_a_value_error(tmp_path):
    from offq.data import _read_jsonl

    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "fine"}\n' + "[" * 200_000 + "\n")
    with pytest.raises(ValueError, match=r"deep.jsonl:2: invalid JSON line"):
        _read_jsonl(path)


def _edited_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _set_key(key, value):
    def edit(cfg):
        cfg[key] = value
    return edit


def _set_quant(key, value):
    def edit(cfg):
        cfg["offq"]["quant_config"][key] = value
    return edit


@pytest.mark.parametrize("edit,match", [
    (_set_key("hidden_size", 0), "hidden_size"),
    # the weights were stored for RTN: no online R3/R4 may be applied to them
    (_set_quant("method", "quarot"), "its online transforms .* are not those its quant_config"),
    (_set_quant("kv_group_size", 7), "kv_group_size"),
    # no linear's input width is a multiple of 7: the message named no file
    (_set_quant("w_group_size", 7), "w_group_size: expected -1 or a divisor"),
])
def test_offq_checkpoint_config_errors_name_the_file(rtn_checkpoint, tmp_path, edit, match):
    bad = _edited_config(rtn_checkpoint[0], tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=rf"bad/config.json: .*{match}"):
        load_quantized(bad)


def test_threads_writing_one_path_atomically_each_leave_a_whole_file(tmp_path):
    """The temporary name held only the process id: two threads writing the same path shared it,
    so one renamed the other's half-written file into place or failed to find its own."""
    import threading

    from offq.formats.files import atomic_write_bytes

    path = tmp_path / "out.bin"
    payloads = [bytes([i]) * (1 << 16) for i in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(payloads))

    def write(payload: bytes) -> None:
        try:
            start.wait()
            for _ in range(20):
                atomic_write_bytes(path, [payload[: 1 << 15], payload[1 << 15:]])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert path.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary left behind
