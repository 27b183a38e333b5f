"""offq checkpoint files: the dtypes a checkpoint stores round-trip through offq.formats.safetensors,
the bytes do not depend on insertion order, hostile files and wrong tensors fail with errors that
name the file and the tensor."""
from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

from offq.formats.checkpoint import (check_checkpoint_tensors, expected_tensors, load_safetensors,
                             save_safetensors)
from offq.config import QuantConfig
from offq.formats.safetensors import DTYPES
from offq.model.config import ModelConfig

RNG = np.random.default_rng(0)


def _checkpoint_like() -> dict[str, np.ndarray]:
    """One tensor of each dtype an offq checkpoint / partial run stores."""
    return {"layer.qweight": RNG.integers(0, 256, (6, 5), dtype=np.uint8),
            "layer.scales": RNG.random((6, 1), dtype=np.float32),
            "r1": RNG.standard_normal((4, 4)),
            "sums": RNG.integers(-9, 9, (6, 1), dtype=np.int32),
            "empty": np.zeros((0, 3), np.float32)}


def test_round_trip_keeps_dtypes_and_maps_the_file_read_only(tmp_path):
    t = _checkpoint_like()
    save_safetensors(tmp_path / "m.safetensors", t, {"format": "offq"})
    back, meta = load_safetensors(tmp_path / "m.safetensors")
    assert meta == {"format": "offq"} and set(back) == set(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v)
        assert not back[k].flags.writeable, k  # views into the memory map, not copies
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_bytes_do_not_depend_on_insertion_order(tmp_path):
    t = _checkpoint_like()
    save_safetensors(tmp_path / "a.safetensors", t)
    save_safetensors(tmp_path / "b.safetensors", dict(reversed(list(t.items()))))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_big_endian_input_is_stored_little_endian(tmp_path):
    x = np.arange(6, dtype=">f4").reshape(2, 3)
    save_safetensors(tmp_path / "m.safetensors", {"x": x})
    back, _ = load_safetensors(tmp_path / "m.safetensors")
    assert back["x"].dtype == np.dtype("<f4") and np.array_equal(back["x"], x)


