"""Quality tests that fail when a quantizer, a rotation or a Hessian site is broken.

The random tiny models of the other tests predict nearly uniform distributions, so every method
scores the same there. Here quality is measured against the float model's own predictions: the
mean KL divergence ``KL(p_fp || p_quant)`` (nats per token) of the next-token distributions on
held-out ids, on a tiny Llama with a planted persistent massive channel
(``tiny_checkpoint(massive_channel=...)``: layer 0's o_proj writes an offset of 80 on one residual
channel of every token; the float model hardly reads that channel, so its predictions depend on
the ordinary channels, but every activation quantizer sees it) and a sharpened LM head (FP
entropy ~2.2 nats, far from uniform's 4.6).

Every bound comes from a measured run: the values measured on seeds 0-3 (model, calibration and
eval ids) are quoted next to each bound, which keeps a 2-3x margin from them. The mechanism, per
test: unrotated W4A4 spends the 16 levels of each token on the outlier (KL ~1.2); OffQ's R1 puts
it on the all-ones row of a block Hadamard, where it becomes a per-group offset that the
asymmetric zero-point absorbs (KL ~0.15); QuaRot's random Hadamard, or OffQ with the outlier on
another row, spread it as a +-pattern that the zero-point cannot absorb (KL ~0.75); in the rotated
basis the outlier direction is costly for weight errors too, which GPTQ avoids only with the
right site's Hessian (layer 0's attention input is clean, its MLP input carries the outlier).
"""
from __future__ import annotations

import numpy as np
import pytest

from offq.config import QuantConfig
from offq.model import Model
from offq.quant.activation import ActQuant
from offq.recipe import pipeline
from tiny_models import calibration, tiny_checkpoint, token_ids

MASSIVE, CHANNEL, HEAD_SCALE = 80.0, 5, 3.0
W4A16 = {"a_bits": 16, "kv_bits": 16}
W16A4 = {"w_bits": 16, "kv_bits": 16}


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of ``KL(softmax(ref) || softmax(logits))`` in nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


class Planted:
    """The planted model, its calibration and eval ids, its float logits, and a cache of the
    KL of each quantized configuration (several tests compare the same ones)."""

    def __init__(self, seed: int = 0) -> None:
        self.ckpt = tiny_checkpoint(seed, tie=False, attention_bias=True, massive=MASSIVE,
                                    massive_channel=CHANNEL)
        self.ckpt.tensors["lm_head.weight"] *= HEAD_SCALE
        mc = self.ckpt.config
        self.calib = calibration(self.ckpt, 8, 48, seed=1 + seed)
        self.ids = token_ids(mc.vocab_size, 4, 48, seed=7 + seed)
        self.fp = Model.from_tensors(mc, self.ckpt.tensors).forward(self.ids)
        self._kl: dict[tuple, float] = {}

    def quantize(self, **cfg):
        return pipeline.quantize(self.ckpt, QuantConfig(**cfg), self.calib)

    def kl(self, **cfg) -> float:
        key = tuple(sorted(cfg.items()))
        if key not in self._kl:
            logits = self.quantize(**cfg).model("fake").forward(self.ids)
            self._kl[key] = kl_divergence(self.fp, logits)
        return self._kl[key]


@pytest.fixture(scope="module")
def planted() -> Planted:
    return Planted(0)


def test_planted_model_is_measurable(planted):
    """The float model is far from uniform, and the outlier dominates the quantized inputs."""
    lp = log_softmax(planted.fp)
    entropy = float(-(np.exp(lp) * lp).sum(axis=-1).mean())
    assert 1.0 < entropy < 3.5, entropy  # measured 2.01-2.20; uniform is log(101) = 4.62
    # the linear inputs of the norm-fused float model: where each site's largest channel is
    seen = {k: np.abs(x).max(axis=0).argmax() for k, x in site_inputs(planted, "fp").items()}
    assert seen["attn_in", 0] != CHANNEL  # layer 0's attention reads the clean embeddings
    assert seen["mlp_in", 0] == CHANNEL and seen["attn_in", 1] == CHANNEL, seen


def test_unrotated_w4a4_collapses(planted):
    """(a) Unrotated RTN W4A4KV4 is far from FP, and it is the activations that break it (the
    same weights with float activations are close)."""
    rtn = planted.kl(method="rtn")
    assert rtn > 0.5, rtn  # measured 1.20-1.31 (seeds 0-3)
    assert planted.kl(method="rtn", **W4A16) < 0.25  # measured 0.088-0.100
    assert planted.kl(method="rtn", **W16A4) > 0.5  # measured 1.16-1.26


def test_offq_recovers(planted):
    """(b) OffQ W4A4KV4 (GPTQ weights) is close to FP: much closer than unrotated W4A4 and than
    OffQ with the outlier off the all-ones row or with a symmetric activation grid (no
    zero-point to absorb the offset)."""
    offq = planted.kl(method="offq")
    assert offq < 0.35, offq  # measured 0.130-0.157
    assert offq < planted.kl(method="rtn") / 3  # measured ratio 7.7-9.4
    assert offq < planted.kl(method="offq", outlier_index="other") / 2  # measured 4.9-6.0
    assert offq < planted.kl(method="offq", a_symmetric=True) / 2.5  # measured 6.4-7.4


