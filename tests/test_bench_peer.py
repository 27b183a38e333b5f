"""How the end-to-end benchmark times llama.cpp (offq.bench.e2e): one ``llama-bench -r 1`` per
test and round, its best sample read from the JSON it prints. The record below is llama-bench's
own output (the sdist's build, SmolLM2 Q4_0, trimmed to the fields offq reads)."""
import json

import pytest

from offq.bench.e2e import E2EConfig, llama_bench_command, llama_bench_seconds, parse_llama_bench

RECORD = {"n_prompt": 0, "n_gen": 16, "n_depth": 0, "avg_ns": 259438019, "avg_ts": 61.705548,
          "samples_ns": [253367349, 265508689], "samples_ts": [63.1494, 60.2617]}


def fake_peer(tmp_path, script: str = "exit 0") -> tuple[str, str]:
    """(an executable standing in for llama-bench's path, a model file): E2EConfig checks both
    exist. The binary is only run where a test says what it prints."""
    binary, model = tmp_path / "llama-bench", tmp_path / "m.gguf"
    binary.write_text(f"#!/bin/sh\n{script}\n")
    binary.chmod(0o755)
    model.write_bytes(b"GGUF")
    return str(binary), str(model)


def test_command_times_one_test_once(tmp_path):
    binary, model = fake_peer(tmp_path)
    c = E2EConfig(llama_bench=binary, llama_model=model)
    assert llama_bench_command(c, "pp512", 2) == [
        binary, "-m", model, "-t", "2", "-r", "1", "-o", "json", "-p", "512", "-n", "0"]
    assert llama_bench_command(c, "tg128", 1)[-4:] == ["-p", "0", "-n", "128"]
    assert llama_bench_command(c, "tg32@d2000", 1)[-6:] == ["-p", "0", "-n", "32", "-d", "2000"]


def test_parse_takes_the_best_sample_of_the_named_test():
    other = dict(RECORD, n_prompt=512, n_gen=0, samples_ts=[400.0])
    deep = dict(RECORD, n_depth=2000, samples_ts=[10.0])
    out = json.dumps([other, RECORD, deep])
    assert parse_llama_bench(out, "tg16") == pytest.approx(16 / 63.1494)
    assert parse_llama_bench(out, "pp512") == pytest.approx(512 / 400.0)
    assert parse_llama_bench(out, "tg16@d2000") == pytest.approx(16 / 10.0)
    old = {k: v for k, v in RECORD.items() if not k.startswith("samples")}
    assert parse_llama_bench(json.dumps([old]), "tg16") == pytest.approx(16 / 61.705548)
    with pytest.raises(ValueError, match="no tg128 record"):
        parse_llama_bench(out, "tg128")
    for bad in ([1], [{"n_gen": 16}], [{"n_gen": "x"}], [dict(RECORD, samples_ts=["?"])]):
        with pytest.raises(ValueError, match="malformed record"):
            parse_llama_bench(json.dumps(bad), "tg16")
    with pytest.raises(ValueError, match="not JSON"):
        parse_llama_bench("error: model not found", "tg16")


def test_a_missing_binary_or_model_is_refused_before_anything_runs(tmp_path):
    """They were found only when llama.cpp's first turn came, after offq's rows had run."""
    binary, model = fake_peer(tmp_path)
    with pytest.raises(ValueError, match="^llama_bench: /no/such/llama-bench is not an executable"):
        E2EConfig(llama_bench="/no/such/llama-bench", llama_model=model)
    with pytest.raises(ValueError, match="^llama_bench: .*m.gguf is not an executable"):
        E2EConfig(llama_bench=model, llama_model=model)  # a file without the x bit
    with pytest.raises(ValueError, match="^llama_model: .*nope.gguf is not a file"):
        E2EConfig(llama_bench=binary, llama_model=str(tmp_path / "nope.gguf"))
    with pytest.raises(ValueError, match="go together"):
        E2EConfig(llama_bench=binary)


def test_a_failing_binary_is_named(tmp_path):
    binary, model = fake_peer(tmp_path, "echo 'error: bad model' >&2; exit 3")
    with pytest.raises(OSError, match="llama-bench failed .*llama-bench.*error: bad model"):
        llama_bench_seconds(E2EConfig(llama_bench=binary, llama_model=model), "tg16", 1)
    with pytest.raises(OSError, match="llama-bench failed .*not JSON"):
        llama_bench_seconds(E2EConfig(llama_bench="/bin/echo", llama_model=model), "tg16", 1)
