"""ModelConfig from HF config.json dicts (Llama 2/3/3.1/3.2, SmolLM, Mistral, Qwen2) and back."""
from __future__ import annotations

import logging

import pytest

from offq.model.config import ModelConfig

SMOLLM2_135M = {  # the published config.json of SmolLM2-135M-Instruct (sizes only)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000,
    "rope_scaling": None, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21,
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
}


def test_smollm2():
    c = ModelConfig.from_hf(SMOLLM2_135M)
    assert (c.architecture, c.head_dim, c.q_dim, c.kv_dim) == ("llama", 64, 576, 192)
    assert c.tie_word_embeddings and not c.attention_bias and c.rope_scaling is None
    shapes = c.tensor_shapes()
    assert "lm_head.weight" not in shapes and len(shapes) == 2 + 30 * 9
    assert shapes["model.layers.3.self_attn.k_proj.weight"] == (192, 576)


def test_llama31_rope_scaling_and_eos_list():
    c = ModelConfig.from_hf(LLAMA31_8B)
    assert c.rope_scaling == LLAMA31_8B["rope_scaling"]
    assert c.eos_token_id == 128001 and c.rope_theta == 500000.0
    assert "lm_head.weight" in c.tensor_shapes()


def test_legacy_type_key_and_rope_parameters():
    legacy = dict(LLAMA31_8B, rope_scaling={**LLAMA31_8B["rope_scaling"]})
    legacy["rope_scaling"]["type"] = legacy["rope_scaling"].pop("rope_type")
    assert ModelConfig.from_hf(legacy).rope_scaling["rope_type"] == "llama3"
    v5 = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    c = ModelConfig.from_hf(v5)
    assert c.rope_theta == 500000.0 and c.rope_scaling == LLAMA31_8B["rope_scaling"]
    plain = dict(SMOLLM2_135M, rope_scaling=None, rope_theta=None,
                 rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    c = ModelConfig.from_hf(plain)
    assert c.rope_scaling is None and c.rope_theta == 100000.0


def test_mistral_sliding_window_caps_positions(caplog):
    with caplog.at_level(logging.WARNING):
        c = ModelConfig.from_hf(MISTRAL_7B_V01)
    assert c.architecture == "llama" and c.max_position_embeddings == 4096
    assert "sliding_window" in caplog.text
    c = ModelConfig.from_hf(dict(MISTRAL_7B_V01, sliding_window=None))
    assert c.max_position_embeddings == 32768


def test_qwen2_biases_and_disabled_window():
    c = ModelConfig.from_hf(QWEN25_05B)
    assert c.architecture == "qwen2" and c.attention_bias and c.max_position_embeddings == 32768
    assert c.tensor_shapes()["model.layers.0.self_attn.k_proj.bias"] == (128,)
    on = dict(QWEN25_05B, use_sliding_window=True, sliding_window=4096)
    assert ModelConfig.from_hf(on).max_position_embeddings == 4096


@pytest.mark.parametrize("cfg,match", [
    ({**SMOLLM2_135M, "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "'gemma2'"),
    ({**SMOLLM2_135M, "model_type": "gpt2"}, "'gpt2'"),
    ({k: v for k, v in SMOLLM2_135M.items() if k != "model_type"} | {"architectures": ["MixtralForCausalLM"]},
     "MixtralForCausalLM"),
    ({**SMOLLM2_135M, "architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
])
def test_unsupported_architectures_named_with_supported_list(cfg, match):
    with pytest.raises(ValueError, match=match) as info:
        ModelConfig.from_hf(cfg)
    assert "qwen2" in str(info.value).lower() and "llama" in str(info.value).lower()


@pytest.mark.parametrize("change,match", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"num_key_value_heads": 4}, "multiple"),
    ({"hidden_size": None}, "hidden_size"),
    ({"bos_token_id": 10**6}, "bos_token_id"),
    ({"hidden_size": 576.5}, "hidden_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"vocab_size": "49152"}, "vocab_size"),
    ({"num_attention_heads": [9]}, "num_attention_heads"),
    ({"rms_norm_eps": {"a": 1}}, "rms_norm_eps: expected a number"),
    ({"model_type": ["llama"]}, "wrong type|unsupported"),
    ({"rope_scaling": "llama3"}, "rope_scaling"),
    # values from corrupt or hostile files: refused before anything is sized by them
    ({"num_hidden_layers": 10**12}, "num_hidden_layers: 1000000000000 exceeds offq's limit 4096"),
    ({"vocab_size": 2**40}, "vocab_size: .* exceeds"),
    ({"hidden_size": float("nan")}, "hidden_size: expected an integer, got nan"),
    ({"hidden_size": float("inf")}, "hidden_size: expected an integer"),
    ({"rms_norm_eps": 1e308}, r"rms_norm_eps: expected a number in \(0, 1\)"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps: expected a number"),
    ({"rope_theta": float("inf")}, "rope_theta: expected a finite number > 0"),
    ({"rope_theta": "abc"}, "rope_theta: expected a number"),
    # finite and positive, but the RoPE angles overflow float32: every forward was NaN
    ({"rope_theta": 1e-300}, "rope_theta: RoPE angles overflow float32"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 1e-300}},
     "rope_theta / rope_scaling: RoPE angles overflow float32"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 1e-36}},
     "rope_theta / rope_scaling: RoPE angles overflow"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "'factor' expected a finite number > 0"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "abc"}}, "'factor' expected a finite"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                       "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}},
     "low_freq_factor 4.0 must be below high_freq_factor 1.0"),
    # JSON of the wrong kind, named by its key (not a wrong value read silently)
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings: expected true or false, got 'false'"),
    ({"attention_bias": "yes"}, "attention_bias: expected true or false"),
    ({"architectures": "LlamaForCausalLM"}, "architectures: expected a list of class names"),
    ({"pretraining_tp": "x"}, "pretraining_tp: expected an integer"),
    ({"model_type": "mistral", "sliding_window": "abc"}, "sliding_window: expected an integer"),
    ({"model_type": "mistral", "sliding_window": -5}, "sliding_window: expected a positive integer"),
    # int("abc") named no field, and int(1.7) read a token id of 1
    ({"bos_token_id": "abc"}, "bos_token_id: expected an integer, got 'abc'"),
    ({"eos_token_id": 1.7}, "eos_token_id: expected an integer, got 1.7"),
    ({"eos_token_id": [True]}, "eos_token_id: expected an integer, got True"),
])
def test_invalid_configs(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({**SMOLLM2_135M, **change})


@pytest.mark.parametrize("cfg", [SMOLLM2_135M, LLAMA31_8B, QWEN25_05B])
def test_to_hf_round_trip(cfg):
    c = ModelConfig.from_hf(cfg, add_bos=True)
    back = ModelConfig.from_hf(c.to_hf())
    assert back == c and back.add_bos


@pytest.mark.parametrize("cfg", [SMOLLM2_135M, LLAMA31_8B, QWEN25_05B, MISTRAL_7B_V01])
def test_transformers_reads_to_hf_and_we_read_transformers(cfg):
    transformers = pytest.importorskip("transformers")
    c = ModelConfig.from_hf(cfg)
    hf_cls = transformers.Qwen2Config if c.architecture == "qwen2" else transformers.LlamaConfig
    hf_cfg = hf_cls(**{k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type")})
    assert hf_cfg.num_key_value_heads == c.num_key_value_heads
    again = ModelConfig.from_hf(hf_cfg.to_dict())
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias",
              "bos_token_id", "eos_token_id"):
        assert getattr(again, f) == getattr(c, f), f


def test_wrongly_typed_values_only_raise_value_error():
    """Every key of a real config replaced by values of other JSON types: ValueError or success."""
    junk = [None, True, -3, 0, 2.5, "x", [], [1, 2], {}, {"rope_type": "llama3"}, 10**30]
    for base in (SMOLLM2_135M, LLAMA31_8B, QWEN25_05B, MISTRAL_7B_V01):
        for key in base:
            for value in junk:
                try:
                    ModelConfig.from_hf({**base, key: value})
                except ValueError:
                    pass


def test_llama_optional_biases_are_read_and_written():
    """HF Llama's attention_bias (q/k/v/o) and mlp_bias (gate/up/down) travel through the config,
    and the architecture lists the bias tensors they imply."""
    cfg = ModelConfig.from_hf({**SMOLLM2_135M, "attention_bias": True, "mlp_bias": True})
    assert cfg.attention_bias and cfg.mlp_bias
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    shapes = cfg.tensor_shapes()
    for lin in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert f"model.layers.0.{lin}.bias" in shapes
    assert "model.layers.0.self_attn.o_proj.bias" not in ModelConfig.from_hf(SMOLLM2_135M).tensor_shapes()
