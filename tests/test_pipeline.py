"""End to end on tiny random models: fused+rotated FP model keeps its logits, fake-quant and
real-kernel paths agree, the offq checkpoint round-trips and validates, and an interrupted run
resumed with --resume writes a byte-identical checkpoint."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import offq
from offq.recipe import pipeline
from offq.formats.checkpoint import load_safetensors, save_safetensors
from offq.quant.assemble import load_quantized
from offq.config import QuantConfig
from offq.model import Model
from tiny_models import calibration, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("arch,biases", [("llama", {}), ("qwen2", {}),
                                          ("llama", {"attention_bias": True, "tie": False}),
                                          ("llama", {"attention_bias": True, "mlp_bias": True})])
@pytest.mark.parametrize("method,extra", [("offq", {}), ("quarot", {}),
                                          ("offq", {"r2": "pca_hadamard", "pca": "standard",
                                                    "pca_centred": True, "a_group_size": 32})])
def test_rotated_fp_model_keeps_logits(arch, biases, method, extra):
    """Every quantizer off: the fused and rotated model (R1..R4, biases rotated where they sit in
    the residual basis) computes the source model's logits, tied and untied, with and without
    Llama's optional attention and MLP biases."""
    ckpt = tiny_checkpoint(0, arch=arch, **biases)
    ids = calibration(ckpt, 2, 24, seed=5)
    ref = Model.from_tensors(ckpt.config, ckpt.tensors).forward(ids)
    cfg = QuantConfig(method=method, w_bits=16, a_bits=16, kv_bits=16, **extra)
    res = pipeline.quantize(ckpt, cfg, calibration(ckpt))
    for mode in ("fake", "real"):
        assert rel(res.model(mode).forward(ids), ref) < 1e-4


@pytest.mark.parametrize("as_store", [False, True])
@pytest.mark.parametrize("tie", [True, False])
def test_global_tensors_in_place_leave_the_checkpoint_alone(monkeypatch, as_store, tie):
    """The final write fuses the final norm and R1 into the embeddings and LM head in place (no
    vocabulary-sized copy). The checkpoint's own arrays stay as they were (a plain dict's and a
    TensorStore's, tied or not), and the result is the out-of-place functions' bit for bit, block
    boundaries included."""
    from types import SimpleNamespace

    from offq.formats.memory import ArrayTensorStore
    from offq.model.arch import architecture_of
    from offq.recipe import rotations as rot

    monkeypatch.setattr(rot, "_VOCAB_ROWS", 16)  # 101 rows: 7 blocks, the last one short
    ckpt = tiny_checkpoint(0, tie=tie)
    if as_store:
        ckpt = SimpleNamespace(**{**vars(ckpt), "tensors": ArrayTensorStore(ckpt.tensors)})
    arch = architecture_of(ckpt.config)
    names = [n for n in (arch.embed[0], arch.final_norm[0], arch.lm_head[0]) if n in ckpt.tensors]
    before = {n: np.array(ckpt.tensors[n], copy=True) for n in names}
    r1 = np.linalg.qr(np.random.default_rng(3).standard_normal((64, 64)))[0]

    got = pipeline.global_tensors(ckpt, arch, r1)

    want = {n: np.array(before[n], copy=True) for n in names}
    rot.untie_embeddings(want, arch)
    rot.fuse_final_norm(want, arch)
    rot.rotate_embeddings(want, r1, arch)
    rot.rotate_head(want, r1, arch)
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    for n in names:
        np.testing.assert_array_equal(ckpt.tensors[n], before[n], err_msg=f"{n} was modified")
    assert not np.array_equal(got[arch.embed[0]], before[arch.embed[0]])


