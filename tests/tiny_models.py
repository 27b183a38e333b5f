"""Tiny random Llama/Qwen2 checkpoints with an LLM-like massive activation, and calibration ids
for them: shared by the pipeline and runtime tests (real code paths, small sizes)."""
from types import SimpleNamespace

import numpy as np

from offq.model.config import ModelConfig


def tiny_checkpoint(seed=0, *, arch="llama", layers=2, d=64, hd=16, nh=4, nkv=2, f=128, v=101,
                    tie=None, attention_bias=None, mlp_bias=False, massive=40.0,
                    massive_channel=None):
    """A random Llama/Qwen2 with LLM-like massive activations: one residual direction carries a
    large offset (``massive``) on the first token (planted through the embedding of token 0).
    Defaults: Llama tied without biases, Qwen2 untied with its q/k/v biases; ``attention_bias`` /
    ``mlp_bias`` add Llama's optional biases (q/k/v/o, gate/up/down).

    ``massive_channel=c`` plants a persistent massive channel instead (Llama only; the same
    random weights otherwise): layer 0's o_proj bias writes ``massive`` on residual channel ``c``
    of every token, so layer 0's attention input is clean and every later linear input (from
    layer 0's MLP on) carries it. The RMSNorms that read the residual from there on scale the
    other channels back to their usual size and give ``c`` a small weight (the final norm none):
    the float model hardly reads the outlier, but an activation quantizer sees it in full. The
    float predictions then depend on the other channels only; quality stays measurable.
    Token 0's embedding gets no offset in that mode."""
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
    if massive_channel is not None and (arch != "llama" or not attention_bias):
        raise ValueError("massive_channel: needs a Llama with attention_bias=True (o_proj bias)")
    u = np.abs(rng.standard_normal(d)).astype(np.float32)
    if massive_channel is None:
        w["model.embed_tokens.weight"][0] += massive * u / np.linalg.norm(u)  # massive token
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
    if massive_channel is not None:
        c = massive_channel
        w["model.layers.0.self_attn.o_proj.bias"][c] += massive
        gain = np.float32(np.sqrt(1 + massive ** 2 / d))  # 1 / rms shrink of the other channels
        for name in [n for n in w if n.endswith("norm.weight")]:
            if name != "model.layers.0.input_layernorm.weight":  # reads the clean embeddings
                w[name] = w[name] * gain
                w[name][c] = 0.0 if name == "model.norm.weight" else 1 / gain
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


def head_bits_checkpoint(directory, lm_head_bits):
    """A tiny llama (tied embeddings: offq gives the head its own copy) quantized with OffQ twice:
    with the float32 head (returned as a QuantizeResult) and with ``lm_head_bits``, written to
    ``directory`` and loaded back -> (ckpt, float-head result, loaded model, its QuantConfig)."""
    from offq.config import QuantConfig
    from offq.quant.assemble import load_quantized
    from offq.recipe import pipeline

    ckpt = tiny_checkpoint(1, arch="llama")
    calib = calibration(ckpt, 4, 32, 1)
    fp_head = pipeline.quantize(ckpt, QuantConfig(method="offq"), calib, progress=False)
    pipeline.quantize(ckpt, QuantConfig(method="offq", lm_head_bits=lm_head_bits), calib,
                      out_dir=directory, progress=False)
    model, _, cfg = load_quantized(directory, mode="real")
    return ckpt, fp_head, model, cfg


def with_source_id(ckpt):
    """Give an in-memory tiny checkpoint a ``source_id()`` over its tensor values (what a real
    ``Checkpoint.source_id`` hashes from its files), computed when called, so that editing a
    value afterwards changes it."""
    import hashlib

    def source_id():
        h = hashlib.sha256()
        for name in sorted(ckpt.tensors):
            h.update(name.encode())
            h.update(np.ascontiguousarray(ckpt.tensors[name]).tobytes())
        return h.hexdigest()

    ckpt.source_id = source_id
    return ckpt


def write_word_tokenizer(directory, vocab_size):
    """A word-level tokenizer.json for a tiny model: ``<unk>``, ``<s>``, ``</s>``, then ``w3`` ..
    ``w{vocab_size - 1}``, split on whitespace (text "w3 w4 w5" encodes to ids 3, 4, 5)."""
    import tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
