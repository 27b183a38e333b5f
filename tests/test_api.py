"""The Python API for scripts: offq.load (names, paths, and a transformers model in memory),
offq.quantize (calibrating by itself), offq.perplexity, offq.save / offq.load_quantized.

The in-memory tests hand offq what a transformers script holds: ``model.config.to_dict()`` and
``model.state_dict()`` of a ``LlamaForCausalLM`` carrying the real default model's weights
(SmolLM2-135M-Instruct), in float32 and in bfloat16."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
import tokenizers.processors

import offq
from offq.formats.checkpoint import CONFIG_FILE, MODEL_FILE, load_safetensors
from offq.model import Model

torch = pytest.importorskip("torch", reason="torch is the test-only reference (pip install .[test])")
transformers = pytest.importorskip("transformers", reason="test-only reference")

PROMPT = "The quick brown fox jumps over the lazy dog. Offsets absorb outliers:"
SMALL = dict(method="offq", w_quantizer="rtn", calib_samples=2, calib_seqlen=64)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_checkpoint, smollm2_tensors):
    """transformers' LlamaForCausalLM holding the default model's (dequantized) weights."""
    cfg = smollm2_checkpoint.config.to_hf()
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in smollm2_tensors.items()},
                        strict=False)
    return ref


def test_public_names_are_documented() -> None:
    for name in offq.__all__:
        obj = getattr(offq, name)
        assert name == "__version__" or (obj.__doc__ and len(obj.__doc__) > 40), name
    assert "offq.load" in offq.__doc__ and "offq.quantize" in offq.__doc__


def test_load_a_transformers_model_in_memory(hf_smollm2, smollm2_checkpoint,
                                             smollm2_tensors) -> None:
    tok = smollm2_checkpoint.tokenizer
    ckpt = offq.load(hf_smollm2.config.to_dict(), hf_smollm2.state_dict(),
                     tokenizer=tok.backend, name="smollm2-in-memory")
    assert ckpt.name == "smollm2-in-memory" and ckpt.source_format == "memory"
    assert ckpt.config == smollm2_checkpoint.config.replace(add_bos=ckpt.config.add_bos)
    assert ckpt.tokenizer.encode(PROMPT) == tok.encode(PROMPT)
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(ckpt.tensors[name], smollm2_tensors[name])
    ids = np.asarray([tok.encode(PROMPT)])
    got = Model.from_checkpoint(ckpt).forward(ids)
    with torch.no_grad():
        want = hf_smollm2(torch.from_numpy(ids)).logits.numpy()
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
    # parameters that still require grad are read too (detached), and the source is untouched
    params = dict(hf_smollm2.named_parameters())
    before = params["model.norm.weight"].detach().clone()
    ckpt2 = offq.load(hf_smollm2.config, params)
    ckpt2.tensors["model.norm.weight"][:] = 0.0
    assert torch.equal(params["model.norm.weight"].detach(), before)
    assert ckpt2.tokenizer is None


def test_bfloat16_state_dict_is_read_exactly(hf_smollm2) -> None:
    sd = {k: v.to(torch.bfloat16) for k, v in hf_smollm2.state_dict().items()}
    ckpt = offq.load(hf_smollm2.config.to_dict(), sd)
    name = "model.layers.3.mlp.down_proj.weight"
    assert ckpt.tensors.dtype(name) == "BF16"
    np.testing.assert_array_equal(ckpt.tensors[name], sd[name].float().numpy())
    assert ckpt.describe()["tensor_types"] == {"BF16": len(sd)}


def test_in_memory_quantization_equals_the_file_path(hf_smollm2, smollm2_checkpoint,
                                                     tmp_path) -> None:
    """The same weights quantized from the GGUF file and from a state dict in memory give the
    same checkpoint (the in-memory source is not a second implementation); save() writes what
    out_dir= writes."""
    cfg = offq.QuantConfig(**SMALL)
    from_file = offq.quantize(smollm2_checkpoint, cfg, out_dir=tmp_path / "file", progress=False)
    mem = offq.load(hf_smollm2.config.to_dict(), hf_smollm2.state_dict(),
                    tokenizer=smollm2_checkpoint.tokenizer.backend)
    in_memory = offq.quantize(mem, cfg, progress=False)
    assert from_file.tensors is None and in_memory.tensors is not None
    offq.save(in_memory, tmp_path / "mem")
    a, _ = load_safetensors(tmp_path / "file" / MODEL_FILE)
    b, _ = load_safetensors(tmp_path / "mem" / MODEL_FILE)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ca = json.loads((tmp_path / "file" / CONFIG_FILE).read_text())["offq"]
    cb = json.loads((tmp_path / "mem" / CONFIG_FILE).read_text())["offq"]
    assert ca["calibration"] == cb["calibration"]  # same tokens drawn: same hash
    assert ca["quant_config"] == cb["quant_config"]
    model, tok, qcfg = offq.load_quantized(tmp_path / "mem")
    assert qcfg == cfg and tok is not None
    text = smollm2_checkpoint.tokenizer.encode(PROMPT * 8)
    p_saved = offq.perplexity(tmp_path / "mem", text, seqlen=64, max_windows=1, quiet=True)
    p_result = offq.perplexity(in_memory, text, seqlen=64, max_windows=1, quiet=True)
    assert p_saved["nll"] == p_result["nll"]  # bit-identical after the round trip


def test_perplexity_defaults_to_the_shipped_wikitext2(smollm2_checkpoint) -> None:
    res = offq.perplexity(smollm2_checkpoint, seqlen=128, max_windows=1, quiet=True)
    assert res["dataset"] == "wikitext2" and res["windows"] == 1 and res["tokens"] == 127
    assert 5 < res["ppl"] < 100


def test_load_rejects_what_it_cannot_open(tmp_path, smollm2_tensors, hf_smollm2) -> None:
    with pytest.raises(TypeError, match="source"):
        offq.load(42)
    with pytest.raises(ValueError, match="tokenizer"):
        offq.load("smollm2-135m", tokenizer="x")
    with pytest.raises(FileNotFoundError):
        offq.load(tmp_path / "nothing-here")
    cfg = hf_smollm2.config.to_dict()
    sd = dict(smollm2_tensors)
    del sd["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.2.mlp.up_proj.weight"):
        offq.load(cfg, sd)
    with pytest.raises(TypeError, match="state_dict"):
        offq.load(cfg, [1, 2, 3])
    with pytest.raises(TypeError, match="not numeric"):
        offq.load(cfg, {**smollm2_tensors, "model.norm.weight": np.array(["a"] * 576)}
                  ).tensors["model.norm.weight"]
    # a quantized checkpoint is opened with load_quantized, and save wants a QuantizeResult
    out = offq.quantize("smollm2-135m", offq.QuantConfig(method="rtn"), out_dir=tmp_path / "q",
                        progress=False)
    with pytest.raises(ValueError, match="load_quantized"):
        offq.load(tmp_path / "q")
    with pytest.raises(ValueError, match="already on disk"):
        offq.save(out, tmp_path / "again")
    with pytest.raises(TypeError, match="QuantizeResult|offq.quantize"):
        offq.save({}, tmp_path / "x")


@pytest.mark.parametrize("model", [None, {"config": {}}, np.zeros(3)])
def test_quantize_names_a_model_of_the_wrong_type(model) -> None:
    # it failed as "calibration: the model has no tokenizer ..."
    with pytest.raises(TypeError, match="^model: expected a Checkpoint .* got "):
        offq.quantize(model, offq.QuantConfig())


def test_perplexity_names_a_tokenizer_of_the_wrong_type(smollm2_checkpoint) -> None:
    # it ended in "AttributeError: 'int' object has no attribute 'encode'"
    with pytest.raises(TypeError, match="^tokenizer: expected a path, a tokenizers.Tokenizer"):
        offq.perplexity(smollm2_checkpoint, "hello world " * 20, tokenizer=42, seqlen=16,
                        max_windows=1, quiet=True)


def test_an_in_memory_tokenizer_with_padding_is_probed_unpadded(smollm2_checkpoint) -> None:
    """A backend with left padding set (as a transformers pipeline may leave it): the BOS probe
    used to see the pad token first; offq's copy drops padding, the caller's object keeps it."""
    from offq.formats.memory import as_tokenizer

    backend = tokenizers.Tokenizer.from_str(smollm2_checkpoint.tokenizer.backend.to_str())
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])  # prepends BOS (id 1)

    class HFLike:  # what offq reads of a transformers fast tokenizer
        backend_tokenizer, bos_token_id, eos_token_id, name_or_path = backend, 1, 2, "hf-like"
    backend.enable_padding(direction="left", pad_id=0, pad_token="<|endoftext|>", length=8)
    tok = as_tokenizer(HFLike())
    assert tok.adds_bos and tok.bos_id == 1
    assert tok.encode("Hello, world!") == smollm2_checkpoint.tokenizer.encode("Hello, world!")
    assert backend.padding is not None  # the caller's tokenizer is left as it was