def test_calibration_rows_are_the_rotated_embeddings_rows_and_read_twice(monkeypatch):
    """The layer loop starts from the embeddings' calibration rows rotated on their own: the same
    rows as the saved, rotated matrix's up to float32 rounding (sgemm rounds a row differently
    with the rows per call). The embedding matrix is read twice per run (the finiteness check,
    which keeps the rows, and the final write), not four times; the statistics pass is given
    the rows it used to read itself."""
    from types import SimpleNamespace

    from offq.formats.memory import ArrayTensorStore
    from offq.model.arch import architecture_of
    from offq.recipe import rotations as rot
    from offq.recipe import statistics

    monkeypatch.setattr(rot, "_VOCAB_ROWS", 16)  # both sides blocked, the last block short
    ckpt = tiny_checkpoint(0, tie=False)
    arch = architecture_of(ckpt.config)
    calib = calibration(ckpt, 5, 19, 2)
    r1 = np.linalg.qr(np.random.default_rng(3).standard_normal((64, 64)))[0]
    saved = pipeline.global_tensors(ckpt, arch, r1)[arch.embed[0]]
    rows = np.asarray(ckpt.tensors[arch.embed[0]], dtype=np.float32)[calib]
    got = rot.rotate_rows(rows, r1)
    assert got.shape == rows.shape
    np.testing.assert_allclose(got, saved[calib], rtol=0, atol=1e-6 * np.abs(saved).max())
    assert np.abs(got - rows).max() > 0.1  # rotated, not passed through

    reads, seen = [], {}

    class Counting(ArrayTensorStore):
        def __getitem__(self, name):
            reads.append(name)
            return super().__getitem__(name)

    real_stats = statistics.collect_statistics

    def spy(ckpt_, mc, cfg, ids, batch_size, show, *, embedded=None):
        seen["embedded"], seen["ids"] = embedded.copy(), ids  # rotated in place later
        return real_stats(ckpt_, mc, cfg, ids, batch_size, show, embedded=embedded)

    monkeypatch.setattr(pipeline, "collect_statistics", spy)
    counted = SimpleNamespace(**{**vars(ckpt), "tensors": Counting(ckpt.tensors)})
    cfg = QuantConfig(method="offq", a_group_size=32, pca_samples=2)
    pipeline.quantize(counted, cfg, calib, batch_size=2, progress=False)
    assert reads.count(arch.embed[0]) == 2
    np.testing.assert_array_equal(seen["embedded"], rows[:2])
    np.testing.assert_array_equal(seen["ids"], calib[:2])


@pytest.mark.parametrize("method,extra", [
    ("offq", {}), ("quarot", {}), ("gptq", {}), ("rtn", {}),
    ("offq", {"w_quantizer": "rtn", "a_group_size": -1}),
    ("offq", {"a_bits": 8, "kv_bits": 8}), ("offq", {"a_bits": 16, "kv_bits": 16}),
    ("offq", {"w_group_size": 32, "w_symmetric": False, "a_symmetric": True}),
])
def test_fake_and_real_paths_agree(method, extra):
    ckpt = tiny_checkpoint(1, arch="qwen2")
    cfg = QuantConfig(method=method, a_group_size=extra.pop("a_group_size", 32), **extra)
    res = pipeline.quantize(ckpt, cfg, calibration(ckpt))
    ids = calibration(ckpt, 2, 24, seed=6)
    fake = res.model("fake").nll(ids)
    real = res.model("real").nll(ids)
    assert abs(np.exp(fake.mean()) / np.exp(real.mean()) - 1) < 1e-3
    # float32 accumulation order can move an activation across a rounding boundary now and
    # then: almost every token agrees to ~1e-6, none by more than a few percent
    assert np.median(np.abs(fake - real)) < 1e-4 and np.abs(fake - real).max() < 0.05
    # decoding token by token with the packed KV cache equals the full forward. W4A4 products
    # are the same integers at any M; other widths use sgemm on fake-quantized inputs, whose
    # one-row (sgemv) and many-row sums round differently and can flip an 8-bit activation code
    # (seen once in CI at 2.7e-3; a broken cache is off by far more)
    model = res.model("real")
    cache = model.new_cache()
    steps = np.concatenate([model.forward(ids[:1, t:t + 1], cache=cache) for t in range(8)], axis=1)
    assert rel(steps, model.forward(ids[:1, :8])) < (1e-4 if cfg.a_bits == 4 else 1e-2)


def test_offq_r1_from_top1_statistics_absorbs_massive_activations():
    """The OffQ mechanism with the pipeline's statistics in the loop: sequences whose first token
    carries a massive component along one dense direction; R1 from the top-1 second moment makes
    that component a per-group constant, so 4-bit asymmetric group quantization of the massive
    tokens is as accurate as of normal ones (unrotated and random-Hadamard R1 are not)."""
    from offq.recipe import rotations as rot
    from offq.kernels import dequantize, quantize

    rng = np.random.default_rng(0)
    d, g, b, t = 128, 32, 64, 16
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    x = rng.standard_normal((b, t, d))
    x[:, 0] += rng.uniform(200, 300, size=(b, 1)) * u  # massive first tokens
    from offq.recipe.statistics import SecondMoment

    stats = SecondMoment(d, centred=False)
    stats.add(x.astype(np.float32), top1=True)
    assert stats.n == b
    err = {}
    for name, r in [("none", np.eye(d)), ("quarot", rot.quarot_r1(d, 0)),
                    ("offq", rot.offq_r1(stats.matrix(), d, g))]:
        y = np.ascontiguousarray((x.reshape(-1, d) @ r).astype(np.float32))
        e = ((dequantize(quantize(y, bits=4, group_size=g)) - y) ** 2).mean(axis=1).reshape(b, t)
        err[name] = (e[:, 0].mean(), e[:, 1:].mean())
    massive, normal = err["offq"]
    assert massive < 1.5 * normal, err
    assert massive < 0.1 * err["none"][0] and massive < 0.1 * err["quarot"][0], err


