"""offq's own safetensors reader/writer: round trips vs the reference package, hostile files,
HF checkpoint directories (single and sharded) saved by transformers."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from offq.formats import open_checkpoint
from offq.formats.files import MAX_JSON_BYTES
from offq.formats.safetensors import (
    HFTensorStore, SafetensorsFile, SafetensorsWriter, bf16_to_f32, f32_to_bf16, load_safetensors,
    read_header, write_safetensors,
)

RNG = np.random.default_rng(0)


def _sample_tensors() -> dict[str, np.ndarray]:
    return {
        "w": RNG.standard_normal((5, 7)).astype(np.float32),
        "codes": RNG.integers(0, 256, (3, 9), dtype=np.uint8),
        "sums": RNG.integers(-1000, 1000, (4,), dtype=np.int32),
        "half": RNG.standard_normal((2, 3)).astype(np.float16),
        "dbl": RNG.standard_normal(3),
        "i64": np.arange(5, dtype=np.int64),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(3.5, np.float32),
        "flag": np.array([True, False]),
    }


def _raw_file(path: Path, header: dict | bytes, data: bytes = b"", n: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if n is None else n) + blob + data)
    return path


# ---------------------------------------------------------------------- round trips
def test_write_read_round_trip(tmp_path):
    t = _sample_tensors()
    write_safetensors(tmp_path / "a.safetensors", t, {"format": "offq", "v": "1"})
    back, meta = load_safetensors(tmp_path / "a.safetensors")
    assert meta == {"format": "offq", "v": "1"}
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and back[k].shape == t[k].shape
        assert np.array_equal(back[k], t[k]), k
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]   # no temp files left


def test_layout_aligned_and_gap_free(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", _sample_tensors())
    infos, _, size = read_header(tmp_path / "a.safetensors")
    spans = sorted((i.begin, i.end, i.dtype) for i in infos.values())
    n = int.from_bytes((tmp_path / "a.safetensors").read_bytes()[:8], "little")
    assert n % 8 == 0
    assert spans[0][0] == 8 + n and spans[-1][1] == size
    for (b0, e0, _), (b1, _, _) in zip(spans, spans[1:]):
        assert e0 == b1
    for info in infos.values():
        assert (info.begin - 8 - n) % max(1, np.dtype(_np(info.dtype)).itemsize) == 0


def _np(st: str) -> str:
    return {"F64": "f8", "F32": "f4", "F16": "f2", "I64": "i8", "I32": "i4", "U8": "u1",
            "BOOL": "?"}.get(st, "u1")


def test_against_reference_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    t = _sample_tensors()
    write_safetensors(tmp_path / "ours.safetensors", t, {"k": "v"})
    ref = st.load_file(str(tmp_path / "ours.safetensors"))
    for k in t:
        assert ref[k].dtype == t[k].dtype and np.array_equal(ref[k], t[k]), k
    st.save_file(t, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    with SafetensorsFile(tmp_path / "theirs.safetensors") as f:
        assert f.metadata == {"k": "v"}
        for k in t:
            assert np.array_equal(f.raw(k), t[k]), k


def test_bf16_against_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    x = torch.randn(17, 33) * 100
    x[0, 0], x[0, 1] = float("inf"), -0.0
    st.save_file({"x": x.to(torch.bfloat16), "y": x.to(torch.float16)}, str(tmp_path / "b.safetensors"))
    with SafetensorsFile(tmp_path / "b.safetensors") as f:
        assert f.tensors["x"].dtype == "BF16"
        got = f.float32("x")
        assert got.dtype == np.float32
        assert np.array_equal(got, x.to(torch.bfloat16).float().numpy())
        assert np.array_equal(f.float32("y"), x.to(torch.float16).float().numpy())
    v = x.numpy().astype(np.float32)
    ref_bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(f32_to_bf16(v), ref_bits)
    assert np.array_equal(bf16_to_f32(ref_bits), x.to(torch.bfloat16).float().numpy())


def test_float32_rejects_integer_tensor(tmp_path):
    write_safetensors(tmp_path / "c.safetensors", {"codes": np.zeros(4, np.uint8)})
    with SafetensorsFile(tmp_path / "c.safetensors") as f:
        with pytest.raises(ValueError, match="codes.*U8"):
            f.float32("codes")


def test_writer_failure_leaves_nothing(tmp_path):
    target = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="complex"):
        write_safetensors(target, {"ok": np.zeros(3, np.float32), "bad": np.zeros(2, np.complex64)})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="twice"):
        with SafetensorsWriter(target) as w:
            w.add("a", np.zeros(1, np.float32))
            w.add("a", np.zeros(1, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_a_mapping_is_written_straight_with_the_writers_bytes(tmp_path, monkeypatch):
    """write_safetensors of a mapping skips SafetensorsWriter's spill file; the bytes are the
    writer's whatever the order tensors come in (non-contiguous and big-endian arrays included),
    and a failure before the rename (here: fsync) leaves nothing behind."""
    t = _sample_tensors()
    t["strided"] = RNG.standard_normal((6, 8)).astype(np.float32)[::2, 1::3]
    t["big_endian"] = np.arange(6, dtype=">i4").reshape(2, 3)
    write_safetensors(tmp_path / "straight.safetensors", t, {"format": "offq"})
    with SafetensorsWriter(tmp_path / "staged.safetensors", {"format": "offq"}) as w:
        for name in reversed(list(t)):
            w.add(name, t[name])
    assert (tmp_path / "straight.safetensors").read_bytes() == \
        (tmp_path / "staged.safetensors").read_bytes()
    back, _ = load_safetensors(tmp_path / "straight.safetensors")
    assert all(np.array_equal(back[k], t[k]) for k in t)

    import offq.formats.safetensors as sf

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sf.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(tmp_path / "new.safetensors", t)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["staged.safetensors",
                                                           "straight.safetensors"]
    with pytest.raises(ValueError, match="name"):
        write_safetensors(tmp_path / "bad.safetensors", {"": np.zeros(1, np.float32)})


def test_writer_replaces_existing_file_atomically(tmp_path):
    target = tmp_path / "x.safetensors"
    write_safetensors(target, {"a": np.ones(3, np.float32)})
    write_safetensors(target, {"b": np.zeros(2, np.int32)})
    back, _ = load_safetensors(target)
    assert list(back) == ["b"]


# ---------------------------------------------------------------------- hostile files
GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize("header,data,n,match", [
    (b"", b"", None, "header length 0"),
    (GOOD, b"\0" * 16, 2**40, "outside"),
    (GOOD, b"\0" * 16, 10**6, "past the end"),
    (b"{not json", b"", None, "JSON"),
    (b"\xff\xfe{}", b"", None, "UTF-8"),
    (b"[1, 2]", b"", None, "JSON object"),
    ({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "unsupported dtype"),
    ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "shape"),
    ({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4, None, "shape"),
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 4]}}, b"\0" * 4, None, "shape"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12, None, "needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "ordered"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, None, "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 15, None, "outside the data"),
    ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, b"\0" * 16, None, "needs"),
    # a consistent byte count (0) but no array NumPy can build: refused with the tensor's name
    ({"a": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}, b"", None, "axis of 2\\^62"),
    # the same when the non-zero axes hold 2^63 bytes or more, each axis below 2^62 (NumPy's
    # "array is too big" named neither the file nor the tensor)
    ({"a": {"dtype": "F32", "shape": [0, 2**61], "data_offsets": [0, 0]}}, b"", None, "2\\^63 bytes"),
    ({"a": {"dtype": "U8", "shape": [2**31, 0, 2**32], "data_offsets": [0, 0]}}, b"", None,
     "2\\^63 bytes"),
    ({"a": {"dtype": "F32", "shape": [1] * 40, "data_offsets": [0, 4]}}, b"\0" * 4, None, "more than 32 axes"),
    ({"__metadata__": [], **GOOD}, b"\0" * 16, None, "__metadata__ must map"),
    ({"__metadata__": 0, **GOOD}, b"\0" * 16, None, "__metadata__ must map"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    # sharing one byte is overlapping too (a bound off by one took it)
    ({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
      "b": {"dtype": "U8", "shape": [8], "data_offsets": [7, 15]}}, b"\0" * 15, None,
     "'a' and 'b' overlap"),
    ({"a": "oops"}, b"", None, "object"),
    ({"__metadata__": {"k": 1}, **GOOD}, b"\0" * 16, None, "__metadata__"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8, None, "duplicate"),
])
def test_bad_headers_raise_value_error(tmp_path, header, data, n, match):
    p = _raw_file(tmp_path / "bad.safetensors", header, data, n)
    with pytest.raises(ValueError, match=match) as info:
        SafetensorsFile(p)
    assert "bad.safetensors" in str(info.value)


def test_tiny_files(tmp_path):
    for size in range(8):
        p = tmp_path / f"t{size}.safetensors"
        p.write_bytes(b"\x01" * size)
        with pytest.raises(ValueError, match="too short"):
            SafetensorsFile(p)


def test_truncation_anywhere_is_a_value_error(tmp_path):
    write_safetensors(tmp_path / "ok.safetensors", _sample_tensors())
    data = (tmp_path / "ok.safetensors").read_bytes()
    for cut in range(0, len(data), 7):
        p = tmp_path / "cut.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            f = SafetensorsFile(p)
            for k in f.keys():       # only reached when nothing was cut from tensor bytes
                f.raw(k)
            if cut < len(data):
                raise AssertionError(f"truncation at {cut} went unnoticed")


def test_random_corruption_never_crashes(tmp_path):
    write_safetensors(tmp_path / "ok.safetensors", _sample_tensors())
    data = (tmp_path / "ok.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(1)
    for i in range(300):
        bad = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            bad[int(rng.integers(0, 8 + n))] = int(rng.integers(0, 256))
        p = tmp_path / "r.safetensors"
        p.write_bytes(bytes(bad))
        try:
            f = SafetensorsFile(p)
        except ValueError:
            continue
        for k in f.keys():        # a header that still validates must be fully readable
            arr = f.raw(k)
            assert arr.nbytes == f.tensors[k].nbytes
        f.close()


# ---------------------------------------------------------------------- HF directories
def _tokenizer_json(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["a small corpus of english words for a test tokenizer"] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                                 "eos_token": "</s>"}))


def _save_tiny(tmp_path: Path, kind: str, dtype: str = "float32", shard: str | None = None,
               tie: bool = False) -> tuple[Path, dict]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model = model.to(getattr(torch, dtype))
    d = tmp_path / f"{kind}-{dtype}"
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(d, **kwargs)
    _tokenizer_json(d)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    return d, sd


@pytest.mark.parametrize("kind,dtype", [("llama", "float32"), ("llama", "bfloat16"),
                                        ("qwen2", "float16")])
def test_hf_directory_matches_torch(tmp_path, kind, dtype):
    d, sd = _save_tiny(tmp_path, kind, dtype)
    with open_checkpoint(d) as ck:
        c = ck.config
        assert c.architecture == kind and c.attention_bias == (kind == "qwen2")
        assert (c.num_hidden_layers, c.num_key_value_heads, c.head_dim) == (2, 2, 8)
        assert ck.tokenizer.bos_id == 1 and ck.tokenizer.eos_id == 2
        assert c.add_bos and ck.tokenizer.adds_bos            # the post-processor prepends <s>
        for name in c.tensor_shapes():
            assert np.array_equal(ck.tensors[name], sd[name]), name


def test_sharded_directory(tmp_path):
    d, sd = _save_tiny(tmp_path, "llama", shard="20KB")
    assert (d / "model.safetensors.index.json").is_file()
    with open_checkpoint(d) as ck:
        assert len({ck.tensors.file_of(k) for k in ck.tensors.keys()}) > 1
        for name in ck.config.tensor_shapes():
            assert np.array_equal(ck.tensors[name], sd[name]), name


def test_sharded_index_validation(tmp_path):
    d, _ = _save_tiny(tmp_path, "llama", shard="20KB")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))

    def check(mutate, match):
        bad = json.loads(json.dumps(index))
        mutate(bad)
        index_path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            HFTensorStore(d)

    check(lambda ix: ix["weight_map"].__setitem__("model.norm.weight", "../evil.safetensors"),
          "inside the checkpoint")
    check(lambda ix: ix["weight_map"].__setitem__("model.norm.weight", "nothere.safetensors"),
          "missing")
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    check(lambda ix: ix["weight_map"].__setitem__(name, shards[1]), "not in this shard")
    check(lambda ix: ix.__setitem__("weight_map", []), "weight_map")
    # found by fuzzing: a name past the file system's limit was an OSError naming neither file
    check(lambda ix: ix["weight_map"].__setitem__("model.norm.weight", "x" * 300 + ".safetensors"),
          r"model\.safetensors\.index\.json: shard 'x+\.safetensors': File name too long")
    index_path.write_text("{broken")
    with pytest.raises(ValueError, match="JSON"):
        HFTensorStore(d)
    # and a 3.6 GB index ran the JSON parser out of memory: a file past the limit is refused
    # before it is read (a sparse file here)
    with open(index_path, "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(ValueError, match=rf"index\.json: {MAX_JSON_BYTES + 1} bytes, more than"):
        HFTensorStore(d)


def test_a_single_file_beside_an_index_is_read_first(tmp_path, caplog):
    """As transformers does: with model.safetensors and an index both present, the single file
    holds the model (offq read the shards, and so another model, without a word)."""
    single, sd = _save_tiny(tmp_path, "llama")
    sharded, _ = _save_tiny(tmp_path / "s", "llama", shard="20KB")
    t, meta = load_safetensors(single / "model.safetensors")
    write_safetensors(single / "model.safetensors", {k: v / 2 for k, v in t.items()}, meta)
    for f in sharded.iterdir():
        if f.name.startswith("model-") or f.name.endswith(".index.json"):
            shutil.copy(f, single / f.name)
    with caplog.at_level("WARNING"), open_checkpoint(single) as ck:
        for name in ck.config.tensor_shapes():
            np.testing.assert_array_equal(ck.tensors[name], sd[name] / 2)
    assert "model.safetensors.index.json beside it is ignored" in caplog.text


def test_missing_and_misshaped_tensors_named(tmp_path):
    d, sd = _save_tiny(tmp_path, "llama")
    t, meta = load_safetensors(d / "model.safetensors")
    del t["model.layers.1.mlp.gate_proj.weight"]
    write_safetensors(d / "model.safetensors", t, meta)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj\.weight"):
        open_checkpoint(d)
    t["model.layers.1.mlp.gate_proj.weight"] = np.zeros((64, 31), np.float32)
    write_safetensors(d / "model.safetensors", t, meta)
    with pytest.raises(ValueError, match=r"gate_proj.*\[64, 31\].*\[64, 32\]"):
        open_checkpoint(d)


def test_a_config_with_fewer_layers_than_the_weights_is_refused(tmp_path):
    """num_hidden_layers lowered in config.json ran the first layers only (a silently different
    model, an INFO line about unused tensors): the directory is now refused, naming it."""
    d, _ = _save_tiny(tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    cfg["num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(d))}: the tensors hold layer\(s\) "
                                         r"\[1\] past the config's 1 layers"):
        open_checkpoint(d)
    # a layer's own unused buffer (Llama checkpoints saved before transformers 4.31) is no layer
    # past the count
    cfg["num_hidden_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    t, meta = load_safetensors(d / "model.safetensors")
    for i in range(2):
        t[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    write_safetensors(d / "model.safetensors", t, meta)
    open_checkpoint(d).close()


def test_offq_add_bos_must_be_a_bool(tmp_path):
    """config.json's offq_add_bos reached ModelConfig through bool(): "false" meant a BOS."""
    d, _ = _save_tiny(tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    for flag, ok in ((False, True), (1, True), ("false", False), ([], False)):
        (d / "config.json").write_text(json.dumps(dict(cfg, offq_add_bos=flag)))
        if ok:
            with open_checkpoint(d) as ckpt:
                assert ckpt.config.add_bos is bool(flag)
        else:
            with pytest.raises(ValueError, match="offq_add_bos: expected true or false"):
                open_checkpoint(d)


def test_unsupported_architecture_in_directory(tmp_path):
    d, _ = _save_tiny(tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt_neox", ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'gpt_neox'.*qwen2"):
        open_checkpoint(d)


def test_truncated_shard_in_directory(tmp_path):
    d, _ = _save_tiny(tmp_path, "llama")
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors.*outside the data region"):
        open_checkpoint(d)


def test_no_weights_file(tmp_path):
    d, _ = _save_tiny(tmp_path, "llama")
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        open_checkpoint(d)


def test_deeply_nested_json_is_a_value_error_naming_the_file(tmp_path):
    """Python's JSON parser raises RecursionError (not ValueError) on deep nesting: every JSON
    file offq reads turns it into a ValueError that names the file."""
    from offq.formats.checkpoint import read_config
    from offq.formats.gptq_export import is_gptq_export

    deep = "[" * 100_000
    blob = deep.encode()
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(ValueError, match="deep.safetensors: header is not valid"):
        read_header(tmp_path / "deep.safetensors")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(deep)
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        open_checkpoint(hf)
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        read_config(hf)
    assert not is_gptq_export(hf)


def test_a_header_of_too_many_tensors_is_refused_before_parsing(tmp_path, monkeypatch):
    """Zero-size entries fit the 100 MB header cap by the million (2.3 GB of parsed objects); the
    number of objects is bounded first (the outer object and __metadata__ aside). Patched down to
    50 here: 50 entries read, 53 are refused."""
    from offq.formats import safetensors as st

    monkeypatch.setattr(st, "MAX_TENSORS", 50)
    for count, ok in ((50, True), (53, False)):
        header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                  for i in range(count)}
        path = _raw_file(tmp_path / f"many{count}.safetensors", header)
        if ok:
            assert len(st.read_header(path)[0]) == count
        else:
            with pytest.raises(ValueError, match="more than 50 objects"):
                st.read_header(path)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_weight_is_refused_when_read(tmp_path, value):
    """A NaN weight (a corrupt file, or a GGUF tensor whose type was relabelled: Q4_1 bytes read
    as Q4_0 gave NaN scales) surfaced only as a NaN perplexity, minutes later; every store now
    names the tensor as it reads it, here for float32, float16 and float64 data."""
    tensors = {"a": RNG.standard_normal((3, 70000)).astype(np.float32)}
    tensors["a"][2, 69999] = value
    tensors["b"] = tensors["a"].astype(np.float16)
    tensors["c"] = tensors["a"].astype(np.float64)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    store = HFTensorStore(tmp_path)
    for name in ("a", "b", "c"):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}: tensor '{name}': "
                                             rf"holds NaN or Inf \(flat index 209999\) once read "
                                             rf"from its "):
            store[name]


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_an_oversized_json_beside_the_weights_is_refused_unread(tmp_path, name):
    """Every JSON side file of a HF directory is capped like the shard index (a sparse file
    here: read whole, it would be 64 MiB of zeros for the parser)."""
    d, _ = _save_tiny(tmp_path, "llama")
    with open(d / name, "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(ValueError, match=rf"{name}: {MAX_JSON_BYTES + 1} bytes, more than"):
        open_checkpoint(d)
