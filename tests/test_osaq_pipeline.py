"""OSAQ through the quantize pipeline and the CLI: the --osaq flag, per-linear reports in the
checkpoint metadata, each within the output-change bound, one tail per input site."""
import json

import numpy as np
import pytest

from offq.cli import build_parser, config_from_args
from offq.config import QuantConfig
from offq.quantizers import osaq as osaq_module
from offq.recipe import pipeline

from tiny_models import calibration, tiny_checkpoint


def test_osaq_flag_selects_the_pre_step():
    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--method", "gptq", "--osaq",
                                      "--osaq-gamma", "1e-3"])
    cfg = config_from_args(args)
    assert cfg.w_quantizer == "osaq+gptq" and cfg.osaq_gamma == 1e-3
    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--method", "rtn", "--osaq"])
    assert config_from_args(args).w_quantizer == "osaq+rtn"
    # the flag beside a quantizer that already names OSAQ adds nothing (not "osaq+osaq+gptq")
    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--method", "gptq", "--osaq",
                                      "--w-quantizer", "osaq+gptq"])
    assert config_from_args(args).w_quantizer == "osaq+gptq"


def test_reports_in_checkpoint_and_within_bound(tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(2)
    calls = []
    real = osaq_module.prepare_tail
    monkeypatch.setattr(osaq_module, "prepare_tail",
                        lambda h, g, solver: calls.append(h.shape) or real(h, g, solver))
    gamma = 1e-3
    cfg = QuantConfig(method="gptq", a_bits=16, kv_bits=16, w_bits=3, w_symmetric=False,
                      w_quantizer="osaq+gptq", osaq_gamma=gamma)
    pipeline.quantize(ckpt, cfg, calibration(ckpt), out_dir=tmp_path, progress=False)
    reports = json.loads((tmp_path / "config.json").read_text())["offq"]["reports"]
    layers = ckpt.config.num_hidden_layers
    assert len(reports) == 7 * layers  # every linear
    assert len(calls) == 4 * layers  # one tail per input site (q/k/v, o, gate/up, down)
    for name, rep in reports.items():
        assert set(rep) >= {"tail_dim", "rel_change_wx", "row_max_before", "row_max_after"}
        assert rep["rel_change_wx"] <= np.sqrt(gamma) * 1.01, name
        assert rep["row_max_after"] <= rep["row_max_before"] + 1e-6, name


def test_osaq_iters_is_a_validated_field():
    with pytest.raises(ValueError, match="osaq_iters"):
        QuantConfig(osaq_iters=0)
    assert QuantConfig.from_dict(QuantConfig(osaq_iters=1).to_dict()).osaq_iters == 1


def test_pre_step_time_is_counted_only_when_there_are_pre_steps():
    """The CLI prints the pre-steps' share of the quantize stage when it is non-zero: GPTQ alone
    has no pre-step and printed "the pre-steps (gptq) took 0.0 s" before."""
    ckpt = tiny_checkpoint(1)
    plain = QuantConfig(method="gptq", a_bits=16, kv_bits=16, w_bits=4, w_symmetric=False)
    result = pipeline.quantize(ckpt, plain, calibration(ckpt), progress=False)
    assert result.pre_step_seconds == 0.0
    with_osaq = QuantConfig(method="gptq", a_bits=16, kv_bits=16, w_bits=4, w_symmetric=False,
                            w_quantizer="osaq+gptq")
    result = pipeline.quantize(ckpt, with_osaq, calibration(ckpt), progress=False)
    assert result.pre_step_seconds > 0.0
