"""Smoke test of an installed offq wheel (run by .ci/run in a fresh virtual environment, from a
directory outside the source tree, with no compiler available to pip).

    python tests/smoke_wheel.py

Checks: offq imports from site-packages (not a checkout); every C kernel runs once against a
NumPy reference; the shipped WikiText-2 text is in the wheel; a tiny Llama handed over in memory
is quantized end to end (OffQ W4A4KV4, GPTQ) on the real 4-bit kernels, saved, reloaded
bit-identically; the ``offq`` console script answers. Exits non-zero on the first failure.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"wheel smoke test FAILED: {what}")
    print(f"ok  {what}")


def kernels() -> None:
    from offq import kernels as k

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    h = k.hadamard_matrix(64, dtype=np.float64)
    check(np.allclose(k.fwht(x), x @ h.T, atol=1e-5), "fwht = x H^T (n = 64)")
    acc = np.zeros((64, 64))
    k.cov_update(acc, x)
    check(np.allclose(acc, x.T.astype(np.float64) @ x, atol=1e-4), "cov_update = X^T X")
    vals, _ = k.top_eigenpairs(acc, 1)
    check(np.isclose(vals[0], np.linalg.eigvalsh(acc)[-1], rtol=1e-6), "top_eigenpairs")
    q = k.quantize(x, bits=4, group_size=32)
    err = np.abs(k.dequantize(q) - x).max()
    check(err <= 0.5 * float(np.max(q.scale)) + 1e-6, "quantize/dequantize within half a step")
    codes = rng.integers(0, 16, size=(2, 64), dtype=np.uint8)
    packed, _ = k.pack_codes(codes, bits=4)
    check(np.array_equal(k.unpack_codes(packed, bits=4, k=64), codes),
          "pack/unpack codes")
    w = k.quantize(rng.standard_normal((8, 64)).astype(np.float32), bits=4, group_size=-1,
                   symmetric=True)
    want = k.dequantize(q).astype(np.float64) @ k.dequantize(w).astype(np.float64).T
    check(np.allclose(k.matmul_w4a4(q, w), want, rtol=1e-4, atol=1e-4),
          "matmul_w4a4 = dequantized product")
    with k.threads(1):
        check(k.get_num_threads() == 1, "threads(1)")


def tiny_state_dict() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    d, f, v, layers, nh, nkv, hd = 64, 128, 97, 2, 4, 2, 16
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=v,
               hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
               num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd, hidden_act="silu",
               rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
               tie_word_embeddings=False)
    w = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    sd = {"model.embed_tokens.weight": w(v, d) * 10, "model.norm.weight": 1 + w(d),
          "lm_head.weight": w(v, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + w(d),
                   p + "post_attention_layernorm.weight": 1 + w(d),
                   p + "self_attn.q_proj.weight": w(nh * hd, d),
                   p + "self_attn.k_proj.weight": w(nkv * hd, d),
                   p + "self_attn.v_proj.weight": w(nkv * hd, d),
                   p + "self_attn.o_proj.weight": w(d, nh * hd),
                   p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                   p + "mlp.down_proj.weight": w(d, f)})
    return cfg, sd


def end_to_end(work: Path) -> None:
    import offq

    cfg, sd = tiny_state_dict()
    ckpt = offq.load(cfg, sd, name="tiny")
    calib = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(4, 32))
    qcfg = offq.QuantConfig(method="offq", a_group_size=32, calib_samples=4, calib_seqlen=32)
    result = offq.quantize(ckpt, qcfg, calib, progress=False)
    model = result.model("real")
    ids = calib[:1, :16]
    logits = model.forward(ids)
    check(logits.shape == (1, 16, cfg["vocab_size"]) and bool(np.isfinite(logits).all()),
          "tiny Llama quantized OffQ W4A4KV4 (GPTQ) runs on the real kernels")
    fp = offq.model.Model.from_checkpoint(ckpt).forward(ids)
    agree = float(np.mean(fp.argmax(-1) == logits.argmax(-1)))
    check(agree >= 0.5, f"quantized predictions follow the float model ({agree:.0%} agree)")
    offq.save(result, work / "tiny-offq")
    again, _, cfg2 = offq.load_quantized(work / "tiny-offq")
    check(cfg2 == qcfg and np.array_equal(again.forward(ids), logits),
          "saved, reloaded, bit-identical logits")


def main() -> int:
    import offq

    where = Path(offq.__file__).resolve()
    check("site-packages" in where.parts, f"offq imported from the installed wheel ({where})")
    print(f"    offq {offq.__version__}, SIMD {offq._C.simd_info()}")
    kernels()
    from offq.data import load_wikitext2_test
    check(len(load_wikitext2_test()) > 1_000_000, "WikiText-2 test text shipped in the wheel")
    with tempfile.TemporaryDirectory() as tmp:
        end_to_end(Path(tmp))
    cli = subprocess.run(["offq", "--help"], capture_output=True, text=True)
    check(cli.returncode == 0 and "quantize" in cli.stdout and "bench" in cli.stdout,
          "offq console script")
    print("wheel smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
