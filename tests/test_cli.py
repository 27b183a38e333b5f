"""The user's side of the CLI: inspect, bench, --json, exit codes, progress off a terminal.

Real parts: the default model (SmolLM2-135M) where a subcommand reads a model; the kernel and
end-to-end benchmarks run at their smallest sizes (their figures are not checked: speed is never
a test, only that every figure arrives with its protocol)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import numpy as np
import pytest

from offq.cli import main
from offq.outliers import site_outliers
from offq.progress import Progress


# ------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------
def test_progress_logs_lines_with_eta_when_not_on_a_terminal(caplog: pytest.LogCaptureFixture,
                                                            monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with caplog.at_level(logging.INFO, logger="offq.progress"):
        with Progress(4, "stage", interval=0.0) as p:
            for _ in range(4):
                p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert "stage: 1/4 (25%)" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("stage: 4/4 (100%)") and lines[-1].endswith("(done)")
    assert sum("4/4" in line for line in lines) == 1  # the last unit's line is the "(done)" one


def test_progress_is_silent_when_quiet(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with caplog.at_level(logging.INFO, logger="offq.progress"):
        with Progress(3, "stage", interval=0.0, show=False) as p:
            p.update(3)
    assert caplog.records == []


@pytest.mark.usefixtures("default_model_installed")
def test_quantize_logs_progress_off_a_terminal(tmp_path) -> None:
    """``offq quantize`` with stderr going to a file: a log line per stage as work happens, not
    only at the end (a process, as a pipeline runs it); ``--eval-windows`` prints the
    before/after perplexity table."""
    out = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, "-m", "offq", "quantize", "smollm2-135m", "--method", "rtn",
         "--out", str(out), "--threads", "1", "--eval-windows", "1", "--eval-seqlen", "64",
         "--calib-source", "wikii"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        cwd=tmp_path)  # not the checkout: `-m` puts the cwd first on sys.path
    assert proc.returncode == 0, proc.stderr
    assert "quantize layers: 30/30 (100%)" in proc.stderr, proc.stderr
    assert "\r" not in proc.stderr  # no bar redraws in a log
    assert "--calib-source wikii ignored: rtn" in proc.stderr  # a typo was silently unused
    table = proc.stdout[proc.stdout.index("perplexity: WikiText-2 test, first 1 windows x 64"):]
    fp, q = (float(line.split()[-2]) for line in table.splitlines()
             if line.strip().startswith(("FP32", "rtn W4A4KV4")))
    assert 10 < fp < q < 1e5  # RTN W4A4KV4 without rotation is far worse than FP32
    # that checkpoint as the input of another quantization is named as what it is (it used to
    # be read as a float model and fail listing every missing weight)
    proc = subprocess.run(
        [sys.executable, "-m", "offq", "quantize", str(out), "--method", "rtn",
         "--out", str(tmp_path / "again")], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == 2 and "an offq checkpoint, already quantized" in proc.stderr, \
        proc.stderr


# ------------------------------------------------------------------------------------------------
# outlier statistics
# ------------------------------------------------------------------------------------------------
def test_site_outliers_find_a_planted_massive_channel() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 50, 64))
    x[:, 0, 17] = 300.0  # a massive activation on channel 17 of each sequence's first token
    s = site_outliers(x, 2, "attn_in")
    assert (s.layer, s.site, s.tokens, s.channel) == (2, "attn_in", 150, 17)
    assert s.max_abs == 300.0
    assert s.max_over_median > 50
    assert s.top1_energy > 0.9  # one direction holds nearly all the energy
    flat = site_outliers(rng.standard_normal((200, 64)), 0, "mlp_in")
    assert flat.max_over_median < 2 and flat.top1_energy < 0.1
    # top-1 energy is a property of X^T X: an orthogonal rotation leaves it unchanged
    q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    rot = site_outliers(x.reshape(-1, 64) @ q, 2, "attn_in", rotated=True)
    assert rot.top1_energy == pytest.approx(s.top1_energy, rel=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        site_outliers(np.full((2, 4), np.nan), 0, "attn_in")


@pytest.mark.usefixtures("default_model_installed")
def test_cli_inspect_json_on_the_default_model(capsys: pytest.CaptureFixture) -> None:
    rc = main(["inspect", "smollm2-135m", "--layers", "3", "--calib-samples", "2",
               "--calib-seqlen", "64", "--r1", "--json", "--quiet"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["model"]["architecture"] == "llama" and rep["model"]["layers"] == 30
    assert rep["model"]["tensor_types"]["Q4_1"] > 0
    sites = rep["activations"]["sites"]
    before = {r["site"]: r for r in sites if not r["rotated"]}
    after = {r["site"]: r for r in sites if r["rotated"]}
    assert set(before) == {"attn_in", "o_in", "mlp_in", "down_in"}
    assert set(after) == {"attn_in", "mlp_in"}  # R1 acts on the residual-stream sites
    # SmolLM2's massive activations: a channel far above the median, flattened by OffQ's R1
    assert before["attn_in"]["max_over_median"] > 5
    assert after["attn_in"]["max_over_median"] < before["attn_in"]["max_over_median"] / 2
    assert after["attn_in"]["max_abs"] < before["attn_in"]["max_abs"] / 2


@pytest.mark.usefixtures("default_model_installed")
def test_cli_inspect_plot_writes_a_png(tmp_path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "outliers.png"
    assert main(["inspect", "smollm2-135m", "--layers", "1", "--plot", str(png),
                 "--plot-layer", "1", "--calib-samples", "2", "--calib-seqlen", "64",
                 "--quiet"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out


@pytest.mark.usefixtures("default_model_installed")
def test_cli_inspect_errors_are_one_line_with_status_2(capsys: pytest.CaptureFixture,
                                                      tmp_path) -> None:
    assert main(["inspect", str(tmp_path / "missing.gguf"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("offq inspect: error:") and "\n" not in err
    assert main(["inspect", "smollm2-135m", "--layers", "99", "--quiet"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["inspect", "smollm2-135m", "--layers", "0", "--plot", str(tmp_path / "p.png"),
                 "--plot-layer", "5", "--quiet"]) == 2
    # without --layers every layer is measured: a --plot-layer past the last is refused first
    assert main(["inspect", "smollm2-135m", "--plot", str(tmp_path / "p.png"),
                 "--plot-layer", "99", "--quiet"]) == 2
    assert "--plot-layer 99: the model has layers 0..29" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("default_model_installed")
def test_cli_bench_json_carries_every_figure_with_its_protocol(capsys: pytest.CaptureFixture
                                                               ) -> None:
    rc = main(["bench", "--quick", "--threads", "1", "--depths", "128", "--json", "--quiet"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    machine = rep["machine"]
    assert machine["cpu"] and machine["cores_usable"] >= 1 and "avx2" in machine["simd"]
    kernels = {r["bench"] for r in rep["kernels"]}
    assert {"fwht f32", "cov_update", "matmul_w4a4", "matmul_i8"} <= kernels
    assert all(r["threads"] == 1 for r in rep["kernels"])
    matmul = [r for r in rep["kernels"] if r["bench"] == "matmul_w4a4"]
    assert all(v is not None and v > 0 for r in matmul for v in r["speedup_vs"].values())
    e2e = rep["e2e"]
    assert e2e["protocol"]["tests"] == ["pp128", "tg16", "tg16@d128"]
    assert e2e["protocol"]["fused_prefill"] == "auto"  # pp128 of the fused engine: the C step
    engines = {(r["engine"], r["test"]) for r in e2e["rows"]}
    assert engines == {(e, t) for e in ("offq fp32", "offq w4a4kv4", "offq w4a4kv4 fused",
                                        "offq w4 weight-only", "offq w4 weight-only fused")
                       for t in ("pp128", "tg16", "tg16@d128")}
    assert e2e["protocol"]["weight_only"]["w_bits"] == 4  # the weight-only engine's settings
    assert "weight-only rtn W4A16KV16" in e2e["protocol"]["quantized"]
    assert all(r["tokens_per_s"] > 0 for r in e2e["rows"])


def test_machine_line_names_the_simd_paths_and_the_weight_only_decode() -> None:
    """The protocol line printed with every benchmark names the SIMD paths and which decode
    matmul_wq ran (and an OFFQ_WQ_DECODE that forced it)."""
    from offq.bench.machine import describe_machine

    base = {"cpu": "CPU", "cores_usable": 2, "offq": "0", "numpy": "2", "simd_max": "",
            "load_average_1min": None, "openblas_coretype": "", "wq_decode_env": ""}
    simd = {"avx2": True, "avx512": True, "avx512_vbmi": True, "avx512_vnni": False,
            "wq_subnormal_decode": True, "disabled_by_env": False}
    line = describe_machine({**base, "simd": simd})
    assert "SIMD avx2+avx512+avx512_vbmi (matmul_wq decode subnormal)" in line
    line = describe_machine({**base, "simd": {**simd, "wq_subnormal_decode": False},
                             "wq_decode_env": "convert"})
    assert "(matmul_wq decode convert, OFFQ_WQ_DECODE=convert)" in line
    assert "decode" not in describe_machine({**base, "simd": {"avx2": False}})


@pytest.mark.parametrize("argv, message", [
    (["eval", "m", "--mode", "bogus"], "offq eval: error: argument --mode: invalid choice"),
    # an unknown flag was reported by the top-level parser, after its usage block
    (["quantize", "m", "--calib-seed", "1", "--out", "x"],
     "offq quantize: error: unrecognized arguments: --calib-seed 1"),
    (["quantize", "m"], "offq quantize: error: the following arguments are required: --out"),
    (["--bogus", "eval", "m"], "offq: error: unrecognized arguments: --bogus (see offq --help)"),
    (["quantize", "m", "--out", "x", "--hold-freed-memory", "--return-freed-memory"],
     "offq quantize: error: argument --return-freed-memory: not allowed with argument "
     "--hold-freed-memory"),
])
def test_usage_errors_are_one_line_with_status_2(capsys: pytest.CaptureFixture, argv,
                                                 message) -> None:
    """As the README says of every user error: one line ``offq COMMAND: error: ...``, status 2
    (argparse printed its usage block first: 6 to 34 lines)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    command = next(a for a in argv if not a.startswith("-"))
    assert main([command, "--help"]) == 0
    assert "usage: offq " + command in capsys.readouterr().out


