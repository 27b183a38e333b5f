"""The public Python API's answers to arguments it cannot use (a review's probes, 2026-12-07):
what would have lost data, what ran silently as something else, and what failed deep inside
instead of naming the argument. Tiny random models (tests/tiny_models.py) unless the case needs
the default model's tokenizer."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import offq
from offq.formats.checkpoint import save_safetensors
from offq.generate import GenerationConfig, generate, generate_ids
from offq.recipe import pipeline
from tiny_models import calibration, tiny_checkpoint, token_ids, write_word_tokenizer

RTN = dict(method="rtn", calib_samples=2, calib_seqlen=32)


def tiny_hf_dir(path: Path) -> Path:
    """A tiny Llama as a HF directory, with a word-level tokenizer (text "w3 w4" -> ids 3, 4)."""
    ckpt = tiny_checkpoint(1)
    path.mkdir()
    save_safetensors(path / "model.safetensors", dict(ckpt.tensors))
    (path / "config.json").write_text(json.dumps(ckpt.config.to_hf()))
    write_word_tokenizer(path, ckpt.config.vocab_size)
    return path


@pytest.fixture()
def rtn_result(tmp_path):
    """(the HF directory, the float checkpoint read from it, its RTN QuantizeResult in memory)."""
    src = tiny_hf_dir(tmp_path / "hf")
    ckpt = offq.load(src)
    return src, ckpt, offq.quantize(ckpt, offq.QuantConfig(**RTN), progress=False)


def words(n: int, seed: int = 0) -> str:
    return " ".join(f"w{i}" for i in np.random.default_rng(seed).integers(3, 101, n))


# ------------------------------------------------------------------------------------ save
def test_save_refuses_what_quantize_out_dir_refuses(rtn_result, tmp_path, caplog) -> None:
    src, _, res = rtn_result
    before = (src / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="^out_dir: .* is the input being read"):
        offq.save(res, src)  # it overwrote the float model's files
    assert (src / "model.safetensors").read_bytes() == before
    with pytest.raises(ValueError, match="^out_dir: empty"):
        offq.save(res, "")  # it wrote into the current directory
    with pytest.raises(TypeError, match="^out_dir: expected a directory path, got NoneType"):
        offq.save(res, None)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        offq.save(res, tmp_path / "a-file")  # it raised a bare FileExistsError
    with pytest.raises(ValueError, match=r"^out_dir .*a-file/x: .*a-file is not a directory"):
        offq.save(res, tmp_path / "a-file" / "x")  # the CLI's probe, now the API's too
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds something else"):
        offq.save(res, tmp_path / "other")  # it mixed the checkpoint into them
    offq.save(res, tmp_path / "q")
    assert "replacing" not in caplog.text
    offq.save(res, tmp_path / "q")  # the same result again: rewritten, with a warning (was silent)
    assert "replacing the finished offq checkpoint there" in caplog.text
    from offq.formats.files import DirectoryLock

    with DirectoryLock(tmp_path / "q"):  # not while a run writes there
        with pytest.raises(ValueError, match="q is being written by another offq run"):
            offq.save(res, tmp_path / "q")
    offq.save(res, tmp_path / "q")
    w8 = offq.quantize(offq.load(src), offq.QuantConfig(**{**RTN, "w_bits": 8}), progress=False)
    with pytest.raises(ValueError, match="finished offq checkpoint made with a different w_bits"):
        offq.save(w8, tmp_path / "q")  # it replaced the W4 checkpoint


# ------------------------------------------------------------------------------ perplexity
def test_perplexity_reads_foreign_tokenizers_without_special_tokens(smollm2_checkpoint) -> None:
    """A transformers tokenizer whose encode() adds BOS by default (and ignores add_bos=) made
    the stream one token longer and the perplexity 6.5 -> 7.9, silently."""
    import tokenizers
    import tokenizers.processors

    backend = tokenizers.Tokenizer.from_str(smollm2_checkpoint.tokenizer.backend.to_str())
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])  # prepends BOS
    foreign = [backend]  # the raw tokenizers.Tokenizer raised "unexpected keyword add_bos"
    try:  # (test-only reference: the raw case runs without it)
        import transformers
        foreign.append(transformers.PreTrainedTokenizerFast(tokenizer_object=backend,
                                                            bos_token="<|im_start|>"))
    except ImportError:
        pass
    text = "The quick brown fox jumps over the lazy dog. " * 4
    want = offq.perplexity(smollm2_checkpoint, text, seqlen=32, max_windows=1, quiet=True)
    for tok in foreign:
        got = offq.perplexity(smollm2_checkpoint, text, tokenizer=tok, seqlen=32, max_windows=1,
                              quiet=True)
        assert got["stream_tokens"] == want["stream_tokens"] and got["nll"] == want["nll"]


def test_a_quantized_model_is_reported_as_what_it_is(rtn_result, tmp_path) -> None:
    """load_quantized's and QuantizeResult.model()'s models were reported as 'fp32'."""
    _, ckpt, res = rtn_result
    ids = token_ids(ckpt.config.vocab_size, 1, 64, 3)[0].tolist()
    from_result = offq.perplexity(res.model("real"), ids, seqlen=32, quiet=True)["method"]
    assert from_result.startswith("rtn W4A4KV4") and from_result.endswith("(real)")
    offq.save(res, tmp_path / "q")
    model, _, _ = offq.load_quantized(tmp_path / "q", mode="fake")
    assert offq.perplexity(model, ids, seqlen=32, quiet=True)["method"].endswith("(fake)")
    assert offq.perplexity(ckpt, ids, seqlen=32, quiet=True)["method"] == "fp32"


def test_perplexity_mode_is_checked_wherever_the_model_comes_from(rtn_result, caplog) -> None:
    _, ckpt, res = rtn_result
    ids = token_ids(ckpt.config.vocab_size, 1, 64, 3)[0].tolist()
    with pytest.raises(ValueError, match="^mode: expected one of"):
        offq.perplexity(ckpt, ids, seqlen=32, mode="bogus", quiet=True)  # ran FP32
    with pytest.raises(ValueError, match="^mode: 'fake' is chosen when the model is built"):
        offq.perplexity(res.model("real"), ids, seqlen=32, mode="fake", quiet=True)
    fused = res.model("fused")  # its own path asked for again: it raised
    want = offq.perplexity(res, ids, seqlen=32, quiet=True)["nll"]
    for mode in ("fused", "auto", "real"):
        assert offq.perplexity(fused, ids, seqlen=32, mode=mode, quiet=True)["nll"] == want
    with caplog.at_level(logging.WARNING):
        offq.perplexity(ckpt, ids, seqlen=32, mode="fused", quiet=True)
    warned = [r for r in caplog.records if "mode='fused' ignored" in r.getMessage()]
    assert len(warned) == 1


def test_perplexity_names_text_batch_size_and_add_bos(rtn_result) -> None:
    _, ckpt, _ = rtn_result
    ids = token_ids(ckpt.config.vocab_size, 1, 64, 3)[0].tolist()
    with pytest.raises(TypeError, match="^text: expected a str .* got bytes"):
        offq.perplexity(ckpt, b"w3 w4 w5", seqlen=2, quiet=True)
    for bad in ("2", 1.7, "abc"):  # "2" and 1.7 ran as 2 and 1
        with pytest.raises(ValueError, match="^batch_size: expected a positive integer"):
            offq.perplexity(ckpt, ids, seqlen=32, batch_size=bad, quiet=True)
    with pytest.raises(ValueError, match="^add_bos: expected True, False or None"):
        offq.perplexity(ckpt, ids, seqlen=32, add_bos="no", quiet=True)  # read as True


# -------------------------------------------------------------------------------- quantize
def test_quantize_names_its_calibration(rtn_result, caplog) -> None:
    _, ckpt, _ = rtn_result
    cfg = offq.QuantConfig(method="offq", w_quantizer="rtn", calib_samples=2, calib_seqlen=32)
    with pytest.raises(TypeError, match="^calibration: expected token ids"):
        offq.quantize(ckpt, cfg, 5, progress=False)  # "expected str, bytes or os.PathLike"
    ids = calibration(ckpt, 2, 32, 1)
    as_lists = offq.quantize(ckpt, cfg, ids.tolist(), progress=False)  # was read as texts
    as_array = offq.quantize(ckpt, cfg, ids, progress=False)
    for name, t in as_array.tensors.items():
        np.testing.assert_array_equal(as_lists.tensors[name], t, err_msg=name)
    with pytest.raises(ValueError, match="^calibration: token ids go as \\[samples, seqlen\\]"):
        offq.quantize(ckpt, cfg, ids[0].tolist(), progress=False)  # read as a list of texts
    with pytest.raises(ValueError, match="^calibration: token id sequences must share one"):
        offq.quantize(ckpt, cfg, [ids[0].tolist(), ids[1, :20].tolist()], progress=False)
    with caplog.at_level(logging.WARNING, logger="offq.api"):  # RTN: nothing to calibrate
        offq.quantize(ckpt, offq.QuantConfig(method="rtn"), "no-such-corpus", progress=False)
    assert any("calibration ignored" in r.getMessage() for r in caplog.records)


def test_load_names_source_given_with_a_state_dict(rtn_result) -> None:
    src, ckpt, _ = rtn_result
    with pytest.raises(TypeError, match="^source: with state_dict=, the model's HF config"):
        offq.load(src, dict(ckpt.tensors))


def test_a_result_of_a_model_in_memory_has_no_source_and_runs_with_its_tokenizer(
        rtn_result, tmp_path, monkeypatch) -> None:
    """An in-memory model's label path "<in-memory>" was taken for its source (a directory of
    that name was refused by save); QuantizeResult.model() had no tokenizer, so generate and
    perplexity on text failed with "the model has none"."""
    src, ckpt, res = rtn_result
    memory = offq.load(ckpt.config.to_hf(), dict(ckpt.tensors), tokenizer=src)
    result = offq.quantize(memory, offq.QuantConfig(**RTN), progress=False)
    assert result.source is None
    monkeypatch.chdir(tmp_path)
    offq.save(result, "<in-memory>")
    offq.quantize(memory, offq.QuantConfig(**RTN), out_dir="<in-memory>", progress=False)
    model = res.model("real")
    assert model.tokenizer is res.tokenizer is not None
    cfg = GenerationConfig(max_new_tokens=3)
    assert generate(model, None, "w3 w4", cfg) == generate(model, res.tokenizer, "w3 w4", cfg)
    assert np.isfinite(offq.perplexity(model, words(80), seqlen=32, quiet=True)["ppl"])


def test_quant_config_refuses_what_it_would_run_as_something_else() -> None:
    with pytest.raises(ValueError, match="^w_quantizer: method 'rtn' rounds weights to nearest"):
        offq.QuantConfig(method="rtn", w_quantizer="gptq")  # ran GPTQ, recorded as rtn
    assert offq.QuantConfig(method="rtn", w_quantizer="osaq+rtn").w_quantizer == "osaq+rtn"
    torch = None
    try:
        import torch
    except ImportError:
        pass
    if torch is not None:  # a 0-d tensor looked like a NumPy scalar: AttributeError on .kind
        with pytest.raises(ValueError, match="^w_bits: expected one of"):
            offq.QuantConfig(w_bits=torch.tensor(3))
    for bad in (dict(a_clip=True), dict(lm_head_bits=8.0), dict(calib_seqlen=1)):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))}: expected"):
            offq.QuantConfig(**bad)
    # NumPy scalars are what they say (and stored as the Python values JSON writes)
    cfg = offq.QuantConfig(w_bits=np.int64(4), calib_samples=np.int64(2),
                           a_clip=np.float32(0.5), r3=np.bool_(False))
    assert (type(cfg.w_bits), type(cfg.calib_samples), type(cfg.a_clip), type(cfg.r3)) == \
        (int, int, float, bool)
    json.dumps(cfg.to_dict())


def test_bool_arguments_are_booleans(rtn_result, tmp_path) -> None:
    src, _, res = rtn_result
    offq.save(res, tmp_path / "q")
    with pytest.raises(ValueError, match="^resident: expected True or False"):
        offq.load_quantized(tmp_path / "q", resident="no")  # read as True
    with pytest.raises(ValueError, match="^validate: expected True or False"):
        offq.open_checkpoint(src, validate="no")
    offq.load_quantized(tmp_path / "q", resident=np.bool_(False))  # NumPy's bools are bools
    offq.open_checkpoint(src, validate=np.bool_(False))
    with pytest.raises(TypeError, match="^path: expected an offq checkpoint directory"):
        offq.load_quantized(3)


def test_fused_mode_says_which_models_it_runs(rtn_result) -> None:
    _, ckpt, _ = rtn_result
    w4a8 = pipeline.quantize(ckpt, offq.QuantConfig(method="offq", w_quantizer="rtn", a_bits=8,
                                                    kv_bits=8),
                             calibration(ckpt, 2, 32, 1), progress=False)
    with pytest.raises(ValueError, match="^mode 'fused': the C decoders run W4A4KV4 and "
                                         "weight-only models, not offq W4A8KV8"):
        w4a8.model("fused")  # said "model: layer 0 has no fused q/k/v and gate/up linears"
    weight_only = pipeline.quantize(ckpt, offq.QuantConfig(**RTN, a_bits=16, kv_bits=16),
                                    calibration(ckpt, 2, 32, 1), progress=False)
    with pytest.raises(ValueError, match="^mode 'fused': attention: 'int8' runs over the "
                                         "W4A4KV4 decoder's 4-bit KV cache[^;]*$"):
        weight_only.model("fused", attention="int8")  # said weight-only models do not run


# ------------------------------------------------------------------------------ generation
def test_generation_names_what_it_cannot_use(rtn_result, tmp_path) -> None:
    src, _, res = rtn_result
    offq.save(res, tmp_path / "q")
    model, tok, _ = offq.load_quantized(tmp_path / "q")
    cfg = GenerationConfig(max_new_tokens=3)
    with pytest.raises(ValueError, match="^prompt_ids: expected one prompt"):
        list(generate_ids(model, [[3, 4], [5, 6]], cfg))  # ran as the prompt [3, 4, 5, 6]
    with pytest.raises(ValueError, match="^prompt_ids: 600 tokens exceed the model's context"):
        list(generate_ids(model, [3] * 600, cfg))
    with pytest.raises(TypeError, match="^cfg: expected an offq.generate.GenerationConfig"):
        generate(model, tok, "w3 w4", None)  # AttributeError: no attribute 'seed'
    with pytest.raises(TypeError, match="^model: expected a runnable offq Model"):
        generate(res, tok, "w3 w4", cfg)  # AttributeError: no attribute 'config'
    with pytest.raises(TypeError, match="^on_token: expected a callable"):
        generate(model, tok, "w3 w4", cfg, on_token=5)  # failed after the prefill
    with pytest.raises(TypeError, match="^prompt: expected a str"):
        generate(model, tok, [3, 4], cfg)
    assert generate(model, None, "w3 w4", cfg) == generate(model, tok, "w3 w4", cfg)
    with pytest.raises(ValueError, match="^prompt_ids: expected one prompt .* different lengths"):
        list(generate_ids(model, [[3, 4], [5]], cfg))  # NumPy's "inhomogeneous shape"
    want = list(generate_ids(model, [3, 4], cfg))
    assert list(generate_ids(model, np.array([[3, 4]]), cfg)) == want  # return_tensors="np"
    import tokenizers  # the backend of a transformers tokenizer: its encode() takes no add_bos
    backend = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    assert generate(model, backend, "w3 w4", cfg) == generate(model, tok, "w3 w4", cfg)
    import dataclasses
    model.config = dataclasses.replace(model.config, add_bos=True, bos_token_id=1)
    prompts: list = []
    model_forward = model.forward
    model.forward = lambda ids, **kw: prompts.append(ids[0].tolist()) or model_forward(ids, **kw)
    generate(model, backend, "w3 w4", GenerationConfig(max_new_tokens=1))  # BOS was dropped
    assert prompts[0] == [1, 3, 4]
    model.forward = model_forward
    with pytest.raises(TypeError, match="^tokenizer: expected a path"):
        generate(model, object(), "w3 w4", cfg)  # AttributeError: no attribute 'bos_id'
    with pytest.raises(ValueError, match="^stop_at_eos: expected True or False"):
        GenerationConfig(stop_at_eos="no")  # read as True
    assert GenerationConfig(temperature=np.float32(0.5)).temperature == 0.5


# ------------------------------------------------------------------------------ import
def test_a_source_tree_without_its_c_core_says_how_to_build_it(tmp_path) -> None:
    """`import offq` from a clone's root (python -m offq, a notebook started there) after a
    non-editable install imports the clone's offq, whose _C is not built: Python said only
    "cannot import name '_C' from partially initialized module 'offq' (most likely due to a
    circular import)"."""
    import os
    import shutil
    import subprocess
    import sys

    src = Path(offq.__file__).resolve().parent
    shutil.copytree(src, tmp_path / "offq",
                    ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    (tmp_path / "offq" / "_C.cpython-39-x86_64-linux-gnu.so").write_bytes(b"")  # another Python's
    # python -S: site-packages on the path without its .pth files, so that an editable
    # install's finder (this checkout's, in a development venv) cannot answer "offq"
    site_packages = str(Path(np.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = site_packages
    run = subprocess.run([sys.executable, "-S", "-c", "import offq"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert (f"offq's C core (offq._C) is not built in {tmp_path / 'offq'}: this is a source tree. "
            "Build it there (pip install -e . or python setup.py build_ext --inplace)") \
        in run.stderr, run.stderr
    assert "circular import" not in run.stderr


def test_benchmark_scripts_import_an_offq_that_runs() -> None:
    """`python benchmarks/X.py` from a clone after the README's `pip install .` (this suite's own
    setting in CI): every script put the clone's root first on sys.path, and the clone's offq
    has no built C core, so each stopped with an ImportError. benchmarks/source_tree.py puts the
    root first only when offq/_C.* is built there. (With an editable install both pass.)"""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    for script in ("bench_e2e.py", "bench_kernels.py"):  # both import offq at the top
        run = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--help"],
                             cwd=root, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "usage:" in run.stdout, (script, run.stderr[-2000:])