def test_checkpoint_round_trip_and_validation(tmp_path):
    ckpt = tiny_checkpoint(3, arch="qwen2")
    cfg = QuantConfig(method="offq", a_group_size=32)
    mem = pipeline.quantize(ckpt, cfg, calibration(ckpt))
    out = tmp_path / "q"
    pipeline.quantize(ckpt, cfg, calibration(ckpt), out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    block = json.loads((out / "config.json").read_text())["offq"]
    assert block["quant_config"]["method"] == "offq" and block["format_version"] == 1
    tensors, _ = load_safetensors(out / "model.safetensors")
    q = tensors["model.layers.0.self_attn.q_proj.qweight"]
    assert q.dtype == np.uint8 and q.shape == (64, 32)  # two 4-bit codes per byte
    ids = calibration(ckpt, 2, 16, seed=8)
    model, tok, qcfg = load_quantized(out)
    assert tok is None
    # config.json records the calibration actually used (8 x 48 tokens here), not the defaults
    assert qcfg == dataclasses.replace(cfg, calib_samples=8, calib_seqlen=48)
    calib = block["calibration"]
    assert (calib["samples"], calib["seqlen"]) == (8, 48) and len(calib["tokens_sha256"]) == 64
    np.testing.assert_array_equal(model.forward(ids), mem.model("real").forward(ids))

    # corrupted checkpoints fail with clear errors
    bad = json.loads((out / "config.json").read_text())
    bad["offq"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="format_version"):
        load_quantized(out)
    bad["offq"]["format_version"] = 1
    bad["offq"]["quant_config"]["w_bits"] = 3
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="qweight"):
        load_quantized(out)
    bad["offq"]["quant_config"]["w_bits"] = 4
    (out / "config.json").write_text(json.dumps(bad))
    t = dict(tensors)
    del t["model.layers.1.mlp.down_proj.scales"]
    save_safetensors(out / "model.safetensors", t)
    with pytest.raises(ValueError, match="down_proj.scales"):
        load_quantized(out)
    (out / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="header"):
        load_quantized(out)


def test_config_validation_errors():
    with pytest.raises(ValueError, match="calibration"):
        pipeline.quantize(tiny_checkpoint(0), QuantConfig(method="gptq"), None)
    with pytest.raises(ValueError, match="calibration"):
        pipeline.quantize(tiny_checkpoint(0), QuantConfig(method="gptq"), np.zeros((2, 8)))
    with pytest.raises(ValueError, match="resume"):
        pipeline.quantize(tiny_checkpoint(0), QuantConfig(method="rtn"), None, resume=True)


@pytest.mark.parametrize("field", ["osaq_mu2", "osaq_mu1", "osaq_tau_rel", "gptq_damp"])
def test_quant_config_refuses_infinite_numbers(field):
    with pytest.raises(ValueError, match=f"^{field}: expected a finite"):
        QuantConfig(method="gptq", w_quantizer="osaq+gptq", **{field: float("inf")})


def test_statistics_read_the_first_pca_samples_sequences():
    """R1 comes from the first ``pca_samples`` calibration sequences only (0: all of them), and
    checkpoints written before the field existed read back as "all"."""
    ckpt = tiny_checkpoint(0)
    calib = calibration(ckpt, 6, 32, 0)
    other = calib.copy()
    other[2:] = calibration(ckpt, 4, 32, 7)  # the same first two sequences, then others

    def r1(ids, n):
        cfg = QuantConfig(method="offq", a_group_size=32, pca_samples=n)
        return pipeline.compute_rotations(ckpt, ckpt.config, cfg, ids, 2, False)[0]

    np.testing.assert_array_equal(r1(calib, 2), r1(other, 2))
    assert np.abs(r1(calib, 0) - r1(other, 0)).max() > 1e-3
    np.testing.assert_array_equal(r1(calib, 0), r1(calib, 6))
    old = QuantConfig().to_dict()
    del old["pca_samples"]
    assert QuantConfig.from_dict(old).pca_samples == 0
    with pytest.raises(ValueError, match="pca_samples"):
        QuantConfig(pca_samples=-1)
    assert "r1:top1(8seq)" in QuantConfig(calib_samples=16).describe()
    assert "seq)" not in QuantConfig(calib_samples=8).describe()