def test_cli_bench_quick_keeps_explicit_sizes() -> None:
    """--quick replaced an explicit --prompt-lengths / --gen-tokens with its own."""
    from offq.cli import bench_sizes, build_parser

    def sizes(*flags: str):
        return bench_sizes(build_parser().parse_args(["bench", *flags]))

    assert sizes("--quick", "--prompt-lengths", "32", "--gen-tokens", "4") == ([32], 4, 1)
    assert sizes("--quick") == ([128], 16, 1)
    assert sizes() == ([512, 2048], 128, 3)
    assert sizes("--repeats", "5", "--gen-tokens", "0") == ([512, 2048], 0, 5)


def test_cli_bench_rejects_bad_flags(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--no-kernels", "--no-e2e"]) == 2
    assert "nothing to measure" in capsys.readouterr().err
    assert main(["bench", "--threads", "0"]) == 2
    assert main(["bench", "--no-kernels", "--llama-bench", "/bin/true"]) == 2
    assert "--llama-bench and --llama-model go together" in capsys.readouterr().err
    # end-to-end settings are checked before the kernel table runs (it takes minutes)
    start = time.perf_counter()
    assert main(["bench", "--prompt-lengths", "0"]) == 2
    assert "--prompt-lengths" in capsys.readouterr().err and time.perf_counter() - start < 20
    assert main(["bench", "--no-kernels", "--depths", "0"]) == 2
    assert "--depths: expected positive" in capsys.readouterr().err
    assert main(["bench", "--no-kernels", "--weight-only-bits", "4", "5"]) == 2
    assert "--weight-only-bits: expected distinct widths" in capsys.readouterr().err
    from offq.bench.e2e import E2EConfig
    with pytest.raises(ValueError, match="depths"):
        E2EConfig(depths=(100,), gen_tokens=0)
    with pytest.raises(ValueError, match="fused_prefill"):
        E2EConfig(fused_prefill="python")
    with pytest.raises(ValueError, match="fused_attention"):
        E2EConfig(fused_attention="int4")
    with pytest.raises(ValueError,
                       match=r"weight_only_bits: expected distinct widths among \(2, 3, 4, 8\)"):
        E2EConfig(weight_only_bits=(4, 16))
    for widths in ((), (8, 8)):
        with pytest.raises(ValueError, match="weight_only_bits"):
            E2EConfig(weight_only_bits=widths)


@pytest.mark.usefixtures("default_model_installed")
def test_cli_bench_names_a_prompt_past_the_context(capsys: pytest.CaptureFixture) -> None:
    """A prompt (or depth) past the model's context is named before the kernel table and the
    in-process quantization (the check reads the model's context length)."""
    start = time.perf_counter()
    assert main(["bench", "--prompt-lengths", "100000", "--gen-tokens", "2", "--repeats", "1"]) == 2
    assert "--prompt-lengths / --gen-tokens: 100000 positions exceed" in capsys.readouterr().err
    assert time.perf_counter() - start < 20
    assert main(["bench", "--no-kernels", "--depths", "8190", "--gen-tokens", "16"]) == 2
    assert "8206 positions exceed" in capsys.readouterr().err
