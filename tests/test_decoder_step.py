"""The C decoder step (``offq._C.decoder_*``, ``offq.quant.fused``) against the NumPy real path.

The reference is offq's NumPy forward of the same real-path model (``offq/model/decoder.py``:
NumPy RMSNorm, RoPE, attention over the dequantized cache, SwiGLU, and the same quantizers and
``matmul_w4a4``). The C step does the same float32 operations except three sums and exp (see
``csrc/decoder.c``), so hidden states agree to float32 rounding on these tiny models. Every SIMD
variant the CPU offers is run (``kernel=``), and this file runs again with OFFQ_DISABLE_SIMD=1
(``test_generic_dispatch_in_subprocess``).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from offq import _C
from offq.config import QuantConfig
from offq.kernels import threads
from offq.kernels.decoder import decoder_forward, decoder_plan, decoder_scratch_bytes
from offq.quant.fused import FusedDecoder
from offq.recipe import pipeline
from simd_cap import outputs_by_cap, run_with_env
from tiny_models import calibration, tiny_checkpoint, token_ids, write_word_tokenizer

SIMD = _C.simd_info()
KERNELS = ["generic"] + (["avx2"] if SIMD["avx2"] else []) + (["vnni"] if SIMD["avx512_vnni"] else [])


@pytest.fixture(scope="module", params=["qwen2", "llama-biases", "llama-hd64", "qwen2-hd128"])
def quantized(request):
    """A tiny W4A4KV4 model (OffQ, GPTQ): Qwen2 (q/k/v biases), Llama with every bias, Llama
    with head_dim 64 and 3 query heads per KV head (odd query counts: the attention kernel pairs
    queries) or Qwen2 with head_dim 128
    (two of them; Qwen2.5's head size)."""
    if request.param == "qwen2":
        ckpt = tiny_checkpoint(1, arch="qwen2")
    elif request.param == "llama-biases":
        ckpt = tiny_checkpoint(2, arch="llama", attention_bias=True, mlp_bias=True)
    elif request.param == "llama-hd64":
        ckpt = tiny_checkpoint(3, arch="llama", d=192, hd=64, nh=3, nkv=1, f=256)
    else:
        ckpt = tiny_checkpoint(4, arch="qwen2", d=256, hd=128, nh=2, nkv=1, f=256)
    # quantized on 2 threads whatever the process's setting: GPTQ's BLAS rounds differently on 1,
    # and at 1 the qwen2-hd128 model puts one activation of the prompt within float32 rounding
    # of a code boundary, so the C step's RMSNorm (another summation order) flips that code and
    # the NumPy comparison below fails by a code step (the C-against-C tests are exact anyway)
    with threads(2):
        return pipeline.quantize(ckpt, QuantConfig(method="offq"), calibration(ckpt, 8, 48, 1),
                                 progress=False)


def close(got, ref):
    """Float32 rounding of the reordered sums, relative to the largest value."""
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=0, atol=4e-6 * scale)


@pytest.mark.parametrize("kernel", KERNELS)
def test_prefill_and_decode_match_the_numpy_path(quantized, kernel):
    real = quantized.model("real")
    ids = token_ids(real.config.vocab_size, 1, 80, 3)  # past one 64-row attention tile
    ref = real.hidden_states(ids)[0]
    fd = FusedDecoder(real, kernel=kernel, prefill="c")
    h = real.embed(ids)[0]
    fd.run(h, fd.new_cache(4))  # the cache grows from 4 positions
    close(h, ref)
    # token by token, then a chunk of 10 rows after 70 cached positions
    cache = fd.new_cache(1)
    steps = []
    for t in range(70):
        x = real.embed(ids[:, t:t + 1])[0]
        steps.append(fd.run(x, cache)[0])
    rest = fd.run(real.embed(ids[:, 70:])[0], cache)
    close(np.concatenate([np.stack(steps), rest]), ref)
    assert cache.length == 80


@pytest.mark.parametrize("kernel", KERNELS)
def test_c_prefill_equals_c_decode_bit_for_bit(quantized, kernel):
    """Every query's attention sums (scores, exp, denominator, values) run in one order whatever
    the block of queries, and the products are bit-identical across M: a token gets the same
    numbers in a prompt of 80 (two 64-row attention tiles), one step at a time, and in chunks
    of 3."""
    real = quantized.model("real")
    prompt_equals_steps_and_chunks(FusedDecoder(real, kernel=kernel, prefill="c"), real)


def prompt_equals_steps_and_chunks(fd, real):
    """Asserts that 80 tokens give the same hidden states as one prompt, one step at a time and
    in chunks of 3; returns the prompt's (and its ids)."""
    ids = token_ids(real.config.vocab_size, 1, 80, 11)
    prompt = fd.run(real.embed(ids)[0], fd.new_cache())
    cache = fd.new_cache()
    steps = np.concatenate([fd.run(real.embed(ids[:, t:t + 1])[0], cache) for t in range(80)])
    np.testing.assert_array_equal(steps, prompt)
    cache = fd.new_cache()
    chunks = np.concatenate([fd.run(real.embed(ids[:, t:t + 3])[0], cache)
                             for t in range(0, 80, 3)])
    np.testing.assert_array_equal(chunks, prompt)
    return prompt, ids


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_attention_prefill_equals_decode_and_stays_near_float(quantized, kernel):
    """The opt-in 8-bit attention (csrc/attention_i8.c) quantizes each query and each query's
    softmax weights on their own, so a token still gets the same numbers in a prompt of 80 (two
    64-row tiles), one step at a time and in chunks of 3. Its numbers are its own: these tiny
    random models turn its attention error (tests/test_attention_kv4.py) and the 4-bit
    activation codes it flips into hidden states 7% (head_dim 16) to 35% (64, 128) RMS away from
    the float attention's, bounded loosely here; on a real model it costs +0.29% perplexity
    (SmolLM2-135M, 32 windows of 2048, benchmarks/bench_int8_attention.py)."""
    real = quantized.model("real")
    fd = FusedDecoder(real, kernel=kernel, prefill="c", attention="int8")
    prompt, ids = prompt_equals_steps_and_chunks(fd, real)
    ref = FusedDecoder(real, kernel=kernel, prefill="c").run(real.embed(ids)[0],
                                                             fd.new_cache())
    rms = np.sqrt(((prompt - ref) ** 2).mean() / (ref ** 2).mean())
    assert 0 < rms < 0.5, rms