def test_calib_activations_setting():
    """Checked like every choice, quantized by default, named either way in the protocol line
    (weight-only runs have no activations to round, and name neither), read back, and float
    for checkpoints written before it existed (which calibrated with float activations)."""
    with pytest.raises(ValueError, match="^calib_activations: expected one of float, quantized"):
        QuantConfig(calib_activations="int4")
    assert QuantConfig().calib_activations == "quantized"
    assert "act-quantized" in QuantConfig().describe()
    assert "act-float" in QuantConfig(calib_activations="float").describe()
    assert "act-" not in QuantConfig(method="gptq", a_bits=16, kv_bits=16).describe()
    cfg = QuantConfig(calib_activations="float")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    old = QuantConfig().to_dict()
    del old["calib_activations"]
    assert QuantConfig.from_dict(old).calib_activations == "float"


def test_config_version_is_checked_before_it_is_compared():
    """A string "1" was reported as a version newer than this offq."""
    data = QuantConfig().to_dict()
    assert QuantConfig.from_dict(dict(data, config_version=1)) == QuantConfig()
    for bad in ("1", 1.0, True, 0, None):
        with pytest.raises(ValueError, match=r"^offq config: config_version must be a positive "
                                             r"integer, got "):
            QuantConfig.from_dict(dict(data, config_version=bad))
    with pytest.raises(ValueError, match="config_version 99 is newer than this offq supports"):
        QuantConfig.from_dict(dict(data, config_version=99))


def test_runtime_fields_enter_the_weights_only_through_the_quantized_crossing():
    """Which configs store the same tensors (what ``benchmarks/bench_results.py``'s
    ``weight_key`` lets its rows reuse): with the float crossing, a run-time activation or KV
    field changes nothing stored; with the quantized crossing (the default) the activation
    fields change the weights, the KV fields still do not. Tiny model, 2 x 32 tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from bench_results import weight_key
    finally:
        sys.path.pop(0)
    ckpt = tiny_checkpoint(2, layers=2, d=64, hd=16, f=128)

    def stored(cfg):
        res = pipeline.quantize(ckpt, cfg, calibration(ckpt, 2, 32, 0), batch_size=2,
                                progress=False)
        return {k: np.asarray(v) for k, v in res.tensors.items()}

    for crossing in ("float", "quantized"):
        base = QuantConfig(method="offq", a_group_size=32, calib_activations=crossing)
        ref = stored(base)
        for change in (dict(a_symmetric=True), dict(kv_bits=8)):
            cfg = dataclasses.replace(base, **change)
            same = weight_key(cfg) == weight_key(base)
            got = stored(cfg)
            equal = got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
            assert equal == same, (crossing, change, same)
            assert same == (crossing == "float" or "kv_bits" in change), (crossing, change)


def test_gptq_dtype_setting_reaches_the_factorization_and_the_updates(monkeypatch):
    """Checked like every choice, shown in the protocol line unless it is the default (auto),
    read back, float64 for older checkpoints (written before the field, or before auto), and
    carried to GPTQ's factorization of every site and to its updates (the lazy block update
    sees float32 weights); auto picks per site by its input width."""
    from offq.quantizers import gptq

    with pytest.raises(ValueError, match="^gptq_dtype: expected one of auto, float64, float32"):
        QuantConfig(gptq_dtype="float16")
    cfg = QuantConfig(method="offq", a_group_size=32, gptq_dtype="float32")
    assert "gptq(f32)," in cfg.describe()
    assert "gptq(f64)," in dataclasses.replace(cfg, gptq_dtype="float64").describe()
    assert QuantConfig().gptq_dtype == "auto"
    assert "(f32)" not in QuantConfig().describe() and "(f64)" not in QuantConfig().describe()
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    old = QuantConfig().to_dict()
    del old["gptq_dtype"]
    assert QuantConfig.from_dict(old).gptq_dtype == "float64"
    old["gptq_factor_dtype"] = "float32"
    assert QuantConfig.from_dict(old).gptq_dtype == "float64"
    assert [gptq.gptq_precision("auto", k) for k in (576, 4095, 4096, 8960)] == \
        ["float64", "float64", "float32", "float32"]
    assert gptq.gptq_precision("float64", 8960) == "float64"
    assert gptq.gptq_precision("float32", 64) == "float32"

    seen = []
    real = gptq._udu_factor

    def spy(h, add, perm, diag, single=False):
        seen.append(single)
        return real(h, add, perm, diag, single)

    monkeypatch.setattr(gptq, "_udu_factor", spy)
    updated = []
    real_update = gptq.gptq_block_update

    def spy_update(wt, *args, **kwargs):
        updated.append(wt.dtype)
        return real_update(wt, *args, **kwargs)

    monkeypatch.setattr(gptq, "gptq_block_update", spy_update)
    ckpt = tiny_checkpoint(1, layers=2, d=64, hd=16, f=128)
    for dtype, want in (("float32", True), ("float64", False)):
        seen.clear()
        updated.clear()
        pipeline.quantize(ckpt, dataclasses.replace(cfg, gptq_dtype=dtype),
                          calibration(ckpt, 2, 32, 0), batch_size=2, progress=False)
        assert seen and set(seen) == {want}, (dtype, seen)
        assert updated and set(updated) == {np.dtype(dtype)}, (dtype, set(updated))
    # auto, with the threshold at the tiny model's FFN width: down_proj's site (K = 128) runs in
    # float32, the three sites of d = 64 inputs in float64
    monkeypatch.setattr(gptq, "GPTQ_FLOAT32_FROM_K", 128)
    seen.clear()
    updated.clear()
    pipeline.quantize(ckpt, dataclasses.replace(cfg, gptq_dtype="auto"),
                      calibration(ckpt, 2, 32, 0), batch_size=2, progress=False)
    assert seen == [False, False, False, True] * 2, seen
    assert np.dtype("float32") in updated and np.dtype("float64") in updated


RUN = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from tiny_models import tiny_checkpoint, calibration
    from offq.recipe import pipeline
    from offq.config import QuantConfig
    ckpt = tiny_checkpoint(4, layers=8, d=128, hd=32, f=384)
    cfg = QuantConfig(method="offq", a_group_size=32, calib_samples=16, calib_seqlen=96)
    pipeline.quantize(ckpt, cfg, calibration(ckpt, 16, 96), out_dir=sys.argv[1],
                      resume=len(sys.argv) > 2, batch_size=4, progress=False)
""")


