"""Perplexity protocol (windows, BOS, NLL) and the eval / generate command line.

Fast: a tiny random model for the arithmetic, then a couple of short windows of the embedded
default model (SmolLM2-135M-Instruct, dequantized Q4_1) on WikiText-2.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from offq.cli import main
from offq.eval import make_windows, perplexity, resolve_dataset
from offq.model import DenseLinear, Model
from offq.model.config import ModelConfig
from tiny_models import write_word_tokenizer


# ------------------------------------------------------------------------------------------------
# windows
# ------------------------------------------------------------------------------------------------
def test_windows_without_bos_drop_the_remainder() -> None:
    w = make_windows(list(range(23)), 5)
    assert w.ids.shape == (4, 5) and not w.add_bos and w.stream_tokens == 23
    np.testing.assert_array_equal(w.ids.reshape(-1), np.arange(20))


def test_windows_with_bos_keep_the_input_length() -> None:
    w = make_windows(np.arange(100, 123), 5, bos_id=1, max_windows=3)
    assert w.ids.shape == (3, 5)
    np.testing.assert_array_equal(w.ids[:, 0], [1, 1, 1])
    np.testing.assert_array_equal(w.ids[:, 1:].reshape(-1), np.arange(100, 112))


@pytest.mark.parametrize("kwargs", [dict(seqlen=1), dict(seqlen=50), dict(seqlen=4, max_windows=0)])
def test_windows_reject_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_windows(list(range(20)), **kwargs)


# ------------------------------------------------------------------------------------------------
# perplexity arithmetic on a tiny random model
# ------------------------------------------------------------------------------------------------
def tiny_model(add_bos: bool = False, nan_at: str | None = None) -> Model:
    """A random float model; ``nan_at``: a tensor that gets one NaN."""
    cfg = ModelConfig(architecture="llama", vocab_size=50, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, bos_token_id=1, eos_token_id=2, add_bos=add_bos,
                      max_position_embeddings=64)
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": rng.standard_normal((50, 32)),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(32),
         "lm_head.weight": rng.standard_normal((50, 32)) / 4}
    shapes = cfg.tensor_shapes()
    for name, shape in shapes.items():
        if name not in t:
            t[name] = (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
                       else rng.standard_normal(shape) / math.sqrt(shape[1]))
    t = {k: v.astype(np.float32) for k, v in t.items()}
    if nan_at is not None:
        t[nan_at].flat[3] = np.nan
    return Model.from_tensors(cfg, t, name="tiny")


def direct_nll(model: Model, windows: np.ndarray) -> float:
    logits = model.forward(windows).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return float(-np.take_along_axis(logp[:, :-1], windows[:, 1:, None], -1).mean())


@pytest.mark.parametrize("add_bos", [False, True])
def test_perplexity_is_exp_of_mean_nll(add_bos: bool) -> None:
    model = tiny_model(add_bos)
    stream = np.random.default_rng(1).integers(3, 50, size=70)
    res = perplexity(model, None, stream, seqlen=16, quiet=True)
    bos = 1 if add_bos else None
    win = make_windows(stream, 16, bos_id=bos)
    assert res["windows"] == win.ids.shape[0] == (70 // 15 if add_bos else 70 // 16)
    assert res["tokens"] == res["windows"] * 15
    assert res["add_bos"] is add_bos and res["seqlen"] == 16
    assert res["nll"] == pytest.approx(direct_nll(model, win.ids), rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(res["nll"]))
    # batching windows does not change the result
    res4 = perplexity(model, None, stream, seqlen=16, batch_size=3, quiet=True)
    assert res4["nll"] == pytest.approx(res["nll"], rel=1e-6)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    model = tiny_model()
    model.lm_head = DenseLinear(np.zeros((50, 32), np.float32))
    res = perplexity(model, None, list(range(3, 43)), seqlen=8, quiet=True)
    assert res["ppl"] == pytest.approx(50.0, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# the default model on WikiText-2
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wikitext() -> str:
    return resolve_dataset("wikitext2").read_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def smollm(smollm2_checkpoint, smollm2_tensors):
    ckpt = smollm2_checkpoint
    model = Model.from_tensors(ckpt.config, smollm2_tensors, name=ckpt.name)
    model.tokenizer = ckpt.tokenizer
    return model, ckpt.tokenizer


def test_default_model_perplexity_is_sane(smollm, wikitext: str) -> None:
    model, tok = smollm
    res = perplexity(model, tok, wikitext[:20000], seqlen=128, max_windows=2, quiet=True)
    assert res["windows"] == 2 and res["tokens"] == 2 * 127 and res["add_bos"] is False
    assert math.isfinite(res["ppl"]) and 3.0 < res["ppl"] < 200.0, res


@pytest.mark.parametrize("add_bos", [False, True])
def test_text_perplexity_is_the_mean_nll_of_the_data_windows(smollm, wikitext: str,
                                                              add_bos: bool) -> None:
    """Given a text, perplexity() tokenizes it once and scores exactly offq.data's eval windows
    (every window's seqlen - 1 predicted positions, BOS never a target)."""
    from offq.data import eval_windows
    model, tok = smollm
    text = wikitext[:20000]
    windows = eval_windows(tok, text, seqlen=64, max_windows=2, add_bos=add_bos)
    res = perplexity(model, tok, text, seqlen=64, max_windows=2, add_bos=add_bos, quiet=True)
    direct = np.concatenate([model.nll(w[None]).reshape(-1) for w in windows])
    assert direct.size == res["tokens"] == 2 * 63 and res["windows"] == 2
    assert res["stream_tokens"] == len(tok.encode(text)) and res["add_bos"] is add_bos
    assert res["nll"] == pytest.approx(float(direct.mean()), rel=1e-6)


def test_default_model_generates_greedily(smollm) -> None:
    from offq.generate import GenerationConfig, generate
    model, tok = smollm
    out = generate(model, tok, "The capital of France is", GenerationConfig(max_new_tokens=4))
    assert "Paris" in out


def write_tiny_hf_dir(directory, model: Model) -> None:
    """A HF checkpoint directory (config.json, model.safetensors, word-level tokenizer.json)."""
    from offq.formats.safetensors import SafetensorsWriter
    from offq.model.arch import architecture_of

    cfg = model.config
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf()))
    write_word_tokenizer(directory, cfg.vocab_size)
    with SafetensorsWriter(directory / "model.safetensors") as w:
        w.add("model.embed_tokens.weight", model.embed_tokens)
        w.add("model.norm.weight", model.final_norm)
        w.add("lm_head.weight", model.lm_head.weight)
        arch = architecture_of(cfg)
        for layer in model.layers:
            for n, lin in layer.linears.items():
                w.add(arch.weight(layer.index, n), lin.weight)
            w.add(arch.norm(layer.index, "input_norm"), layer.input_norm)
            w.add(arch.norm(layer.index, "post_norm"), layer.post_attention_norm)