@pytest.mark.parametrize("entry,data,match", [
    ({"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, b"\0" * 3, "outside the data"),
    ({"dtype": "U4", "shape": [4], "data_offsets": [0, 2]}, b"\0" * 2, "unsupported dtype"),
    ({"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}, b"\0" * 8, "needs 16 bytes"),
])
def test_hostile_file_names_the_file_and_tensor(tmp_path, entry, data, match):
    blob = json.dumps({"q.qweight": entry}).encode()
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    with pytest.raises(ValueError, match=match) as info:
        load_safetensors(p)
    assert "model.safetensors" in str(info.value) and "q.qweight" in str(info.value)


def _valid_tensors(mc: ModelConfig, cfg: QuantConfig) -> dict[str, np.ndarray]:
    """Zero tensors of every expected name, zero-points 2^(bits - 1) where weights are
    symmetric (the one zero-point of their grid)."""
    out = {n: np.zeros(shape, DTYPES[dt]) for n, (shape, dt) in expected_tensors(mc, cfg).items()}
    if cfg.w_symmetric:
        for n in out:
            if n.endswith(".zeros") and n.startswith("model.layers."):
                out[n][...] = 1 << (cfg.w_bits - 1)
    return out


def test_tensor_checks_name_the_tensor_and_what_was_expected():
    mc = ModelConfig(architecture="llama", vocab_size=11, hidden_size=8, intermediate_size=16,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    cfg = QuantConfig(method="rtn")
    want = expected_tensors(mc, cfg)
    tensors = _valid_tensors(mc, cfg)
    check_checkpoint_tensors(tensors, mc, cfg, "ckpt")
    name = "model.layers.0.mlp.up_proj.qweight"
    assert want[name] == ((16, 4), "U8")  # two 4-bit codes per byte
    bad = dict(tensors, **{name: tensors[name].astype(np.float32)})
    with pytest.raises(ValueError, match=r"ckpt: tensor 'model.layers.0.mlp.up_proj.qweight' is "
                                         r"float32 \[16, 4\], expected U8 \[16, 4\]"):
        check_checkpoint_tensors(bad, mc, cfg, "ckpt")
    del tensors["model.norm.weight"]
    with pytest.raises(ValueError, match="missing tensor 'model.norm.weight'"):
        check_checkpoint_tensors(tensors, mc, cfg, "ckpt")


@pytest.mark.parametrize("bits", [2, 3])
def test_codes_outside_the_grid_are_named(bits):
    """2/3-bit codes are stored one a byte: a byte >= 2^bits is corruption, refused at load."""
    mc = ModelConfig(architecture="llama", vocab_size=11, hidden_size=8, intermediate_size=16,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    cfg = QuantConfig(method="rtn", w_bits=bits, a_bits=16, kv_bits=16)
    tensors = _valid_tensors(mc, cfg)
    name = "model.layers.0.self_attn.k_proj.qweight"
    tensors[name][1, 2] = (1 << bits) - 1  # the largest code: fine
    check_checkpoint_tensors(tensors, mc, cfg, "ckpt")
    tensors[name][1, 2] = 1 << bits
    with pytest.raises(ValueError, match=f"ckpt: tensor '{name}' holds code {1 << bits}, outside "
                                         rf"\[0, {(1 << bits) - 1}\] for {bits}-bit weights"):
        check_checkpoint_tensors(tensors, mc, cfg, "ckpt")


@pytest.mark.parametrize("bits, lm_head_bits", [(4, 16), (3, 4), (8, 16)])
def test_scales_and_zero_points_off_the_grid_are_named(bits, lm_head_bits):
    """A negative scale (a review's scratch run: perplexity 82 -> 40,125 with one q_proj's scales
    set to -1) or a zero-point that is no whole number (7.3) was read as is: a silently different
    model. An asymmetric grid need not hold 0, so whole zero-points outside [0, 2^bits - 1] are
    its own (a group of positive weights has a negative one); symmetric weights have 2^(bits - 1)
    everywhere."""
    mc = ModelConfig(architecture="llama", vocab_size=11, hidden_size=8, intermediate_size=16,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    cfg = QuantConfig(method="rtn", w_bits=bits, a_bits=16, kv_bits=16, w_symmetric=False,
                      lm_head_bits=lm_head_bits)
    good = {n: np.zeros(shape, DTYPES[dt]) for n, (shape, dt) in expected_tensors(mc, cfg).items()}
    zeros = "model.layers.0.self_attn.q_proj.zeros"
    good[zeros][0, 0], good[zeros][1, 0] = -7.0, float(1 << bits)  # off [0, 2^bits - 1]: fine
    check_checkpoint_tensors(good, mc, cfg, "ckpt")
    for value in (7.3, -0.5):
        bad = dict(good, **{zeros: good[zeros].copy()})
        bad[zeros][1, 0] = value
        shown = re.escape(repr(float(np.float32(value))))
        with pytest.raises(ValueError, match=rf"^ckpt: tensor '{zeros}' holds zero-point "
                                             rf"{shown}, not a whole number"):
            check_checkpoint_tensors(bad, mc, cfg, "ckpt")
    scales = "model.layers.0.mlp.down_proj.scales"
    bad = dict(good, **{scales: np.full_like(good[scales], -1.0)})
    with pytest.raises(ValueError, match=rf"^ckpt: tensor '{scales}' holds a negative scale"):
        check_checkpoint_tensors(bad, mc, cfg, "ckpt")
    # another tool's symmetric grid may carry the sign in its scale (AutoRound's int_sym)
    check_checkpoint_tensors(bad, mc, cfg, "ckpt", offq_grids=False)
    # symmetric: one zero-point, 2^(bits - 1), unless the weights come from another tool
    sym = QuantConfig(method="rtn", w_bits=bits, a_bits=16, kv_bits=16, w_symmetric=True,
                      lm_head_bits=lm_head_bits)
    mid = float(1 << (bits - 1))
    tensors = {n: np.full_like(a, mid) if n.endswith(".zeros") and "layers" in n else a
               for n, a in good.items()}
    check_checkpoint_tensors(tensors, mc, sym, "ckpt")
    tensors[zeros][1, 0] = mid - 1
    with pytest.raises(ValueError, match=rf"^ckpt: tensor '{zeros}' holds zero-point "
                                         rf"{mid - 1!r}; symmetric {bits}-bit weights have "
                                         rf"{mid!r} everywhere"):
        check_checkpoint_tensors(tensors, mc, sym, "ckpt")
    check_checkpoint_tensors(tensors, mc, sym, "ckpt", offq_grids=False)


def test_unaligned_tensor_data_is_copied_aligned(tmp_path):
    """A header padded to an odd length (any writer may) leaves float32 data misaligned in the
    memory map: the loader copies such a tensor, since the kernels refuse unaligned operands."""
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    blob = json.dumps(header).encode()
    blob += b" " * ((-len(blob)) % 8 + 1)  # 8 + len(blob) is now 1 mod 8
    p = tmp_path / "odd.safetensors"
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + np.arange(4, dtype="<f4").tobytes())
    tensors, _ = load_safetensors(p)
    assert tensors["w"].flags.aligned
    np.testing.assert_array_equal(tensors["w"], np.arange(4, dtype=np.float32).reshape(2, 2))


@pytest.mark.parametrize("method, r3, r4, want", [
    ("offq", True, True, (64, 256)), ("offq", False, True, (None, 256)),
    ("offq", True, False, (64, None)), ("offq", False, False, (None, None)),
    ("gptq", True, True, (None, None))])
def test_online_transforms_follow_r3_and_r4_each(method, r3, r4, want):
    """What the offq block records of the online transforms: R3 by r3, R4 by r4, neither
    without a rotation (deciding R4 by r3 recorded one the weights never got)."""
    from types import SimpleNamespace

    from offq.formats.checkpoint import online_transforms

    cfg = QuantConfig(method=method, r3=r3, r4=r4) if method == "offq" else \
        QuantConfig(method=method)
    mc = SimpleNamespace(head_dim=64, intermediate_size=256)
    got = online_transforms(cfg, mc)
    assert (got["r3_head_dim"], got["r4_size"]) == want