def test_resume_after_kill_is_byte_identical(tmp_path):
    script = tmp_path / "run.py"
    # The child imports the offq build under test (installed or in-place), not a bare source tree.
    offq_root = Path(offq.__file__).resolve().parents[1]
    script.write_text(RUN.format(root=str(offq_root), tests=str(ROOT / "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run([sys.executable, str(script), str(whole)], check=True, env=env, timeout=300)

    proc = subprocess.Popen([sys.executable, str(script), str(cut)], env=env)
    partial = cut / ".offq-partial"
    deadline = time.time() + 240
    while not (partial / "layer_0001.safetensors").exists():
        assert proc.poll() is None, "run finished before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in partial.glob("layer_*.safetensors"))
    assert 2 <= len(done) < 8, done
    assert not (cut / "model.safetensors").exists()

    subprocess.run([sys.executable, str(script), str(cut), "--resume"], check=True, env=env,
                   timeout=300)
    for name in ("model.safetensors", "config.json"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name
    assert not partial.exists()


@pytest.mark.parametrize("calib", ["float", "quantized"])
def test_resume_continues_each_calibration_setting_bit_for_bit(tmp_path, monkeypatch, calib):
    """A resumed run carries the batch through the stored layers the way the interrupted run
    carried it (with ``calib_activations="quantized"``: rounded activations on the real
    kernels), so its checkpoint is the uninterrupted one's. In process: the run is stopped by an
    error once layer 2 is stored."""
    from offq.recipe.store import CheckpointStore

    ckpt = tiny_checkpoint(5, layers=5, d=64, hd=16, f=128)
    cfg = QuantConfig(method="offq", a_group_size=32, calib_samples=6, calib_seqlen=24,
                      calib_activations=calib)
    calib_ids = calibration(ckpt, 6, 24)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    pipeline.quantize(ckpt, cfg, calib_ids, out_dir=whole, batch_size=2, progress=False)
    save = CheckpointStore.save_layer

    def stop_after_layer_2(self, i, tensors):
        save(self, i, tensors)
        if i == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointStore, "save_layer", stop_after_layer_2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.quantize(ckpt, cfg, calib_ids, out_dir=cut, batch_size=2, progress=False)
    monkeypatch.setattr(CheckpointStore, "save_layer", save)
    pipeline.quantize(ckpt, cfg, calib_ids, out_dir=cut, batch_size=2, progress=False,
                      resume=True)
    for name in ("model.safetensors", "config.json"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name


def test_bad_runs_fail_before_any_pass(tmp_path, monkeypatch):
    """Mistakes a user makes are refused up front, naming the argument, before statistics or
    calibration run (a pass here would fail the test) and before the output directory is
    touched."""
    ckpt = tiny_checkpoint(0)  # d 64, head_dim 16, intermediate 128
    calib = calibration(ckpt)

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass ran before the arguments were checked")

    monkeypatch.setattr(pipeline, "collect_statistics", no_pass)
    monkeypatch.setattr(pipeline, "calibrate_layer", no_pass)
    gptq = QuantConfig(method="gptq")
    for kwargs, match in [
        (dict(batch_size=0), "batch_size: expected a positive integer, got 0"),
        (dict(batch_size=-1), "batch_size"),
        (dict(batch_size=1.5), "batch_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            pipeline.quantize(ckpt, gptq, calib, **kwargs)
    with pytest.raises(ValueError, match="w_group_size: expected -1 or a divisor of 64, got 48"):
        pipeline.quantize(ckpt, QuantConfig(method="gptq", w_group_size=48), calib)
    # 96 >= the hidden size (one group per row there) but does not divide the intermediate 128
    with pytest.raises(ValueError, match="w_group_size: expected -1 or a divisor of 128, got 96"):
        pipeline.quantize(ckpt, QuantConfig(method="gptq", w_group_size=96), calib)
    with pytest.raises(ValueError, match="kv_group_size: expected -1 or a divisor of 16, got 5"):
        pipeline.quantize(ckpt, QuantConfig(method="rtn", kv_group_size=5), None)
    too_long = np.zeros((1, ckpt.config.max_position_embeddings + 1), np.int64)
    with pytest.raises(ValueError, match="calibration: sequences of .* exceed the model's context"):
        pipeline.quantize(ckpt, gptq, too_long)
    with pytest.raises(TypeError, match="config: expected a QuantConfig"):
        pipeline.quantize(ckpt, {"method": "rtn"}, None)
    with pytest.raises(TypeError, match="ckpt: expected an opened checkpoint"):
        pipeline.quantize(None, gptq, calib)


def test_output_directories_that_would_destroy_something_are_refused(tmp_path):
    ckpt = tiny_checkpoint(0)
    rtn = QuantConfig(method="rtn")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    for out, match in [("", "out_dir: empty"), (busy, "busy exists, is not empty"),
                       (tmp_path / "afile", "afile exists and is not a directory")]:
        with pytest.raises(ValueError, match=match):
            pipeline.quantize(ckpt, rtn, None, out_dir=out)
    assert (busy / "notes.txt").read_text() == "mine" and sorted(p.name for p in busy.iterdir()) \
        == ["notes.txt"]
    # the source itself (a checkpoint whose files live in the directory)
    ckpt.path = tmp_path / "src"
    ckpt.path.mkdir()
    with pytest.raises(ValueError, match="is the input being read"):
        pipeline.quantize(ckpt, rtn, None, out_dir=ckpt.path)
    # an earlier output of the same run may be overwritten, and an empty directory used
    pipeline.quantize(ckpt, rtn, None, out_dir=tmp_path / "q", progress=False)
    pipeline.quantize(ckpt, rtn, None, out_dir=tmp_path / "q", progress=False)
    # but not a checkpoint another configuration wrote: it is left as it was
    before = (tmp_path / "q" / "config.json").read_bytes()
    with pytest.raises(ValueError, match="finished offq checkpoint made with a different w_bits"):
        pipeline.quantize(ckpt, dataclasses.replace(rtn, w_bits=3), None, out_dir=tmp_path / "q",
                          progress=False)
    assert (tmp_path / "q" / "config.json").read_bytes() == before
    (tmp_path / "empty").mkdir()
    pipeline.quantize(ckpt, rtn, None, out_dir=tmp_path / "empty", progress=False)


def test_a_second_run_into_a_directory_being_written_is_refused(tmp_path, monkeypatch):
    """Two runs into one directory (a pipeline's retry while the first still runs): the second
    discarded the first's unfinished layers ("discarding the unfinished run") and the two then
    wrote each other's files. The directory is locked while a run writes it; the second run is
    refused before it touches anything, from another process too, and the lock goes with the
    run that held it (finished, failed or interrupted)."""
    from offq.formats.files import DirectoryLock
    from offq.recipe.store import CheckpointStore

    ckpt = tiny_checkpoint(0, layers=3)
    cfg = QuantConfig(method="offq", w_quantizer="rtn", calib_samples=2, calib_seqlen=24)
    calib = calibration(ckpt, 2, 24)
    out = tmp_path / "q"
    save = CheckpointStore.save_layer

    def stop_after_layer_0(self, i, tensors):
        save(self, i, tensors)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # an interrupted run leaves its layer 0
        m.setattr(CheckpointStore, "save_layer", stop_after_layer_0)
        with pytest.raises(KeyboardInterrupt):
            pipeline.quantize(ckpt, cfg, calib, out_dir=out, progress=False)
    stored = out / ".offq-partial" / "layer_0000.safetensors"
    before = stored.read_bytes()
    busy = "is being written by another offq run; wait for it to finish or choose another"
    with DirectoryLock(out):  # the run that resumes it, in this process
        for resume in (False, True):
            with pytest.raises(ValueError, match=f"^out_dir: {out} {busy}"):
                pipeline.quantize(ckpt, cfg, calib, out_dir=out, progress=False, resume=resume)
    assert stored.read_bytes() == before
    holder = subprocess.Popen(  # and in another process
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
         "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
         "time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=busy):
            pipeline.quantize(ckpt, cfg, calib, out_dir=out, progress=False, resume=True)
    finally:
        holder.kill()
        holder.wait()
    assert stored.read_bytes() == before
    refused = []

    def save_and_try_a_second_writer(self, i, tensors):
        save(self, i, tensors)
        with pytest.raises(ValueError, match=busy):
            DirectoryLock(out)
        refused.append(i)

    with monkeypatch.context() as m:  # the run holds the lock while it writes
        m.setattr(CheckpointStore, "save_layer", save_and_try_a_second_writer)
        pipeline.quantize(ckpt, cfg, calib, out_dir=out, progress=False, resume=True)
    assert refused == [1, 2]
    with DirectoryLock(out):  # released by the run that finished
        pass
    (out / "tokenizer.json").mkdir()  # refused by the run once it holds the lock
    with pytest.raises(ValueError, match="tokenizer.json: a directory"):
        pipeline.quantize(ckpt, cfg, calib, out_dir=out, progress=False)
    DirectoryLock(out).release()  # which it gave back


def test_what_a_directory_holds_is_judged_under_its_lock(tmp_path, monkeypatch):
    """Another run that finishes while this one waits to write (between its checks and its lock)
    must still stop this one from replacing a checkpoint made with another configuration: the
    checks ran before the lock, so this run then started over on top of it (a review's
    two-thread reproduction: the W4 checkpoint became W8)."""
    from offq.formats.files import DirectoryLock

    ckpt = tiny_checkpoint(0, layers=2)
    w4 = QuantConfig(method="rtn", w_bits=4, a_bits=16, kv_bits=16)
    out = tmp_path / "q"

    class OtherRunFinishesFirst(DirectoryLock):
        def __init__(self, directory, *args, **kwargs):
            monkeypatch.setattr(pipeline, "DirectoryLock", DirectoryLock)
            pipeline.quantize(ckpt, w4, None, out_dir=directory, progress=False)
            super().__init__(directory, *args, **kwargs)

    monkeypatch.setattr(pipeline, "DirectoryLock", OtherRunFinishesFirst)
    with pytest.raises(ValueError, match="finished offq checkpoint made with a different w_bits"):
        pipeline.quantize(ckpt, dataclasses.replace(w4, w_bits=8), None, out_dir=out,
                          progress=False)
    assert json.loads((out / "config.json").read_text())["offq"]["quant_config"]["w_bits"] == 4


def test_a_directory_where_a_file_goes_is_refused_before_any_pass(tmp_path, monkeypatch):
    """A directory at a name the run writes failed only when it was written: model.safetensors
    after every layer, a stored layer (on resume) after that layer's work."""
    from offq.recipe.store import CheckpointStore

    ckpt = tiny_checkpoint(0, layers=3)
    cfg = QuantConfig(method="offq", w_quantizer="rtn", calib_samples=2, calib_seqlen=24)
    calib = calibration(ckpt, 2, 24)
    out = tmp_path / "q"
    pipeline.quantize(ckpt, cfg, calib, out_dir=out, progress=False)
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").mkdir()
    save = CheckpointStore.save_layer

    def stop_after_layer_0(self, i, tensors):
        save(self, i, tensors)
        raise KeyboardInterrupt

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass ran before the output directory was checked")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "collect_statistics", no_pass)
        with pytest.raises(ValueError, match=r"model\.safetensors: a directory .* move it away"):
            pipeline.quantize(ckpt, cfg, calib, out_dir=out, progress=False)
    (out / "model.safetensors").rmdir()
    with monkeypatch.context() as m:
        m.setattr(CheckpointStore, "save_layer", stop_after_layer_0)
        with pytest.raises(KeyboardInterrupt):
            pipeline.quantize(ckpt, cfg, calib, out_dir=out, progress=False)
    partial = out / ".offq-partial"
    (partial / "layer_0001.safetensors").mkdir()
    with monkeypatch.context() as m:
        m.setattr(pipeline, "collect_statistics", no_pass)
        m.setattr(pipeline, "calibrate_layer", no_pass)
        with pytest.raises(ValueError, match=r"^resume: .*layer_0001\.safetensors is not a file "
                                             r"this run stored"):
            pipeline.quantize(ckpt, cfg, calib, out_dir=out, progress=False, resume=True)
    (partial / "layer_0001.safetensors").rmdir()
    pipeline.quantize(ckpt, cfg, calib, out_dir=out, progress=False, resume=True)
    assert (out / "model.safetensors").is_file()


def test_an_activation_group_that_shrinks_is_a_warning(caplog):
    """--a-group-size 7 over width 64 quantized activations in groups of 4 (a review's scratch run
    on SmolLM2: ~25x slower per layer) with only a debug line; a power of two that halves (128
    over 576) is the documented rule and stays quiet, and so does a group that divides."""
    mc = tiny_checkpoint(0).config  # widths 64 (hidden, q) and 128 (intermediate)
    for group, warned in ((7, {64, 128}), (24, {64, 128}), (128, set()), (16, set()),
                          (-1, set())):
        caplog.clear()
        with caplog.at_level("WARNING", logger="offq.recipe.pipeline"):
            pipeline.check_group_sizes(mc, QuantConfig(method="offq", a_group_size=group))
        got = {int(r.args[1]) for r in caplog.records if "a_group_size" in r.getMessage()}
        assert got == warned, (group, caplog.text)


def test_fused_mode_names_weights_it_cannot_run(tmp_path):
    """A float checkpoint under mode 'fused' reported 'layer 0 has no fused q/k/v and gate/up
    linears' instead of why (an 8-bit one did too, before the C decoders ran 8-bit weights)."""
    ckpt = tiny_checkpoint(0)
    pipeline.quantize(ckpt, QuantConfig(method="fp"), None, out_dir=tmp_path / "fp",
                      progress=False)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'fp'}: mode 'fused': the C decoders "
                                         r"run 2-, 3-, 4- or 8-bit weights, and this model's are "
                                         r"float32"):
        load_quantized(tmp_path / "fp", mode="fused")
    load_quantized(tmp_path / "fp", mode="auto")  # runs on the real path
    # a layout the C decoder does not take names the checkpoint too (it named no file)
    pipeline.quantize(ckpt, QuantConfig(method="offq", w_quantizer="rtn", kv_group_size=1,
                                        calib_samples=2, calib_seqlen=32),
                      calibration(ckpt, 2, 32), out_dir=tmp_path / "kv1", progress=False)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'kv1'}: mode 'fused': kv_group: expected "
                                         r"an even group size dividing head_dim 16, got 1; use mode"):
        load_quantized(tmp_path / "kv1", mode="fused")
    load_quantized(tmp_path / "kv1", mode="auto")


# ---------------------------------------------------------------------- found by mutation
def test_each_layer_is_rotated_by_its_own_r2():
    """R2 is computed per layer: layer 1's stored v_proj is its fused weight rotated by R1 and
    R2[1] (a pipeline that passed R2[0] to every layer kept the float model's outputs, since
    R2 cancels within a layer, and so passed every output-level test)."""
    from offq.recipe import rotations as rot
    from offq.recipe.statistics import fused_layer

    ckpt = tiny_checkpoint(0, arch="llama")
    cfg = QuantConfig(method="offq", w_bits=16, a_bits=16, kv_bits=16, r2="pca_hadamard")
    calib = calibration(ckpt, 8, 40, 1)
    res = pipeline.quantize(ckpt, cfg, calib, progress=False)
    mc = ckpt.config.replace(tie_word_embeddings=False)
    r1, r2, _ = pipeline.compute_rotations(ckpt, mc, res.quant_config, calib, 4, False)
    assert not np.allclose(r2[0], r2[1])
    for i in range(mc.num_hidden_layers):
        w = fused_layer(ckpt, mc, i)
        rot.rotate_layer(w, i, mc, r1=r1, r2=r2[i], r4=cfg.r4)
        name = f"model.layers.{i}.self_attn.v_proj.weight"
        np.testing.assert_allclose(res.tensors[name], w[name], rtol=0, atol=1e-6)