def test_cli_eval_json_on_a_hf_directory(capsys: pytest.CaptureFixture, tmp_path) -> None:
    model = tiny_model()
    write_tiny_hf_dir(tmp_path / "tiny", model)
    stream = np.random.default_rng(2).integers(3, 50, size=100)
    text = tmp_path / "sample.txt"
    text.write_text(" ".join(f"w{i}" for i in stream), encoding="utf-8")
    rc = main(["eval", str(tmp_path / "tiny"), "--dataset", str(text), "--seqlen", "16",
               "--max-windows", "3", "--json", "--quiet", "--threads", "2"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("ppl", "nll", "tokens", "windows", "seqlen", "model"):
        assert key in res
    assert res["windows"] == 3 and res["seqlen"] == 16 and res["model"] == "tiny"
    want = perplexity(model, None, stream, seqlen=16, max_windows=3, quiet=True)
    assert res["nll"] == pytest.approx(want["nll"], rel=1e-6)
    # plain-text output and generation from the same directory
    assert main(["eval", str(tmp_path / "tiny"), "--dataset", str(text), "--seqlen", "16",
                 "--max-windows", "1", "--quiet"]) == 0
    assert "ppl=" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "tiny"), "--prompt", "w3 w4 w5",
                 "--max-new-tokens", "3", "--temperature", "0.7", "--seed", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("w3 w4 w5")


def test_a_mode_other_than_real_on_a_float_model_is_named_not_silently_ignored(tmp_path, caplog):
    from offq.eval import load_model
    write_tiny_hf_dir(tmp_path / "tiny", tiny_model())
    with caplog.at_level("WARNING"):
        load_model(str(tmp_path / "tiny"))
    assert "ignored" not in caplog.text
    with caplog.at_level("WARNING"):
        load_model(str(tmp_path / "tiny"), mode="fused")
    assert "mode='fused' ignored: tiny is a float model" in caplog.text


def test_cli_reports_bad_arguments(capsys: pytest.CaptureFixture) -> None:
    rc = main(["eval", "smollm2-135m", "--dataset", "no-such-dataset", "--quiet"])
    assert rc == 2
    assert "dataset" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------
def test_generation_greedy_sampling_and_seeds() -> None:
    from offq.generate import GenerationConfig, generate_ids
    model = tiny_model()
    prompt = [3, 4, 5, 6]
    greedy = list(generate_ids(model, prompt, GenerationConfig(max_new_tokens=6, stop_at_eos=False)))
    # greedy == argmax of a full forward pass over the growing sequence
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(np.argmax(model.forward(np.array([seq]))[0, -1])))
    assert greedy == seq[len(prompt):]
    # top_k = 1 sampling is greedy; the same seed gives the same sample
    top1 = GenerationConfig(max_new_tokens=6, temperature=1.0, top_k=1, stop_at_eos=False)
    assert list(generate_ids(model, prompt, top1)) == greedy
    hot = GenerationConfig(max_new_tokens=6, temperature=2.0, seed=7, stop_at_eos=False)
    assert list(generate_ids(model, prompt, hot)) == list(generate_ids(model, prompt, hot))


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens="8"), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=None), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed")])
def test_generation_config_rejects_bad_values(kwargs: dict, name: str) -> None:
    from offq.generate import GenerationConfig
    with pytest.raises(ValueError, match=f"^{name}: "):
        GenerationConfig(**kwargs)


