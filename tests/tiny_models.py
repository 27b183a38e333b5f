"""Tiny random Llama/Qwen2 checkpoints with an LLM-like massive activation, and calibration ids
for them: shared by the pipeline and runtime tests (real code paths, small sizes)."""
from types import SimpleNamespace

import numpy as np

from offq.model.config import ModelConfig


def tiny_checkpoint(seed=0, *, arch="llama", layers=2, d=64, hd=16, nh=4, nkv=2, f=128, v=101,
                    tie=None, attention_bias=None, mlp_bias=False, massive=40.0):
    """A random Llama/Qwen2 with LLM-like massive activations: one residual direction carries a
    large offset (``massive``) on the first token (planted through the embedding of token 0).
    Defaults: Llama tied without biases, Qwen2 untied with its q/k/v biases; ``attention_bias`` /
    ``mlp_bias`` add Llama's optional biases (q/k/v/o, gate/up/down)."""
    rng = np.random.default_rng(seed)
    tie = (arch == "llama") if tie is None else tie
    attention_bias = (arch == "qwen2") if attention_bias is None else attention_bias
    cfg = ModelConfig(architecture=arch, vocab_size=v, hidden_size=d, intermediate_size=f,
                      num_hidden_layers=layers, num_attention_heads=nh, num_key_value_heads=nkv,
                      head_dim=hd, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                      attention_bias=attention_bias, mlp_bias=mlp_bias,
                      max_position_embeddings=512)
    f32 = lambda *s, scale=0.1: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": f32(v, d, scale=1.0), "model.norm.weight": 1 + f32(d)}
    u = np.abs(rng.standard_normal(d)).astype(np.float32)
    w["model.embed_tokens.weight"][0] += massive * u / np.linalg.norm(u)  # massive-activation token
    if not tie:
        w["lm_head.weight"] = f32(v, d)
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + f32(d)
        w[p + "post_attention_layernorm.weight"] = 1 + f32(d)
        for name, shape in [("self_attn.q_proj", (nh * hd, d)), ("self_attn.k_proj", (nkv * hd, d)),
                            ("self_attn.v_proj", (nkv * hd, d)), ("self_attn.o_proj", (d, nh * hd)),
                            ("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)),
                            ("mlp.down_proj", (d, f))]:
            w[p + name + ".weight"] = f32(*shape)
    for name, shape in cfg.tensor_shapes().items():  # the biases the config implies
        if name.endswith(".bias"):
            w[name] = f32(*shape)
    return SimpleNamespace(name=f"tiny-{arch}", config=cfg, tensors=w, tokenizer=None)


def token_ids(vocab, n, t, seed):
    """``[n, t]`` random ids in ``[1, vocab)``, each sequence opened by the massive-activation
    token 0."""
    ids = np.random.default_rng(seed).integers(1, vocab, (n, t))
    ids[:, 0] = 0
    return ids


def calibration(ckpt, n=8, t=48, seed=1):
    """Calibration ids for a tiny checkpoint (:func:`token_ids` over its vocabulary)."""
    return token_ids(ckpt.config.vocab_size, n, t, seed)
