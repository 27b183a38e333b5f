"""The command line on bad input: each refusal names what is wrong in the user's terms, exits
with status 2 and leaves no partial output (stdout included); spoiled checkpoints say what is
spoiled. Found by a bad-input review of every subcommand (2026-12-07)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import offq.cli
from offq.cli import main
from offq.config import QuantConfig
from offq.formats.checkpoint import MODEL_FILE, PARTIAL_DIR, read_config
from offq.recipe import pipeline

from tiny_models import calibration, tiny_checkpoint, write_word_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A one-layer W4A4KV4 offq checkpoint of a tiny model, with a word-level tokenizer."""
    out = tmp_path_factory.mktemp("cli") / "ck"
    ck = tiny_checkpoint(4, layers=1)
    pipeline.quantize(ck, QuantConfig(method="offq"), calibration(ck), out_dir=out,
                      progress=False)
    write_word_tokenizer(out, ck.config.vocab_size)
    return out


def _spoiled(checkpoint: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "spoiled"
    shutil.copytree(checkpoint, copy)
    cfg = json.loads((copy / "config.json").read_text())
    edit(cfg)
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


@pytest.mark.parametrize("block", [None, [1], "x"])
def test_an_offq_block_that_is_not_an_object_is_a_corrupt_checkpoint(checkpoint, tmp_path, block):
    # it was read as a float HF model and failed on "missing tensor(s) ..."
    spoiled = _spoiled(checkpoint, tmp_path, lambda c: c.update(offq=block))
    with pytest.raises(ValueError, match="'offq' block is .*not an object"):
        read_config(spoiled)


def test_a_missing_quant_config_is_named_not_read_as_the_defaults(checkpoint, tmp_path):
    spoiled = _spoiled(checkpoint, tmp_path, lambda c: c["offq"].pop("quant_config"))
    with pytest.raises(ValueError, match="no quant_config object"):
        read_config(spoiled)


def test_a_missing_weights_file_says_the_checkpoint_is_incomplete(checkpoint, tmp_path, capsys):
    spoiled = _spoiled(checkpoint, tmp_path, lambda c: None)
    (spoiled / MODEL_FILE).unlink()
    assert main(["eval", str(spoiled), "--seqlen", "16", "--max-windows", "1"]) == 2
    assert f"{MODEL_FILE}: is missing ({spoiled} is incomplete" in capsys.readouterr().err


def test_generate_refuses_a_bad_prompt_before_writing_anything(checkpoint, capsys):
    for prompt, message in [("\udcff\udcfe", "--prompt: not valid UTF-8"),  # bytes \xff\xfe
                            ("", "--prompt: empty"),
                            (" ".join(f"w{3 + i % 90}" for i in range(600)),
                             "--prompt: 600 tokens exceed the model's context")]:  # prompt_ids:
        assert main(["generate", str(checkpoint), "--prompt", prompt]) == 2
        out, err = capsys.readouterr()
        assert out == "" and message in err, (prompt[:10], out[:80], err)
    assert main(["generate", str(checkpoint), "--prompt", "w3 w4", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("w3 w4")  # the prompt, then what follows it


def test_an_output_path_that_cannot_be_created_is_refused_before_any_work(checkpoint, tmp_path,
                                                                          capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for argv in (["quantize", "smollm2-135m", "--method", "rtn", "--out", f"{blocker}/x"],
                 ["export", str(checkpoint), "--format", "gptq", "--out", f"{blocker}/x/y"]):
        assert main(argv) == 2
        assert f"--out {blocker}/x" in capsys.readouterr().err
    assert blocker.read_text() == ""


def test_quantize_names_its_out_flag_in_the_output_directory_refusals(tmp_path, capsys):
    """The recipe's refusals of an output directory said `out_dir:` (the API's argument) to a
    user who typed --out: one that holds other files, one another run is writing."""
    from offq.formats.files import DirectoryLock

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    argv = ["quantize", "smollm2-135m", "--method", "rtn", "--quiet", "--out"]
    assert main(argv + [str(busy)]) == 2
    assert f"offq quantize: error: --out: {busy} exists, is not empty" in capsys.readouterr().err
    with DirectoryLock(tmp_path / "taken"):
        assert main(argv + [str(tmp_path / "taken")]) == 2
    assert f"error: --out: {tmp_path / 'taken'} is being written by another offq run" in \
        capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "mine"


def test_int8_attention_advice_names_what_the_fused_decoder_takes(capsys):
    assert main(["eval", "smollm2-135m", "--attention", "int8"]) == 2
    assert "takes W4A4KV4 offq checkpoints" in capsys.readouterr().err


def test_inspect_refuses_activation_options_on_a_quantized_model(checkpoint, tmp_path, capsys):
    png = tmp_path / "x.png"
    assert main(["inspect", str(checkpoint), "--plot", str(png)]) == 2  # it exited 0, no file
    assert "is quantized" in capsys.readouterr().err and not png.exists()


def test_an_interrupted_quantize_points_to_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    (out / PARTIAL_DIR).mkdir(parents=True)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(offq.cli, "cmd_quantize", interrupted)
    assert main(["quantize", "smollm2-135m", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and str(out / PARTIAL_DIR) in err


def test_quantize_refuses_an_output_whose_offq_block_is_corrupt(checkpoint, tmp_path):
    # is_offq_checkpoint takes any 'offq' key, so the replace check must read a non-object
    # block as unreadable (it raised AttributeError on None)
    spoiled = _spoiled(checkpoint, tmp_path, lambda c: c.update(offq=None))
    ck = tiny_checkpoint(4, layers=1)
    with pytest.raises(ValueError, match="unreadable"):
        pipeline.quantize(ck, QuantConfig(method="rtn"), None, out_dir=spoiled, progress=False)


def test_errors_name_the_flag_not_an_internal_parameter(capsys):
    assert main(["inspect", "smollm2-135m", "--calib-samples", "0"]) == 2
    assert "--calib-samples must be >= 1" in capsys.readouterr().err  # it said "n: ..."
    assert main(["bench", "--no-kernels", "--threads", "1", "100000"]) == 2
    out, err = capsys.readouterr()
    assert "--threads 100000:" in err and out == ""  # refused before the machine header


def test_bench_checks_the_peer_before_timing(tmp_path, capsys):
    # a missing llama-bench binary was found after offq's rows had run, with status 1 (the
    # flag names in bench's other messages: test_cli.py)
    missing = tmp_path / "llama-bench"
    assert main(["bench", "--no-kernels", "--llama-bench", str(missing), "--llama-model",
                 str(tmp_path / "m.gguf")]) == 2
    out, err = capsys.readouterr()
    assert f"--llama-bench: {missing} is not an executable file" in err and out == ""
    # field names inside the user's paths stay as typed
    missing = tmp_path / "llama_bench" / "llama_model.bin"
    assert main(["bench", "--no-kernels", "--llama-bench", str(missing), "--llama-model",
                 str(tmp_path / "m.gguf")]) == 2
    assert f"--llama-bench: {missing} is not" in capsys.readouterr().err


def test_verbose_shows_where_an_error_came_from(capsys):
    assert main(["eval", "smollm2-135m", "--attention", "int8"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["-v", "eval", "smollm2-135m", "--attention", "int8"]) == 2
    err = capsys.readouterr().err  # the traceback, then the same one-line error, last
    assert "Traceback (most recent call last)" in err and "UsageError" in err
    assert err.rstrip().splitlines()[-1].startswith("offq eval: error: --attention int8 runs")