def test_generation_edge_cases() -> None:
    """A tiny temperature is greedy (not NaN); float ids are refused, not truncated; generation
    stops, with a warning, when the context is full."""
    from offq.generate import GenerationConfig, generate_ids
    model = tiny_model()
    prompt = [3, 4, 5, 6]
    greedy = list(generate_ids(model, prompt, GenerationConfig(max_new_tokens=4, stop_at_eos=False)))
    cold = GenerationConfig(max_new_tokens=4, temperature=1e-320, stop_at_eos=False)
    assert list(generate_ids(model, prompt, cold)) == greedy
    with pytest.raises(ValueError, match="prompt_ids: expected integer token ids"):
        list(generate_ids(model, [3.7, 4.0], GenerationConfig(max_new_tokens=1)))
    context = model.config.max_position_embeddings
    long_prompt = [3] * (context - 2)
    out = list(generate_ids(model, long_prompt, GenerationConfig(max_new_tokens=10,
                                                                 stop_at_eos=False)))
    assert len(out) == 3  # positions context-2 and context-1 are fed back; the third is not


def test_perplexity_refuses_float_ids_and_saturates_huge_nll() -> None:
    from offq.eval import _exp
    model = tiny_model()
    with pytest.raises(ValueError, match="tokens: expected integer token ids, got dtype float64"):
        perplexity(model, None, [1.7] * 40, seqlen=8, quiet=True)
    with pytest.raises(ValueError, match="tokens: expected integer token ids, got dtype bool"):
        perplexity(model, None, [True] * 40, seqlen=8, quiet=True)
    assert _exp(800.0) == float("inf") and _exp(1.0) == pytest.approx(math.e)