def _bias_only_plan(v_bias: np.ndarray):
    """One layer of d = head_dim = 16, 2 query heads on 1 KV head, KV groups of 16, whose q/k/v
    are their biases alone (zero weights): every cached key row is k_bias and every value row
    v_bias. o_proj has random codes; the MLP's weights are zero."""
    d = f = hd = 16
    rng = np.random.default_rng(5)

    def lin(n, k, bias=None, codes=None, zero=0.0):
        c = np.zeros((n, k // 2), np.uint8) if codes is None else codes
        return (c, np.ones((n, 1), np.float32), np.full((n, 1), zero, np.float32), k, bias, k)

    q_bias = rng.uniform(-2, 2, 2 * hd).astype(np.float32)
    k_bias = np.linspace(-3, 4, hd, dtype=np.float32)  # straddles 0: a grid that fits
    qkv_bias = np.concatenate([q_bias, k_bias, v_bias.astype(np.float32)])
    o_codes = rng.integers(0, 256, (d, 2 * hd // 2), dtype=np.uint8)
    layer = (None, None, lin(4 * hd, d, bias=qkv_bias), lin(d, 2 * hd, codes=o_codes, zero=8.0),
             lin(2 * f, d), lin(d, f), None)
    return decoder_plan((layer,), hidden_size=d, intermediate_size=f, num_heads=2,
                        num_kv_heads=1, head_dim=hd, eps=1e-6, a_symmetric=False, a_clip=1.0,
                        kv_symmetric=False, kv_group=hd, r3=False, r4=False)


def _bias_only_run(plan, attention: str, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    """A 100-row prompt, then one decode step: the hidden states of both, and the cached value
    zero-points."""
    cap, hd = 128, 16
    kv = (np.zeros((1, cap, 2, 1, hd // 2), np.uint8), np.zeros((1, cap, 2, 1, 1), np.float32),
          np.zeros((1, cap, 2, 1, 1), np.float32))
    outs = []
    for start, rows in ((0, 100), (100, 1)):
        h = np.ones((rows, 16), np.float32)
        rope = np.ones((rows, hd // 2), np.float32), np.zeros((rows, hd // 2), np.float32)
        scratch = np.empty(decoder_scratch_bytes(plan, rows, start + rows), np.uint8)
        decoder_forward(plan, h, start, *rope, *kv, scratch, kernel=kernel, attention=attention)
        outs.append(h)
    return np.concatenate(outs), kv[2][0, :101, 1, 0, 0]


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_attention_runs_the_float_one_where_the_cached_grids_do_not_fit(kernel):
    """Values in [10, 11] (a group of one sign) get the zero-point -150, which the 8-bit kernels
    cannot hold (they clamped it to 0: h off by 90% of its size); such rows take the float
    attention, and give its bits. A grid that fits still runs the 8-bit kernels (other bits)."""
    one_sign = _bias_only_plan(np.linspace(10, 11, 16))
    ref, zeros = _bias_only_run(one_sign, "float", kernel)
    assert (zeros == -150).all()  # the quantizer's grid of [10, 11] on 4 bits
    got, _ = _bias_only_run(one_sign, "int8", kernel)
    np.testing.assert_array_equal(got, ref)
    straddling = _bias_only_plan(np.linspace(-1, 1, 16))
    ref, zeros = _bias_only_run(straddling, "float", kernel)
    assert ((zeros >= 0) & (zeros <= 15)).all()
    got, _ = _bias_only_run(straddling, "int8", kernel)
    assert not np.array_equal(got, ref)
    close(got, ref)


def test_attention_mode_is_validated(quantized):
    real = quantized.model("real")
    with pytest.raises(ValueError, match="attention: expected one of"):
        FusedDecoder(real, attention="int4")


def test_auto_mode_runs_w4a4kv4_checkpoints_on_the_c_decoder(quantized, tmp_path, capsys):
    """`offq generate` defaults to mode "auto" (and `offq eval --mode auto` takes it): a W4A4KV4
    checkpoint runs on the fused C decoder, whose perplexity is the real path's bit for bit (its
    prompts take the NumPy path) and whose generation is `--mode fused`'s; a streamed model, or
    one the C decoder cannot run (here the same weights with 8-bit activations and KV), stays on
    the real path. `offq eval` defaults to "real" (the fused decoder would only add memory)."""
    import json

    from offq.cli import main
    from offq.quant.assemble import load_quantized, resolved_mode

    ckpt_dir = quantized.save(tmp_path / "ckpt")
    write_word_tokenizer(ckpt_dir, quantized.model("real").config.vocab_size)
    model, _, _ = load_quantized(ckpt_dir, mode="auto")
    assert model.fused_runner is not None and resolved_mode(model, "auto") == "fused"
    streamed, _, _ = load_quantized(ckpt_dir, mode="auto", resident=False)
    assert streamed.fused_runner is None and resolved_mode(streamed, "auto") == "real"

    text = tmp_path / "text.txt"
    ids = np.random.default_rng(3).integers(3, model.config.vocab_size, size=80)
    text.write_text(" ".join(f"w{i}" for i in ids), encoding="utf-8")
    evals = {}
    for mode in (None, "auto"):
        argv = ["eval", str(ckpt_dir), "--dataset", str(text), "--seqlen", "24", "--json",
                "--quiet"] + ([] if mode is None else ["--mode", mode])
        assert main(argv) == 0
        evals[mode] = json.loads(capsys.readouterr().out)
    assert evals["auto"]["method"].endswith("(fused)") and evals[None]["method"].endswith("(real)")
    assert evals["auto"]["nll"] == evals[None]["nll"]
    outs = {}
    for mode in (None, "fused"):
        argv = ["generate", str(ckpt_dir), "--prompt", "w3 w4 w5 w6 w7 w8 w9 w10 w11 w12",
                "--max-new-tokens", "6", "--quiet"] + ([] if mode is None else ["--mode", mode])
        assert main(argv) == 0
        outs[mode] = capsys.readouterr().out
    assert outs[None] == outs["fused"] and outs[None].startswith("w3 w4 w5")

    cfg_file = ckpt_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["offq"]["quant_config"].update(a_bits=8, kv_bits=8)
    cfg_file.write_text(json.dumps(cfg))
    model8, _, _ = load_quantized(ckpt_dir, mode="auto")
    assert model8.fused_runner is None and resolved_mode(model8, "auto") == "real"
    with pytest.raises(ValueError, match="layer 0"):  # asked for by name, it is refused
        load_quantized(ckpt_dir, mode="fused")


def test_int8_attention_from_the_loader_and_the_command_line(quantized, tmp_path, capsys):
    """`load_quantized(attention="int8")` (`offq eval` / `offq generate --attention int8`) gives
    the fused decoder the 8-bit attention with prompts through the C step, so a perplexity
    measures it: near the float attention's but not equal, and named in the protocol. Refused,
    with a message naming the fix, where it cannot run: another mode, a streamed model, a model
    that is not an offq checkpoint."""
    import json

    from offq.cli import main
    from offq.eval import load_model
    from offq.quant.assemble import load_quantized

    ckpt_dir = quantized.save(tmp_path / "ckpt")
    write_word_tokenizer(ckpt_dir, quantized.model("real").config.vocab_size)
    model, _, _ = load_quantized(ckpt_dir, mode="fused", attention="int8")
    assert (model.fused_runner.attention, model.fused_runner.prefill) == ("int8", "c")
    assert load_quantized(ckpt_dir, mode="fused")[0].fused_runner.attention == "float"

    text = tmp_path / "text.txt"
    ids = np.random.default_rng(5).integers(3, model.config.vocab_size, size=80)
    text.write_text(" ".join(f"w{i}" for i in ids), encoding="utf-8")
    evals = {}
    for attention in ("float", "int8"):
        assert main(["eval", str(ckpt_dir), "--dataset", str(text), "--seqlen", "24", "--json",
                     "--quiet", "--mode", "fused", "--attention", attention]) == 0
        evals[attention] = json.loads(capsys.readouterr().out)
    assert evals["int8"]["method"].endswith("(fused, int8 attention)")
    assert evals["float"]["method"].endswith("(fused)")
    assert evals["int8"]["nll"] != evals["float"]["nll"]
    assert abs(evals["int8"]["nll"] / evals["float"]["nll"] - 1) < 0.05
    assert main(["generate", str(ckpt_dir), "--prompt", "w3 w4 w5 w6", "--max-new-tokens", "4",
                 "--quiet", "--attention", "int8"]) == 0
    assert capsys.readouterr().out.startswith("w3 w4 w5 w6")

    assert main(["eval", str(ckpt_dir), "--attention", "int8", "--quiet"]) == 2
    assert "--attention int8 runs on the fused C decoder, which takes W4A4KV4 offq " \
        "checkpoints: for one, add --mode fused" in capsys.readouterr().err
    with pytest.raises(ValueError, match="attention: 'int8' is the fused C decoder's"):
        load_quantized(ckpt_dir, mode="real", attention="int8")
    with pytest.raises(ValueError, match="a streamed model"):
        load_quantized(ckpt_dir, mode="auto", resident=False, attention="int8")
    for mode in ("fused", "real"):
        with pytest.raises(ValueError, match="attention: expected one of"):
            load_quantized(ckpt_dir, mode=mode, attention="int4")
    with pytest.raises(ValueError, match="this model is not one"):
        load_model(model, attention="int8")
    # offq.perplexity on the in-memory result, as in a notebook: the same numbers as the
    # saved checkpoint's; a built Model chose its attention already
    import offq

    r = offq.perplexity(quantized, [int(i) for i in ids], seqlen=24, mode="fused",
                        attention="int8", quiet=True)
    assert r["method"].endswith("(fused, int8 attention)") and r["nll"] == evals["int8"]["nll"]
    with pytest.raises(ValueError, match="not for a built Model"):
        offq.perplexity(model, [int(i) for i in ids], seqlen=24, attention="int8")


def test_numpy_prefill_then_c_decode(quantized):
    """prefill="numpy" (the default): a prompt is the real path's, bit for bit, and its packed K/V
    feed the C decode steps that follow (close to the real path's own decode)."""
    real = quantized.model("real")
    ids = token_ids(real.config.vocab_size, 1, 30, 8)
    fd = FusedDecoder(real)
    cache = fd.new_cache()
    h = fd.run(real.embed(ids[:, :20])[0], cache)
    np.testing.assert_array_equal(h, real.hidden_states(ids[:, :20])[0])
    ref_cache = real.new_cache()
    real.hidden_states(ids[:, :20], cache=ref_cache)
    for t in range(20, 30):
        got = fd.run(real.embed(ids[:, t:t + 1])[0], cache)
        close(got, real.hidden_states(ids[:, t:t + 1], cache=ref_cache)[0])
    # a C prefill fills the cache with the same format: layer 0 (the same inputs) holds the
    # same codes; later layers differ where an activation code flipped upstream (the two paths
    # sum in different orders), a few percent of the bytes on these tiny models
    c_cache = FusedDecoder(real, prefill="c").new_cache()
    FusedDecoder(real, prefill="c").run(real.embed(ids[:, :20])[0], c_cache)
    np.testing.assert_array_equal(c_cache.codes[0, :20], cache.codes[0, :20])
    assert (c_cache.codes[:, :20] == cache.codes[:, :20]).mean() > 0.95
    with pytest.raises(ValueError, match="prefill"):
        FusedDecoder(real, prefill="python")


def test_numpy_prefill_only_for_a_prompt_of_more_than_8_tokens_into_an_empty_cache(quantized):
    """prefill="numpy" runs the NumPy real path for a prompt of more than NUMPY_PREFILL_MIN_ROWS
    tokens into an empty cache, and the C step otherwise: an 8-token prompt is the C step's bits
    (a >= took the NumPy path), and 12 tokens after 4 extend the cache (taken as a new prompt,
    they overwrote it: length 12, outputs 55% off)."""
    real = quantized.model("real")
    ids = token_ids(real.config.vocab_size, 1, 24, 12)
    numpy_fd, c = FusedDecoder(real), FusedDecoder(real, prefill="c")
    np.testing.assert_array_equal(numpy_fd.run(real.embed(ids[:, :8])[0], numpy_fd.new_cache()),
                                  c.run(real.embed(ids[:, :8])[0], c.new_cache()))
    cache = numpy_fd.new_cache()
    numpy_fd.run(real.embed(ids[:, :4])[0], cache)
    h = numpy_fd.run(real.embed(ids[:, 4:16])[0], cache)
    assert cache.length == 16
    close(h, real.hidden_states(ids[:, :16])[0][4:])


def test_auto_prefill_picks_c_for_short_prompts_and_numpy_for_long(quantized, monkeypatch):
    """prefill="auto": the C step below auto_numpy_prefill_rows() prompt tokens (bit-identical to
    prefill="c"), the NumPy real path from there (bit-identical to the real path)."""
    import offq.quant.fused as fused

    monkeypatch.setattr(fused, "AUTO_NUMPY_PREFILL_ROWS", 16)
    monkeypatch.setattr(fused, "AUTO_NUMPY_PREFILL_ROWS_SIMD", 16)
    real = quantized.model("real")
    ids = token_ids(real.config.vocab_size, 1, 24, 12)
    auto, c = FusedDecoder(real, prefill="auto"), FusedDecoder(real, prefill="c")
    short = auto.run(real.embed(ids[:, :15])[0], auto.new_cache())
    np.testing.assert_array_equal(short, c.run(real.embed(ids[:, :15])[0], c.new_cache()))
    long = auto.run(real.embed(ids)[0], auto.new_cache())
    np.testing.assert_array_equal(long, real.hidden_states(ids)[0])
    # exactly at the threshold: the NumPy path (a strict > took the C step there)
    edge = auto.run(real.embed(ids[:, :16])[0], auto.new_cache())
    np.testing.assert_array_equal(edge, real.hidden_states(ids[:, :16])[0])
    # None (the SIMD attentions' setting): every prompt through the C step
    monkeypatch.setattr(fused, "AUTO_NUMPY_PREFILL_ROWS", None)
    monkeypatch.setattr(fused, "AUTO_NUMPY_PREFILL_ROWS_SIMD", None)
    assert fused.auto_numpy_prefill_rows() is None
    long = auto.run(real.embed(ids)[0], auto.new_cache())
    np.testing.assert_array_equal(long, c.run(real.embed(ids)[0], c.new_cache()))


@pytest.mark.skipif(not _C.simd_info()["avx2"], reason="the CPU has no AVX2")
def test_auto_prefill_takes_the_numpy_path_only_with_the_generic_attention(tmp_path):
    """Since the float attention's 2026-12-07 speed-up the AVX2 C step beats the NumPy prefill at
    every length measured (it took the NumPy path from 1024 tokens); the scalar C attention
    still loses to NumPy's BLAS from there."""
    code = ("import sys\n"
            "from offq.quant.fused import auto_numpy_prefill_rows as rows\n"
            "got = (rows(), rows(64, 64), rows(64, -1), rows(64, 32), rows(64, 8), rows(40, 40))\n"
            "assert got == eval(sys.argv[1]), got\n")
    # shapes the SIMD attentions do not take (hd or group not a multiple of 16) run the generic
    simd = "(None, None, None, None, 1024, 1024)"
    for cap in ("", "avx2"):  # uncapped: AVX-512 where the CPU has it
        run_with_env(code, {"OFFQ_SIMD_MAX": cap}, [simd], tmp_path)
    run_with_env(code, {"OFFQ_SIMD_MAX": "generic"}, ["(1024,) * 6"], tmp_path)


def test_generation_prefills_through_the_c_step_and_restores_the_runner(quantized, monkeypatch):
    """The fused decoder's prompts take the NumPy path by default (perplexity = the real path);
    generate_ids takes the C step for its prompt (1.4-3x faster at 64-256 tokens), its tokens
    those of a decoder whose every step runs in C, and leaves prefill="numpy" as it was, also
    when the prompt fails."""
    from offq.generate import GenerationConfig, generate_ids

    model = quantized.model("fused")
    runner = model.fused_runner
    assert runner.prefill == "numpy"
    seen = []
    run = runner.run

    def spy(h, cache):
        seen.append((h.shape[0], runner.prefill))
        return run(h, cache)

    monkeypatch.setattr(runner, "run", spy)
    prompt = list(token_ids(model.config.vocab_size, 1, 20, 5)[0])
    cfg = GenerationConfig(max_new_tokens=4, stop_at_eos=False)
    got = list(generate_ids(model, prompt, cfg))
    assert seen[0] == (20, "auto") and all(p == "numpy" for _, p in seen[1:])
    assert runner.prefill == "numpy"
    every_step_in_c = quantized.model("fused")
    every_step_in_c.fused_runner.prefill = "c"
    assert got == list(generate_ids(every_step_in_c, prompt, cfg))
    monkeypatch.setattr(runner, "run", lambda h, cache: (_ for _ in ()).throw(MemoryError))
    with pytest.raises(MemoryError):
        list(generate_ids(model, prompt, cfg))
    assert runner.prefill == "numpy"


def test_simd_variants_agree(quantized):
    """Products are bit-identical across variants; only the attention and RMSNorm sums may
    differ, by float32 rounding. Such a difference can move an activation that sits within
    rounding of a 4-bit code boundary to the next code, and that token's row then differs by a
    code step's effect: with NumPy 1.23 the qwen2-hd128 model, quantized a few ulps apart, put
    token 20 of this prompt there (AVX2 and VNNI equal to each other, generic equal to the
    NumPy path). So one row of the 24 may differ; a variant's bug (a lane, a tail, a tile)
    reaches many."""
    real = quantized.model("real")
    ids = token_ids(real.config.vocab_size, 1, 24, 4)
    outs = {}
    for kernel in KERNELS:
        fd = FusedDecoder(real, kernel=kernel, prefill="c")
        h = real.embed(ids)[0]
        outs[kernel] = fd.run(h, fd.new_cache())
    for kernel in KERNELS[1:]:
        ref = outs["generic"]
        off = np.abs(outs[kernel] - ref).max(axis=1) > 4e-6 * float(np.abs(ref).max())
        assert off.sum() <= 1, f"{kernel}: rows {np.nonzero(off)[0]} differ from generic"
        keep = ~off
        close(outs[kernel][keep], ref[keep])


def test_simd_variants_agree_on_vector_tails():
    """An FFN width of 20 (16 + 4, 8 + 8 + 4): the SIMD SwiGLU and the other element-wise steps
    finish each row in a partial vector, which the fixtures' widths (multiples of 16) never
    reach. Dropping the last element of AVX2's SwiGLU tail fails this."""
    ckpt = tiny_checkpoint(5, arch="qwen2", f=20)
    with threads(2):
        q = pipeline.quantize(ckpt, QuantConfig(method="offq"), calibration(ckpt, 4, 32, 1),
                              progress=False)
    real = q.model("real")
    assert real.config.intermediate_size == 20
    ids = token_ids(real.config.vocab_size, 1, 12, 5)
    outs = {}
    for kernel in KERNELS:
        fd = FusedDecoder(real, kernel=kernel, prefill="c")
        outs[kernel] = fd.run(real.embed(ids)[0], fd.new_cache())
    for kernel in KERNELS[1:]:
        close(outs[kernel], outs["generic"])


def test_thread_count_does_not_change_results(quantized):
    """A 20-token prompt, then 8 decode steps, on 1-4 threads: the same bits. Decode splits each
    KV head's query heads into as many blocks as the team needs (1 block on 1-2 threads, 2-3 on
    3-4 for the 3 query heads of llama-hd64), and every query's sums run in one order whatever
    its block."""
    real = quantized.model("real")
    ids = token_ids(real.config.vocab_size, 1, 28, 5)
    fd = FusedDecoder(real, prefill="c")
    res = []
    for n in (1, 2, 3, 4):
        with threads(n):
            cache = fd.new_cache()
            out = [fd.run(real.embed(ids[:, :20])[0], cache)]
            out += [fd.run(real.embed(ids[:, t:t + 1])[0], cache) for t in range(20, 28)]
            res.append(np.concatenate(out))
    for r in res[1:]:
        np.testing.assert_array_equal(res[0], r)


def test_fused_mode_model_end_to_end(quantized):
    """mode='fused': prompts (NumPy prefill) give the real path's logits and NLL bit for bit;
    generation's last-position logits."""
    real = quantized.model("real")
    fused = quantized.model("fused")
    assert fused.fused_runner is not None
    ids = token_ids(real.config.vocab_size, 2, 24, 6)
    np.testing.assert_array_equal(fused.forward(ids), real.forward(ids))
    np.testing.assert_array_equal(fused.nll(ids), real.nll(ids))
    cache = fused.new_cache()
    last = fused.forward(ids[:1, :10], cache=cache, last_only=True)
    assert last.shape == (1, 1, real.config.vocab_size)
    close(last[0, 0], real.forward(ids[:1, :10])[0, -1])
    with pytest.raises(ValueError, match="one sequence"):
        fused.forward(ids, cache=fused.new_cache())


def test_non_w4a4kv4_models_are_refused():
    ckpt = tiny_checkpoint(1, arch="qwen2")
    q = pipeline.quantize(ckpt, QuantConfig(method="offq", kv_bits=16), calibration(ckpt, 4, 32, 1),
                          progress=False)
    with pytest.raises(ValueError, match="KV codec"):
        FusedDecoder(q.model("real"))


def test_foreign_online_transforms_are_refused(quantized):
    """The C step applies offq's R3/R4 Hadamards itself: any other hook on a layer (which the
    NumPy path would run) must stop the fused runtime instead of being silently replaced."""
    model = quantized.model("real")
    layer = model.layers[1]
    for attr in ("qk_transform", "down_input_transform"):
        saved = getattr(layer, attr)
        if saved is None:
            continue
        setattr(layer, attr, lambda *a: a[0] if len(a) == 1 else a)
        try:
            with pytest.raises(ValueError, match=f"layer 1 {attr} is not offq's R3/R4"):
                FusedDecoder(model)
        finally:
            setattr(layer, attr, saved)


@pytest.fixture(scope="module")
def plan_args(quantized):
    real = quantized.model("real")
    fd = FusedDecoder(real)
    cache = fd.new_cache(8)
    for part in (cache.codes, cache.scale, cache.zero):  # np.empty: tests that start past 0
        part.fill(0)  # read these positions, which must not be whatever the memory held
    cfg = real.config
    h = real.embed(token_ids(cfg.vocab_size, 1, 2, 0))[0]
    cos = np.ones((2, fd.head_dim // 2), np.float32)
    scratch = np.empty(decoder_scratch_bytes(fd.plan, 2, 2), np.uint8)
    return fd, dict(plan=fd.plan, h=h, start=0, cos=cos, sin=cos.copy(), kv_codes=cache.codes,
                    kv_scale=cache.scale, kv_zero=cache.zero, scratch=scratch)


@pytest.mark.parametrize("name, value, exc, match", [
    ("plan", object(), TypeError, "plan"),
    ("h", np.zeros((2, 3), np.float32), ValueError, "h: axis 1"),
    ("h", np.zeros((2, 64), np.float64), TypeError, "h: expected dtype"),
    ("h", np.zeros((0, 64), np.float32), ValueError, "h: expected at least one row"),
    ("start", 7, ValueError, "start"),
    ("start", -1, ValueError, "start"),
    ("start", 1.5, TypeError, "start"),
    ("start", 2**63 - 1, ValueError, "start: positions"),  # start + rows would overflow int64
    ("cos", np.ones((3, 8), np.float32), ValueError, "cos"),
    ("sin", np.ones((2, 8), np.float64), TypeError, "sin"),
    ("kv_codes", np.zeros((2, 8, 2, 2, 7), np.uint8), ValueError, "kv_codes"),
    ("kv_scale", np.zeros((2, 9, 2, 2, 1), np.float32), ValueError, "kv_scale"),
    ("kv_zero", np.zeros((2, 8, 2, 2, 1), np.float32)[:, ::-1], ValueError, "kv_zero"),
    ("scratch", np.empty(16, np.uint8), ValueError, "scratch"),
])
def test_forward_validates_every_argument(plan_args, name, value, exc, match):
    _, kwargs = plan_args
    kwargs = dict(kwargs)
    if name in ("cos", "sin", "kv_codes", "kv_scale", "kv_zero", "h") and \
            kwargs["cos"].shape[1] != 8:
        pytest.skip("the shapes above are for head_dim 16")
    kwargs[name] = value
    with pytest.raises(exc, match=match):
        decoder_forward(**kwargs)


def test_forward_rejects_read_only_cache_and_unknown_kernel(plan_args):
    _, kwargs = plan_args
    ro = kwargs["kv_codes"].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="kv_codes: expected a writeable"):
        decoder_forward(**{**kwargs, "kv_codes": ro})
    with pytest.raises(ValueError, match="kernel: expected one of 'auto', 'generic', 'avx2', 'vnni'"):
        decoder_forward(**kwargs, kernel="sse9")
    with pytest.raises(ValueError, match="kernel: decoder_forward has no 'avx512' variant"):
        decoder_forward(**kwargs, kernel="avx512")
    with pytest.raises(ValueError, match="attention: expected 'float' or 'int8', got 'int4'"):
        decoder_forward(**kwargs, attention="int4")


def test_forward_rejects_buffers_that_share_memory(plan_args):
    """A step that writes h, the cache or its scratch while it reads another of them (or a weight)
    would compute garbage silently: every such overlap is refused, naming the written buffer."""
    fd, kwargs = plan_args
    scratch = kwargs["scratch"]
    h = kwargs["h"]
    as_f32 = scratch[: scratch.size // 4 * 4].view(np.float32)
    cases = [  # (change, the message: the first buffer of the pair in argument order names it)
        (dict(scratch=np.frombuffer(h, np.uint8)), "h: must not share memory with scratch"),
        (dict(kv_zero=kwargs["kv_scale"]), "kv_scale: must not share memory with kv_zero"),
        (dict(h=as_f32[: h.size].reshape(h.shape)), "h: must not share memory with scratch"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=f"^{message}$"):
            decoder_forward(**{**kwargs, **change})
    # a cos table carved from h (read while h is written)
    both = np.concatenate([h.ravel(), np.ones(kwargs["cos"].size, np.float32)])
    with pytest.raises(ValueError, match="^h: must not share memory with cos"):
        decoder_forward(**{**kwargs, "h": both[: h.size].reshape(h.shape),
                           "cos": both[h.size - 1: h.size - 1 + kwargs["cos"].size].reshape(
                               kwargs["cos"].shape)})
    # h written over one of the plan's weights
    weight = next(a for a in _arrays(fd.plan_layers) if a.dtype == np.float32 and a.size >= h.size)
    with pytest.raises(ValueError, match="^h: must not share memory with the plan's weights"):
        decoder_forward(**{**kwargs, "h": weight.ravel()[: h.size].reshape(h.shape)})


def _arrays(obj):
    """Every ndarray inside nested tuples/lists."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _arrays(item)


def test_forward_reports_non_finite_input(plan_args):
    _, kwargs = plan_args
    h = kwargs["h"].copy()
    h[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        decoder_forward(**{**kwargs, "h": h})


@pytest.mark.parametrize("name", ["cos", "sin"])
@pytest.mark.parametrize("value", [np.inf, np.nan, 1e30])
def test_forward_names_a_bad_rotary_table_and_leaves_h_alone(plan_args, name, value):
    """Non-finite entries, and finite ones that would overflow the rotation (1e30 used to come
    back as "h: contains NaN or Inf" after h and the cache were written), name the table."""
    _, kwargs = plan_args
    table = kwargs[name].copy()
    table[1, 0] = value
    h = kwargs["h"].copy()
    codes = kwargs["kv_codes"].copy()
    with pytest.raises(ValueError, match=f"^{name}: a rotary table needs finite values"):
        decoder_forward(**{**kwargs, name: table, "h": h})
    np.testing.assert_array_equal(h, kwargs["h"])  # refused before the step wrote anything
    np.testing.assert_array_equal(codes, kwargs["kv_codes"])


def test_forward_takes_a_rotary_table_scaled_above_one(plan_args):
    # YaRN-style rope scalings fold an attention factor (~1.1-1.7) into cos and sin
    _, kwargs = plan_args
    decoder_forward(**{**kwargs, "h": kwargs["h"].copy(), "cos": kwargs["cos"] * 1.5,
                       "kv_codes": kwargs["kv_codes"].copy(), "kv_scale": kwargs["kv_scale"].copy(),
                       "kv_zero": kwargs["kv_zero"].copy()})


@pytest.mark.parametrize("attention", ["float", "int8"])
@pytest.mark.parametrize("where", ["kv_scale", "kv_zero"])
def test_forward_blames_a_non_finite_cached_row_and_gives_h_back(plan_args, attention, where):
    """A NaN at a cached position before ``start`` used to fail as "h: contains NaN" after h
    had been overwritten; the step now names the cache array and puts h back."""
    fd, kwargs = plan_args
    bad = kwargs[where].copy()
    bad[0, 0] = np.nan
    h = kwargs["h"].copy()
    scratch = np.empty(decoder_scratch_bytes(fd.plan, 2, 5), np.uint8)
    with pytest.raises(ValueError, match=f"^{where}: layer 0, position 0 holds NaN"):
        decoder_forward(**{**kwargs, "h": h, where: bad, "start": 3, "scratch": scratch,
                           "kv_codes": kwargs["kv_codes"].copy(), "attention": attention})
    np.testing.assert_array_equal(h, kwargs["h"])


def test_forward_refuses_non_finite_h_before_writing_the_cache(plan_args):
    _, kwargs = plan_args
    h = kwargs["h"].copy()
    h[1, 2] = np.inf
    codes = kwargs["kv_codes"].copy()
    with pytest.raises(ValueError, match="^h: contains NaN or Inf"):
        decoder_forward(**{**kwargs, "h": h, "kv_codes": codes})
    np.testing.assert_array_equal(codes, kwargs["kv_codes"])


def _wide_plan(heads: int, o_group: int) -> object:
    """A one-layer plan of hidden size 2 whose attention is as wide as the limits allow: the
    scratch size and the o_proj group size grow with ``heads`` (head_dim 2, one KV head)."""
    def lin(n: int, k: int, g: int) -> tuple:
        return (np.zeros((n, k // 2), np.uint8), np.zeros((n, k // g), np.float32),
                np.zeros((n, k // g), np.float32), g, None, g)
    layer = (None, None, lin((heads + 2) * 2, 2, 2), lin(2, heads * 2, o_group), lin(4, 2, 2),
             lin(2, 2, 2), None)
    return _C.decoder_plan((layer,), 2, 2, heads, 1, 2, 1e-6, False, 1.0, False, 2, False, False)


def test_scratch_sizes_that_overflow_int64_are_refused():
    """Each thread's scores take (a block of positions) * heads / kv_heads * (positions + 1)
    floats: at 2^20 query heads to a KV head and 2^38 positions that is past 2^63 bytes, and the
    size wrapped to a negative (or, at 2^39, a small positive) number that a 64-byte scratch
    passed: a segfault."""
    plan = _wide_plan(2**20, 128)
    with threads(1):
        assert 0 < _C.decoder_scratch_bytes(plan, 1, 2**20) < 2**52  # 2^46 bytes of scores
        for positions in (2**38, 2**39, 2**40):
            with pytest.raises(ValueError, match=r"^positions: the scratch for 1 rows"):
                _C.decoder_scratch_bytes(plan, 1, positions)


def test_plan_refuses_groups_whose_int32_sums_would_wrap():
    """o_proj's input is heads * head_dim wide; a group of 2^21 of its codes (15 * 127 a term
    with a folded zero-point) wraps int32, so the plan takes groups up to 2^20 only."""
    _wide_plan(2**19, 2**20)
    with pytest.raises(ValueError, match=r"layers\[0\].o.w_group: the group size 2097152 exceeds"):
        _wide_plan(2**20, 2**21)


def test_plan_validates_layers(quantized):
    fd = FusedDecoder(quantized.model("real"))
    cfg = quantized.model_config
    good = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                head_dim=fd.head_dim, eps=1e-5, a_symmetric=False, a_clip=1.0,
                kv_symmetric=False, kv_group=fd.head_dim, r3=True, r4=True)
    layer = tuple(fd.plan_layers[0])
    with pytest.raises(TypeError, match="layers"):
        decoder_plan([layer], **good)
    with pytest.raises(ValueError, match=r"num_heads: 1099511627776 exceeds the limit 2\^20"):
        decoder_plan((layer,), **{**good, "num_heads": 2**40, "num_kv_heads": 2**40})
    qkv = layer[2]
    bad = (qkv[0][:, :-1],) + qkv[1:]
    with pytest.raises(ValueError, match=r"layers\[0\].qkv.codes"):
        decoder_plan(((layer[0], layer[1], bad) + layer[3:],), **good)
    with pytest.raises(ValueError, match=r"layers\[0\].o.a_group"):
        decoder_plan((layer[:3] + (layer[3][:5] + (7,),) + layer[4:],), **good)
    with pytest.raises(ValueError, match=r"layers\[0\].input_norm"):
        decoder_plan(((np.ones(3, np.float32),) + layer[1:],), **good)
    with pytest.raises(ValueError, match=r"layers\[0\].k_offset"):
        decoder_plan((layer[:6] + (np.zeros(5, np.float32),),), **good)
    with pytest.raises(TypeError, match="layers"):
        decoder_plan((layer[:6],), **good)
    with pytest.raises(ValueError, match="kv_group"):
        decoder_plan((layer,), **{**good, "kv_group": 3})
    with pytest.raises(ValueError, match=r"^a_clip: expected a ratio in \(0, 1\], got 0\.0$"):
        decoder_plan((layer,), **{**good, "a_clip": 0.0})
    with pytest.raises(ValueError, match=r"^eps: expected a finite value > 0, got -1e-05$"):
        decoder_plan((layer,), **{**good, "eps": -1e-5})
    # eps = 0 (or 0 in float32) divided a zero row by zero, reported as an overflow in the layers
    for eps in (0.0, 1e-50):
        with pytest.raises(ValueError, match=r"^eps: expected a finite value > 0"):
            decoder_plan((layer,), **{**good, "eps": eps})
    with pytest.raises(ValueError, match="num_heads"):
        decoder_plan((layer,), **{**good, "num_kv_heads": cfg.num_attention_heads + 1})
    # non-finite weights' grids, norms, biases and key offsets are refused when planned, not
    # reported later as a bad h
    qkv_nan_scale = (qkv[0], np.full_like(qkv[1], np.nan)) + qkv[2:]
    with pytest.raises(ValueError, match=r"^layers\[0\].qkv.scale: contains NaN or Inf"):
        decoder_plan(((layer[0], layer[1], qkv_nan_scale) + layer[3:],), **good)
    qkv_inf_zero = qkv[:2] + (np.full_like(qkv[2], np.inf),) + qkv[3:]
    with pytest.raises(ValueError, match=r"^layers\[0\].qkv.zero: contains NaN or Inf"):
        decoder_plan(((layer[0], layer[1], qkv_inf_zero) + layer[3:],), **good)
    norm = np.ones(cfg.hidden_size, np.float32)
    norm[3] = np.nan
    with pytest.raises(ValueError, match=r"^layers\[0\].input_norm: contains NaN or Inf"):
        decoder_plan(((norm,) + layer[1:],), **good)
    offset = np.zeros(cfg.num_key_value_heads * fd.head_dim, np.float32)
    offset[0] = np.inf
    with pytest.raises(ValueError, match=r"^layers\[0\].k_offset: contains NaN or Inf"):
        decoder_plan((layer[:6] + (offset,),), **good)
    bias = np.zeros(qkv[0].shape[0], np.float32)
    bias[-1] = np.nan
    with pytest.raises(ValueError, match=r"^layers\[0\].qkv.bias: contains NaN or Inf"):
        decoder_plan(((layer[0], layer[1], qkv[:4] + (bias,) + qkv[5:]) + layer[3:],), **good)
    decoder_plan((layer,), **good)  # the untouched layer is accepted


_RUN_AVX2_KERNEL = (
    "import sys, numpy as np\n"
    "from offq.quant.assemble import load_quantized\n"
    "from offq.quant.fused import FusedDecoder\n"
    "from tiny_models import token_ids\n"
    "real = load_quantized(sys.argv[1], mode='real')[0]\n"
    "ids = token_ids(real.config.vocab_size, 1, 80, 11)\n"
    "h = {}\n"
    "for attention in ('float', 'int8'):\n"
    "    fd = FusedDecoder(real, kernel='avx2', prefill='c', attention=attention)\n"
    "    cache = fd.new_cache()\n"
    "    out = [fd.run(real.embed(ids[:, :70])[0], cache)]\n"
    "    out += [fd.run(real.embed(ids[:, t:t + 1])[0], cache) for t in range(70, 80)]\n"
    "    h[attention] = np.concatenate(out)\n"
    "np.savez(sys.argv[2], h=h['float'], h8=h['int8'])\n"
)


@pytest.mark.skipif(not SIMD.get("avx512"), reason="the CPU has no AVX-512 F")
def test_avx512_attention_and_mix_are_bit_identical_to_avx2(quantized, tmp_path):
    """The 16-lane attention and Hadamard mix run each lane's sums in the AVX2 order: a prompt
    of 70 tokens (two 64-row attention tiles) and 10 decode steps of the C step give the same
    hidden states bit for bit with the dispatch capped at AVX2 (OFFQ_SIMD_MAX=avx2, a fresh
    process) and uncapped; so does the 8-bit attention (AVX2 or VNNI dot products), whose
    70-token prefill reads the K/V tiles unpacked once for the step."""
    quantized.save(tmp_path / "q")
    got = outputs_by_cap(_RUN_AVX2_KERNEL, tmp_path, (str(tmp_path / "q"),))
    np.testing.assert_array_equal(got[""]["h"], got["avx2"]["h"])
    np.testing.assert_array_equal(got[""]["h8"], got["avx2"]["h8"])


@pytest.mark.skipif(os.environ.get("OFFQ_DISABLE_SIMD") == "1", reason="already generic")
def test_generic_dispatch_in_subprocess(tmp_path):
    """The file again with every SIMD path disabled at dispatch (the generic attention too). The
    child imports the offq this process imported (its directory first on PYTHONPATH) and runs
    outside the source tree."""
    import offq

    offq_root = os.path.dirname(os.path.dirname(os.path.abspath(offq.__file__)))
    env = dict(os.environ, OFFQ_DISABLE_SIMD="1",
               PYTHONPATH=os.pathsep.join(filter(None, [offq_root, os.path.dirname(__file__),
                                                        os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        __file__, "-k", "match_the_numpy_path and generic"], env=env,
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