def test_gptq_beats_rtn_with_the_sites_hessian(planted):
    """(c) In OffQ's basis the outlier direction is costly for weight errors: GPTQ, given each
    site's own Hessian, keeps W4A16 close to FP where RTN does not. A Hessian that ignores the
    inputs (identity) or comes from the wrong site (layer 0's clean attention input for its MLP)
    gives RTN-like errors."""
    gptq = planted.kl(method="offq", **W4A16)
    rtn = planted.kl(method="offq", w_quantizer="rtn", **W4A16)
    assert gptq < 0.25, gptq  # measured 0.074-0.094
    assert rtn > 15 * gptq, (rtn, gptq)  # measured 3.3-4.4 vs 0.074-0.094: ratio 43-50
    # unrotated: a smaller gain (measured 0.051-0.058 vs 0.088-0.100), but GPTQ still wins
    assert planted.kl(method="gptq", **W4A16) < planted.kl(method="rtn", **W4A16)


def site_inputs(planted: Planted, method: str) -> dict[tuple[str, int], np.ndarray]:
    """The attention and MLP inputs of the fused (and rotated) float model, by (site, layer)."""
    model = planted.quantize(method=method, w_bits=16, a_bits=16, kv_bits=16).model("fake")
    out = {}

    def capture(site, i, x):
        if site in ("attn_in", "mlp_in"):
            out[site, i] = x.reshape(-1, x.shape[-1]).copy()

    model.forward(planted.ids, capture=capture)
    return out


def test_offq_beats_quarot_on_activation_error(planted):
    """(d) The mechanism: 4-bit asymmetric per-token activation quantization (the run-time
    quantizer, group = the hidden size here) of the inputs that carry the outlier is nearly as
    accurate after OffQ's R1 as on the clean input, and far more accurate than after QuaRot's
    random Hadamard or without rotation; so is W16A4 at the model level."""
    d = planted.ckpt.config.hidden_size
    act = ActQuant(bits=4, group_size=QuantConfig().activation_group(d), symmetric=False)

    def rel_error(x):
        """Squared error over the energy of the ordinary part of ``x`` (``x`` without its top
        principal direction: the outlier; the same in every basis, the rotations are orthogonal)."""
        top = np.linalg.eigh(x.T.astype(np.float64) @ x)[1][:, -1]
        ordinary = x - np.outer(x @ top, top)
        return float(((act.fake(x) - x) ** 2).sum() / (ordinary ** 2).sum())

    err = {m: {k: rel_error(x) for k, x in site_inputs(planted, m).items()}
           for m in ("fp", "quarot", "offq")}
    # measured on seeds 0-3, at the three sites that carry the outlier: OffQ 0.0084-0.0102,
    # QuaRot 0.17-0.22, unrotated 1.03-1.10; the clean site (layer 0's attention input, every
    # method) 0.0083-0.0092
    clean = err["offq"]["attn_in", 0]
    for k in [("mlp_in", 0), ("attn_in", 1), ("mlp_in", 1)]:
        assert err["offq"][k] < 2.5 * clean, (k, err)
        assert err["offq"][k] < err["quarot"][k] / 8, (k, err)
        assert err["offq"][k] < err["fp"][k] / 30, (k, err)
    # model level, W16A4: measured 0.046-0.059 (OffQ) vs 0.61-0.78 (QuaRot), ratio 12-14
    assert planted.kl(method="offq", **W16A4) < planted.kl(method="quarot", **W16A4) / 5


# ---------------------------------------------------------------------------------- default model
@pytest.mark.slow
def test_default_model_offq_w4a4kv4_perplexity():
    """SmolLM2-135M, WikiText-2 (the first window of 128 tokens), 2 x 128 calibration tokens of
    wiki-vital: the FP perplexity is where it was measured, OffQ W4A4KV4 on the real 4-bit
    kernels stays within a measured factor of it, and unrotated RTN W4A4KV4 collapses.

    The FP and OffQ numbers come from the quickstart notebook's quick run (tests/test_notebook.py
    runs it once per session with exactly this protocol), so the default model is quantized with
    OffQ once. Weights are rounded with RTN there: GPTQ over the 30 layers would cost more than
    the whole suite's time budget (GPTQ's effect is checked on the planted tiny model above)."""
    from test_notebook import QUICK, _missing_inputs, quick_run

    reason = _missing_inputs()
    if reason:
        pytest.skip(reason)
    assert (QUICK["SEQLEN"], QUICK["WINDOWS"], QUICK["CALIB_N"], QUICK["CALIB_SEQLEN"],
            QUICK["W_QUANTIZER"]) == (128, 1, 2, 128, "rtn"), "the bounds below were measured so"
    ns = quick_run()
    fp, q = ns["ppl"]["fp32"], ns["ppl"]["offq real"]
    assert ns["qcfg"].method == "offq" and (ns["qcfg"].a_bits, ns["qcfg"].kv_bits) == (4, 4)
    rtn = ns["ppl_of"](pipeline.quantize(ns["ckpt"], QuantConfig(method="rtn", w_clip_search=False),
                                         None).model("real"))
    # measured (2 cores): FP 24.04, OffQ 80.04 (3.33 x FP), unrotated RTN 704.8 (8.8 x OffQ)
    assert 20 < fp < 29, fp
    assert fp < q < min(3.9 * fp, 95), (q, fp)
    assert rtn > 5 * q, (rtn, q)  # measured 8.8 x