@pytest.mark.parametrize("where", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"])
def test_non_finite_model_output_is_an_error_not_a_result(where: str) -> None:
    """A NaN weight made perplexity return nll=nan, ppl=inf (and `offq eval` print it with exit
    status 0), and greedy generation emit token 0 forever (argmax of NaN logits)."""
    from offq.generate import GenerationConfig, generate_ids
    bad = tiny_model(nan_at=where)
    stream = np.random.default_rng(1).integers(3, 50, size=70)
    with pytest.raises(ValueError, match=r"^tiny: window 0 has a NaN or Inf log-likelihood"):
        perplexity(bad, None, stream, seqlen=16, quiet=True)
    for temperature in (0.0, 1.0):
        cfg = GenerationConfig(max_new_tokens=3, temperature=temperature, stop_at_eos=False)
        with pytest.raises(ValueError, match=r"^logits: NaN or Inf at position 3"):
            list(generate_ids(bad, [3, 4, 5, 6], cfg))


def test_perplexity_names_its_arguments_before_running() -> None:
    """A window longer than the model's context names ``seqlen`` (not the model's ``ids``); a
    model that is none of the accepted kinds names ``model``; text without a tokenizer says so."""
    model = tiny_model()
    stream = np.random.default_rng(1).integers(3, 50, size=70)
    context = int(model.config.max_position_embeddings)
    with pytest.raises(ValueError, match=rf"^seqlen: {context + 1} tokens per window exceed "
                                         rf"the model's context of {context}"):
        perplexity(model, None, stream, seqlen=context + 1, quiet=True)
    with pytest.raises(TypeError, match="^model: expected a Model"):
        perplexity(5, None, stream, seqlen=16, quiet=True)
    with pytest.raises(ValueError, match="^tokenizer: needed to encode the text, and .* has none"):
        perplexity(model, None, "some text", seqlen=16, quiet=True)


# ---------------------------------------------------------------------- found by mutation
def test_cli_generate_passes_top_k(tmp_path, capsys):
    """--top-k 1 samples greedily at any temperature: the CLI must hand it to generation (a
    CLI that dropped it sampled at temperature 5 here)."""
    from offq.cli import main

    write_tiny_hf_dir(tmp_path / "tiny", tiny_model())
    args = ["generate", str(tmp_path / "tiny"), "--prompt", "w3 w4 w5", "--max-new-tokens", "12",
            "--quiet"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert main(args + ["--temperature", "5", "--top-k", "1", "--seed", "3"]) == 0
    assert capsys.readouterr().out == greedy
    assert main(args + ["--temperature", "5", "--seed", "3"]) == 0
    assert capsys.readouterr().out != greedy  # so top_k = 1 is what made them equal


def test_cli_quantize_samples_calibration_with_its_seed(tmp_path, capsys):
    """--seed picks the calibration sample: the checkpoint's calibration record holds the hash
    of the tokens sampled with that seed (a CLI that sampled with seed 0 kept the record's
    'seed': 7 over other tokens)."""
    from offq.cli import main
    from offq.data import sample_calibration
    from offq.formats import open_checkpoint
    from offq.recipe.store import calibration_record

    write_tiny_hf_dir(tmp_path / "tiny", tiny_model())
    source = tmp_path / "calib.txt"
    rng = np.random.default_rng(0)
    source.write_text("\n\n".join(" ".join(f"w{i}" for i in rng.integers(3, 50, 40))
                                  for _ in range(30)), encoding="utf-8")
    out = tmp_path / "q"
    assert main(["quantize", str(tmp_path / "tiny"), "--method", "gptq", "--out", str(out),
                 "--calib-source", str(source), "--calib-samples", "4", "--calib-seqlen", "16",
                 "--seed", "7", "--quiet", "--threads", "1"]) == 0
    record = json.loads((out / "config.json").read_text())["offq"]["calibration"]
    with open_checkpoint(str(tmp_path / "tiny")) as ck:
        want = {s: calibration_record(sample_calibration(ck.tokenizer, str(source), n=4,
                                                         seqlen=16, seed=s), str(source), s)
                for s in (0, 7)}
    assert want[0]["tokens_sha256"] != want[7]["tokens_sha256"]
    assert record["seed"] == 7 and record["tokens_sha256"] == want[7]["tokens_sha256"]


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_non_finite_window_is_named_by_its_index(bad, monkeypatch) -> None:
    """Window 1 of 3 (batches of one) with an infinite or NaN log-likelihood: an error naming
    window 1 (an Inf passed a NaN-only check as ppl=inf; the index lost its batch offset)."""
    model = tiny_model()
    real_nll, calls = model.nll, []

    def nll(ids):
        out = real_nll(ids)
        calls.append(1)
        if len(calls) == 2:
            out[:] = bad
        return out

    monkeypatch.setattr(model, "nll", nll)
    stream = np.random.default_rng(1).integers(3, 50, size=96)
    with pytest.raises(ValueError, match=r"^tiny: window 1 has a NaN or Inf log-likelihood"):
        perplexity(model, None, stream, seqlen=32, batch_size=1, quiet=True)


def test_api_quantize_samples_texts_with_the_model_s_bos_and_config_seed(tmp_path):
    """offq.quantize(model, config, calibration=texts) samples with config.seed and the model's
    add_bos, and records what it sampled (BOS dropped, or seed 0 recorded, passed before)."""
    import offq
    from offq.config import QuantConfig
    from offq.data import sample_calibration
    from offq.recipe.store import calibration_record

    write_tiny_hf_dir(tmp_path / "tiny", tiny_model(add_bos=True))
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(3, 50, 30)) for _ in range(20)]
    cfg = QuantConfig(method="gptq", a_bits=16, kv_bits=16, calib_samples=2, calib_seqlen=16,
                      seed=7)
    with offq.open_checkpoint(str(tmp_path / "tiny")) as ck:
        assert ck.config.add_bos
        offq.quantize(ck, cfg, texts, out_dir=tmp_path / "q", progress=False)
        rows = sample_calibration(ck.tokenizer, texts, n=2, seqlen=16, seed=7, add_bos=True)
    assert np.all(rows[:, 0] == 1)  # BOS first in every row
    record = json.loads((tmp_path / "q" / "config.json").read_text())["offq"]["calibration"]
    want = calibration_record(rows, "in-memory documents", 7)
    assert record["seed"] == 7 and record["tokens_sha256"] == want["tokens_sha256"]


def test_cli_threads_sets_the_kernels_thread_count(tmp_path, capsys):
    """--threads N is the kernels' (and BLAS's) thread count for the command (a CLI that
    ignored it ran on every core)."""
    from offq import _C
    from offq.cli import main

    write_tiny_hf_dir(tmp_path / "tiny", tiny_model())
    before = _C.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        assert main(["generate", str(tmp_path / "tiny"), "--prompt", "w3", "--max-new-tokens",
                     "1", "--quiet", "--threads", str(want)]) == 0
        assert _C.get_num_threads() == want
    finally:
        from offq.kernels import set_num_threads
        set_num_threads(before)
