"""GPTQ-format export: an independent reader, written from the format's description (bit
streams of little-endian 32-bit words, stored zero = zero-point - 1, float16 scales per group),
recovers offq's dequantized weights exactly; what the format cannot express is refused; offq
evaluates the export like the checkpoint it came from."""
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from offq.config import QuantConfig
from offq.formats.checkpoint import load_safetensors
from offq.formats.gptq_export import (GptqExportError, export_gptq, pack_stream, unpack_stream)
from offq.quant.assemble import load_quantized
from offq.recipe import pipeline

from tiny_models import calibration, tiny_checkpoint, write_word_tokenizer


def read_packed(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The format read bit by bit: each int32 column is the little-endian bytes of its words,
    bit i of the stream is bit (i % 8) of byte i // 8; value j is bits j*bits .. j*bits+bits-1,
    least significant first. -> int64 [count, columns]."""
    raw = np.ascontiguousarray(words.astype("<i4").T).view(np.uint8)  # [columns, bytes]
    stream = np.unpackbits(raw, axis=1, bitorder="little")[:, :count * bits]
    digits = stream.reshape(stream.shape[0], count, bits).astype(np.int64)
    return (digits << np.arange(bits)).sum(axis=2).T


def independent_dequant(tensors: dict, prefix: str, qc: dict) -> np.ndarray:
    """``W [N, K]`` from the GPTQ tensors of one linear (stored zero + 1 in the v1 format)."""
    bits = qc["bits"]
    scales = np.asarray(tensors[prefix + ".scales"])
    assert scales.dtype == np.float16
    g_idx = np.asarray(tensors[prefix + ".g_idx"])
    k = g_idx.size
    q = read_packed(np.asarray(tensors[prefix + ".qweight"]), bits, k)  # [K, N]
    z = read_packed(np.asarray(tensors[prefix + ".qzeros"]).T, bits, scales.shape[1]).T + (qc["checkpoint_format"] == "gptq")
    w = scales.astype(np.float32)[g_idx] * (q - z[g_idx]).astype(np.float32)
    return w.T


@pytest.fixture(scope="module")
def tiny():
    ckpt = tiny_checkpoint(5)
    return ckpt, calibration(ckpt)


def quantized_dir(tiny, tmp_path, **over):
    ckpt, calib = tiny
    cfg = QuantConfig(**{**dict(method="gptq", a_bits=16, kv_bits=16), **over})
    # a new directory per call: offq refuses to replace a checkpoint of another configuration
    out = Path(tempfile.mkdtemp(prefix="ckpt", dir=tmp_path))
    pipeline.quantize(ckpt, cfg, calib, out_dir=out, progress=False)
    return out


@pytest.mark.parametrize("bits,group,sym,fmt", [
    (4, -1, True, "gptq"), (4, 16, False, "gptq"), (3, -1, False, "gptq"), (3, 32, True, "gptq"),
    (2, 16, True, "gptq"), (2, 16, False, "gptq_v2"), (8, 32, False, "gptq")])
def test_independent_reader_matches_offq(tiny, tmp_path, bits, group, sym, fmt):
    src = quantized_dir(tiny, tmp_path, w_bits=bits, w_group_size=group, w_symmetric=sym)
    out = export_gptq(src, tmp_path / "gptq", checkpoint_format=fmt)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {**qc, "quant_method": "gptq", "bits": bits, "group_size": group,
                  "desc_act": False, "sym": sym, "checkpoint_format": fmt}
    tensors, _ = load_safetensors(out / "model.safetensors")
    model, _, _ = load_quantized(src, mode="fake")
    for i in range(2):
        layer = model.load_layer(i)
        for lin in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            mod = "self_attn" if lin in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"model.layers.{i}.{mod}.{lin}"
            got = independent_dequant(tensors, prefix, qc)
            qw = _offq_weight(src, prefix)
            g = qw.group_size
            ref16 = (np.repeat(qw.scale.astype(np.float16).astype(np.float32), g, 1)
                     * (qw.codes.astype(np.float32) - np.repeat(qw.zero, g, 1)))
            np.testing.assert_array_equal(got, ref16)  # exact, with the format's float16 scales
            np.testing.assert_allclose(got, qw.dequantized, rtol=2 ** -11, atol=0)
        del layer


def _offq_weight(src, prefix):
    from offq.formats.checkpoint import read_config
    from offq.quant.assemble import stored_layer

    mc, qcfg, _ = read_config(src)
    tensors, _ = load_safetensors(src / "model.safetensors")
    i = int(prefix.split(".")[2])
    return stored_layer(tensors, mc.replace(tie_word_embeddings=False), qcfg, i)[prefix.split(".")[-1]]


def test_known_words():
    """Values 0..7 in one column at 4 bits make the word 0x76543210; a symmetric 4-bit model's
    zeros (8, stored as 7) make 0x77777777, the familiar qzeros of symmetric GPTQ checkpoints."""
    assert pack_stream(np.arange(8).reshape(8, 1), 4)[0, 0] == 0x76543210
    assert pack_stream(np.full((8, 1), 7), 4).view(np.uint32)[0, 0] == 0x77777777
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 8):
        v = rng.integers(0, 2 ** bits, (96, 5))
        packed = pack_stream(v, bits)
        assert packed.shape == (96 * bits // 32, 5) and packed.dtype == np.int32
        np.testing.assert_array_equal(unpack_stream(packed, bits, 96), v)
        np.testing.assert_array_equal(read_packed(packed, bits, 96), v)


def test_refuses_what_the_format_cannot_express(tiny, tmp_path):
    w4a4 = quantized_dir(tiny, tmp_path, a_bits=4, kv_bits=4)
    with pytest.raises(GptqExportError, match="weight-only"):
        export_gptq(w4a4, tmp_path / "x")
    rotated = tmp_path / "rot"
    ckpt, calib = tiny
    pipeline.quantize(ckpt, QuantConfig(method="offq", a_bits=16, kv_bits=16), calib,
                      out_dir=rotated, progress=False)
    with pytest.raises(GptqExportError, match="online rotations"):
        export_gptq(rotated, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    for head_bits in (8, 4):  # its codes would otherwise be copied as if they were floats
        quantized_head = quantized_dir(tiny, tmp_path, lm_head_bits=head_bits)
        with pytest.raises(GptqExportError, match=f"LM head is stored in {head_bits} bits"):
            export_gptq(quantized_head, tmp_path / "h")
        assert not (tmp_path / "h").exists()
    w2 = quantized_dir(tiny, tmp_path, w_bits=2, w_group_size=16, w_symmetric=False)
    with pytest.raises(GptqExportError, match="zero-point outside.*gptq_v2"):
        export_gptq(w2, tmp_path / "z")  # zero-point 0 in some groups: v1 stores zero - 1


@pytest.mark.parametrize("bits, fmt", [(4, "gptq"), (2, "gptq_v2"), (8, "gptq_v2")])
def test_offq_eval_runs_the_export(tiny, tmp_path, bits, fmt):
    """Read back through offq's loader, each format with its own zero-point offset (v1 stores
    zero - 1, v2 the zero itself: a loader that added 1 to both read W2 v2 at nll 147, not 67)."""
    from offq.eval import load_model

    src = quantized_dir(tiny, tmp_path, w_bits=bits, w_group_size=16, w_symmetric=False)
    out = export_gptq(src, tmp_path / "gptq", checkpoint_format=fmt)
    ids = calibration(tiny[0], n=2, t=32, seed=7)
    a, _ = load_model(str(src), mode="fake")
    b, _ = load_model(str(out), mode="fake")
    na, nb = a.nll(ids), b.nll(ids)
    np.testing.assert_allclose(nb.mean(), na.mean(), rtol=2e-3)  # float16 scales/embeddings
    c, _ = load_model(str(out), mode="real")  # the export's weights packed for matmul_wq
    assert c.built_mode == "real"
    np.testing.assert_allclose(c.nll(ids), nb, rtol=1e-5)


def test_offq_export_command_writes_the_export_and_takes_quiet(tiny, tmp_path, capsys, caplog):
    """`offq export` as the README runs it; --quiet (which every other command takes) keeps the
    warnings: replacing an earlier export is still said."""
    from offq.cli import main

    src = quantized_dir(tiny, tmp_path, w_bits=4, w_group_size=16, w_symmetric=False)
    out = tmp_path / "gptq"
    assert main(["export", str(src), "--format", "gptq", "--out", str(out)]) == 0
    assert f"wrote {out} (format gptq, checkpoint_format gptq)" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()
    with caplog.at_level("INFO"):
        assert main(["export", str(src), "--format", "gptq", "--out", str(out), "--quiet"]) == 0
    assert "replacing the GPTQ export already there" in caplog.text


def test_an_export_s_model_carries_its_tokenizer(export_dir, tmp_path, tiny):
    """load_gptq_export returned the tokenizer beside a model without one, so generate(model,
    None, ...) said the model had none."""
    import shutil

    from offq.formats.gptq_export import load_gptq_export

    out = tmp_path / "with-tokenizer"
    shutil.copytree(export_dir, out)
    write_word_tokenizer(out, tiny[0].config.vocab_size)
    model, tokenizer, _ = load_gptq_export(out, mode="fake")
    assert tokenizer is not None and model.tokenizer is tokenizer


def test_export_refuses_to_overwrite_its_source_or_other_files(tiny, tmp_path, caplog):
    src = quantized_dir(tiny, tmp_path, w_bits=4, w_group_size=16, w_symmetric=False)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(ValueError, match="is the input being read"):
        export_gptq(src, src)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="busy exists, is not empty"):
        export_gptq(src, busy)
    assert sorted(p.name for p in src.iterdir()) == before
    with caplog.at_level("WARNING", logger="offq.formats.gptq_export"):
        out = export_gptq(src, tmp_path / "gptq")
        assert "replacing" not in caplog.text
        export_gptq(src, out)  # an earlier export may be replaced, not silently
    assert f"{out}: replacing the GPTQ export already there" in caplog.text
    from offq.formats.files import DirectoryLock

    before = (out / "config.json").read_bytes()
    with DirectoryLock(out):  # but not while another export writes it
        with pytest.raises(ValueError, match=f"^--out: {out} is being written by another offq "):
            export_gptq(src, out)
    assert (out / "config.json").read_bytes() == before
    export_gptq(src, out)  # the refused export held nothing


@pytest.fixture(scope="module")
def export_dir(tiny, tmp_path_factory):
    """One GPTQ export (4 bits, groups of 16, asymmetric), copied by the tests that spoil it."""
    tmp = tmp_path_factory.mktemp("gptq_export")
    return export_gptq(quantized_dir(tiny, tmp, w_bits=4, w_group_size=16, w_symmetric=False),
                       tmp / "gptq")


def test_offq_inspect_describes_an_export(export_dir, capsys):
    """`offq inspect` read an export as a float model and reported its weights missing."""
    import json

    from offq.cli import main

    assert main(["inspect", str(export_dir), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["format"] == "GPTQ export (gptq)"
    assert facts["quantization"] == ("weight-only, 4-bit weights, group 16, sym False, "
                                     "desc_act False")


def _spoiled(export_dir, tmp_path, change):
    """A copy of the export whose tensors ``change(tensors)`` edited (or whose config it
    edited, when it returns a dict for config.json)."""
    import shutil

    from offq.formats.safetensors import write_safetensors

    out = tmp_path / "spoiled"
    shutil.copytree(export_dir, out)
    tensors, _ = load_safetensors(out / "model.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    config = change(tensors)
    if config is not None:
        (out / "config.json").write_text(json.dumps(config))
    else:
        write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    return out


def _drop(name):
    def change(t):
        del t[name]
    return change


def _set(name, value):
    def change(t):
        t[name] = value
    return change


def _nan_scale(t):
    t["model.layers.0.self_attn.q_proj.scales"][0, 0] = np.nan


@pytest.mark.parametrize("change,match", [
    (_drop("model.norm.weight"), r"missing tensor 'model.norm.weight'"),
    (_drop("model.layers.1.input_layernorm.weight"), r"missing tensor 'model.layers.1.input_lay"),
    (_set("model.layers.0.mlp.up_proj.qweight", np.array(3, np.int32)),
     r"up_proj.qweight: int32 with 0 axes; expected 2 axes"),
    (_set("model.layers.0.mlp.up_proj.scales", np.ones(4, np.float16)),
     r"up_proj.scales: float16 with 1 axes; expected 2 axes"),
    (_set("model.norm.weight", np.ones(3, np.float16)), r"tensor 'model.norm.weight' is float32 \[3\]"),
    (_nan_scale, r"q_proj.scales' contains NaN or Inf"),
    (_set("model.extra.weight", np.ones(3, np.float16)), r"unexpected tensor\(s\) 'model.extra.weight'"),
])
def test_reading_a_spoiled_export_names_what_is_wrong(export_dir, tmp_path, change, match):
    from offq.eval import load_model

    with pytest.raises(ValueError, match=match):
        load_model(str(_spoiled(export_dir, tmp_path, change)), mode="fake")


@pytest.mark.parametrize("key,value,match", [
    ("group_size", [16], r"w_group_size: expected -1 or a positive integer, got \[16\]"),
    ("group_size", "16", r"w_group_size: expected -1 or a positive integer, got '16'"),
    ("group_size", 0, r"w_group_size: expected -1 or a positive integer, got 0"),
    ("group_size", True, r"w_group_size: expected -1 or a positive integer, got True"),
    # found by fuzzing too: the message named neither the file nor the field
    ("group_size", 7, r"config\.json: quantization_config group_size 7 does not fit the model's "
                      r"widths: w_group_size: expected -1 or a divisor of"),
    ("bits", [4], r"bits \[4\] not in \(2, 3, 4, 8\)"),
    ("bits", 4.0, r"w_bits: expected one of 2, 3, 4, 8 or 16 \(off\), got 4.0"),
    ("sym", "false", r"w_symmetric: expected true or false, got 'false'"),
    ("checkpoint_format", ["gptq"], r"checkpoint_format \['gptq'\]; offq reads"),
    ("checkpoint_format", {"a": 1}, r"checkpoint_format \{'a': 1\}; offq reads"),
])
def test_a_quantization_config_of_the_wrong_json_type_is_named(export_dir, tmp_path, key, value,
                                                               match):
    """Found by fuzzing the reader: a list where group_size or checkpoint_format belongs raised
    TypeError (int() of a list; a list as a dict key); a string group size or sym was taken."""
    from offq.eval import load_model

    def edit(_):
        cfg = json.loads((export_dir / "config.json").read_text())
        cfg["quantization_config"][key] = value
        return cfg
    with pytest.raises(ValueError, match=match):
        load_model(str(_spoiled(export_dir, tmp_path, edit)), mode="fake")


def test_reading_an_export_with_fewer_layers_in_its_config_is_refused(export_dir, tmp_path):
    from offq.eval import load_model

    def one_layer(_):
        cfg = json.loads((export_dir / "config.json").read_text())
        return {**cfg, "num_hidden_layers": 1}
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) 'model.layers.1."):
        load_model(str(_spoiled(export_dir, tmp_path, one_layer)), mode="fake")


def test_a_failed_re_export_leaves_no_config_beside_new_weights(tiny, tmp_path, monkeypatch):
    """config.json goes first: a crash while the weights are written leaves a directory that
    does not claim to be a GPTQ export (before, the old config stayed beside the new weights)."""
    from offq.formats import gptq_export

    src = quantized_dir(tiny, tmp_path, w_bits=4, w_group_size=16, w_symmetric=False)
    out = export_gptq(src, tmp_path / "gptq")

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(gptq_export, "write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        export_gptq(src, out)
    assert not (out / "config.json").exists()
    assert not gptq_export.is_gptq_export(out)


def test_an_exporter_s_rotary_inv_freq_buffer_is_ignored(export_dir, tmp_path):
    """Older GPTQ exporters saved each layer's rotary inv_freq; offq computes it from config.json
    and reads such a checkpoint (any other unknown tensor is refused, above)."""
    from offq.eval import load_model

    out = _spoiled(export_dir, tmp_path, _set("model.layers.0.self_attn.rotary_emb.inv_freq",
                                               np.ones(8, np.float32)))
    model, _ = load_model(str(out), mode="fake")
    assert model.num_layers == 2


def _edited_checkpoint(src, tmp_path, edit):
    """A copy of the offq checkpoint ``src`` whose tensors ``edit(tensors)`` changed."""
    import shutil

    from offq.formats.safetensors import write_safetensors

    out = Path(tempfile.mkdtemp(prefix="edited", dir=tmp_path))
    shutil.copytree(src, out, dirs_exist_ok=True)
    tensors, _ = load_safetensors(out / "model.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    edit(tensors)
    write_safetensors(out / "model.safetensors", tensors, {})
    return out


def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


@pytest.mark.parametrize("what, value, exc, match", [
    ("scales", 1e5, GptqExportError, r"scales: 1 values are not finite or exceed float16's range"),
    ("embed", 7e4, GptqExportError,
     r"embed_tokens.weight: 1 values are not finite or exceed float16's range"),
    ("norm", np.inf, GptqExportError, r"model.norm.weight: 1 values are not finite"),
    # now refused as the checkpoint is read, before the exporter's own check
    ("zeros", 3.5, ValueError, r"q_proj.zeros' holds zero-point 3.5, not a whole number$"),
])
def test_export_refuses_values_the_format_would_change(tiny, tmp_path, what, value, exc, match):
    """float16 overflow became Inf with only NumPy's warning, and a fractional zero-point was
    truncated into another model; both exports exited 0."""
    src = quantized_dir(tiny, tmp_path, w_bits=4, w_group_size=16, w_symmetric=False)

    def edit(t):
        name = {"scales": lambda: _first(t, "q_proj.scales"),
                "zeros": lambda: _first(t, "q_proj.zeros"),
                "embed": lambda: "model.embed_tokens.weight",
                "norm": lambda: "model.norm.weight"}[what]()
        t[name].reshape(-1)[0] = value

    with pytest.raises(exc, match=match):
        export_gptq(_edited_checkpoint(src, tmp_path, edit), tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
