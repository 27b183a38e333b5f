"""OSAQ's hyper-parameters on a grid, judged by GPTQ's error on held-out text (issue 11, item 2).

Perplexity at 2-3 bits moves 7-27% with the calibration sample alone (results_weight_only.md,
"Calibration-sample spread"), far more than OSAQ's hyper-parameters can, so a grid judged by
perplexity ranks noise. This script judges each setting where OSAQ acts: per linear, the
relative output error of the quantized weight against the *original* float weight,

    err(Q) = ||(Q - W) X||_F / ||W X||_F  =  sqrt(tr(dW H dW^T) / tr(W H W^T)),

through the Hessian ``H = 2 X^T X / n`` of held-out WikiText-2 test tokens (and, for reference,
of the calibration tokens), for GPTQ alone and for GPTQ after OSAQ, the same GPTQ factor and grid
in both. A setting helps where its ratio err(OSAQ + GPTQ) / err(GPTQ) is below 1.

Protocol (printed): float model (norms not fused: the captured site inputs are the normalised
activations each linear reads), calibration ``--calib`` of offq's default corpus (seed
``--calib-seed``), held-out = the first ``--heldout`` windows of the WikiText-2 test set shipped
with offq; GPTQ act-order, damp 0.01, asymmetric grids with the MSE clip search (min-max grids
with ``--no-clip-search``), per site on the stacked linears as the quantize loop runs it; OSAQ's
other parameters at offq's defaults. The grid varies one parameter at a time around the defaults
(``--grid`` replaces it; ``--base`` moves its centre: ``--base "tau_rel=0.1"`` is the centre of
the grid that chose tau_rel 0.03, benchmarks/results_weight_only.md). Per setting
and weight grid: the geometric mean over linears of the held-out and calibration ratios, the
worst linear, and how many linears improved.

    python benchmarks/bench_osaq_grid.py                         # ~10 min, SmolLM2-135M, 2 threads
    python benchmarks/bench_osaq_grid.py --base "tau_rel=0.1" \\
        --grid "gamma=1e-5,1e-3;tau_rel=0.03,0.3,1;mu1=1e-3,1e-1,1;mu2=0,1,1e4"   # that grid
    python benchmarks/bench_osaq_grid.py --layers 0,15 --weights w2-g64 \\
        --grid "gamma=1e-5,1e-4;mu1=1e-2,1" --out grid.jsonl
    python benchmarks/bench_osaq_grid.py --no-clip-search --grid "" \\
        --weights w2-g64,w3-ch,w4-g64                  # the defaults on min-max grids
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

#: one parameter at a time around the defaults (gamma 1e-4, tau_rel 0.03, mu1 1e-2, mu2 100)
DEFAULT_GRID = "gamma=1e-5,1e-3;tau_rel=0.01,0.1,0.3,1;mu1=1e-3,1e-1,1;mu2=0,1,1e4"
DEFAULT_WEIGHTS = "w3-ch,w2-g64"  # the W3 per channel and W2 g64


PARAMETERS = ("gamma", "tau_rel", "mu1", "mu2")


def parse_assignments(spec: str, flag: str) -> dict[str, list[float]]:
    """``"gamma=1e-5,1e-4;mu1=1"`` -> {"gamma": [1e-5, 1e-4], "mu1": [1.0]}."""
    out: dict[str, list[float]] = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in PARAMETERS:
            raise SystemExit(f"{flag}: unknown parameter {name!r} ({', '.join(PARAMETERS)})")
        try:
            out[name] = [float(v) for v in values.split(",")]
        except ValueError:
            raise SystemExit(f"{flag}: expected numbers after {name}=, got {values!r}") from None
    return out


def parse_grid(spec: str, base: dict[str, float]) -> list[dict[str, float]]:
    """The base setting (offq's defaults with ``base``'s overrides) first, then one setting per
    value of ``spec``, each changing one parameter of the base (values equal to the base's are
    skipped: the base is already first)."""
    from offq.quantizers.osaq import OSAQ

    center = OSAQ(**base)
    settings: list[dict[str, float]] = [dict(base)]
    for name, values in parse_assignments(spec, "--grid").items():
        settings += [{**base, name: v} for v in values if v != getattr(center, name)]
    return settings


def parse_weights(spec: str) -> list[tuple[str, int, int]]:
    """``"w3-ch,w2-g64"`` -> [(label, bits, group_size)] (group -1: per channel)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        bits, _, group = item.partition("-")
        if not bits.startswith("w") or group != "ch" and not group.startswith("g"):
            raise SystemExit(f"--weights: expected items like w3-ch or w2-g64, got {item!r}")
        out.append((item, int(bits[1:]), -1 if group == "ch" else int(group[1:])))
    return out


def output_energy(w: np.ndarray, h: np.ndarray) -> float:
    """tr(W H W^T) = ||W X||_F^2 per token (float64)."""
    return float(np.sum((w @ h) * w))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="0,5,10,15,20,25", help="comma-separated layer indices")
    p.add_argument("--calib", default="16x2048", help="calibration SAMPLESxSEQLEN")
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--heldout", default="8x2048", help="held-out WINDOWSxSEQLEN of WikiText-2 test")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="e.g. w3-ch,w2-g64,w4-g64")
    p.add_argument("--base", default="",
                   help="NAME=V;... the setting the grid varies around (default: offq's defaults)")
    p.add_argument("--grid", default=DEFAULT_GRID,
                   help="NAME=V1,V2;NAME=... one parameter at a time around the defaults")
    p.add_argument("--no-clip-search", action="store_true",
                   help="min-max weight grids (no MSE clip search), the GPTQ reference code's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write JSON lines here")
    args = p.parse_args()

    from offq.bench.machine import describe_machine
    from offq.bench.site_hessians import float_model_sites
    from offq.data import (DEFAULT_CALIBRATION, load_wikitext2_test, sample_calibration,
                           token_windows, tokenize_text)
    from offq.kernels import threads
    from offq.quantizers.gptq import GPTQ
    from offq.quantizers.osaq import OSAQ

    layers = [int(s) for s in args.layers.split(",") if s.strip()]
    n_cal, len_cal = (int(v) for v in args.calib.lower().split("x"))
    n_held, len_held = (int(v) for v in args.heldout.lower().split("x"))
    base = {k: v[0] for k, v in parse_assignments(args.base, "--base").items()}
    settings = parse_grid(args.grid, base)
    weights = parse_weights(args.weights)
    rows: list[dict] = []
    with threads(args.threads), float_model_sites(args.model, layers) as (ckpt, arch, hessians):
        text = tokenize_text(ckpt.tokenizer, load_wikitext2_test())
        held = token_windows(text, len_held)[:n_held]
        cal = sample_calibration(ckpt.tokenizer, DEFAULT_CALIBRATION, n=n_cal, seqlen=len_cal,
                                 seed=args.calib_seed)
        grids = "min-max grids" if args.no_clip_search else "MSE clip"
        protocol = (f"model {args.model}; layers {layers}; calibration {DEFAULT_CALIBRATION} "
                    f"{n_cal}x{len_cal} seed {args.calib_seed}; held-out WikiText-2 test "
                    f"{held.shape[0]}x{held.shape[1]}; GPTQ act-order damp 0.01, asymmetric, "
                    f"{grids}; threads {args.threads}; {describe_machine()}")
        print(protocol, flush=True)
        t0 = time.perf_counter()
        h_held, h_cal = hessians(held), hessians(cal)
        print(f"captured in {time.perf_counter() - t0:.1f} s", flush=True)

        # ratios[(weights, setting index)] = list of (held-out ratio, calibration ratio)
        ratios: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for (site, i), h in sorted(h_cal.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            names = arch.sites[site]
            ws = [np.asarray(ckpt.tensors[arch.weight(i, lin)], dtype=np.float32)
                  for lin in names]
            splits = np.cumsum([w.shape[0] for w in ws])[:-1]
            stacked = np.concatenate(ws)
            hh = h_held[(site, i)]
            w64s = [w.astype(np.float64) for w in ws]
            # err(Q) = sqrt(tr(dW H dW^T) / tr(W H W^T)): the denominators, per linear
            scales = [(output_energy(w, hh), output_energy(w, h)) for w in w64s]
            tails = {}
            for label, bits, group in weights:
                gptq = GPTQ(bits=bits, group_size=group, symmetric=False,
                            clip_search=not args.no_clip_search)
                factor = gptq.prepare(h, f"layer {i} {site}")
                plain = np.split(gptq.quantize(stacked, factor).dequantized, splits)
                # GPTQ's errors (held-out, calibration) per linear: once, not per setting
                gptq_errors = [[np.sqrt(output_energy(q0 - w, x) / energy) for x, energy in
                                zip((hh, h), scale)] for q0, w, scale in zip(plain, w64s, scales)]
                for s_idx, setting in enumerate(settings):
                    osaq = OSAQ(**setting)
                    if osaq.gamma not in tails:
                        tails[osaq.gamma] = osaq.prepare(h, f"layer {i} {site}")
                    moved, report = osaq.apply(stacked, tails[osaq.gamma])
                    after = np.split(gptq.quantize(moved, factor).dequantized, splits)
                    for lin, w, scale, e0, q1 in zip(names, w64s, scales, gptq_errors, after):
                        e1 = [np.sqrt(output_energy(q1 - w, x) / energy)
                              for x, energy in zip((hh, h), scale)]
                        ratios.setdefault((label, s_idx), []).append(
                            (e1[0] / e0[0], e1[1] / e0[1]))
                        rows.append({"layer": i, "linear": lin, "weights": label,
                                     "setting": setting, "tail_dim": report["tail_dim"],
                                     "err_gptq_heldout": float(e0[0]),
                                     "err_osaq_heldout": float(e1[0]),
                                     "err_gptq_calib": float(e0[1]), "err_osaq_calib": float(e1[1])})
            print(f"layer {i} {site} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    print("\nerr(OSAQ + GPTQ) / err(GPTQ) per linear, geometric mean over "
          f"{len(layers)} layers' linears (< 1: OSAQ helps)")
    print("weights | setting | held-out | calibration | worst linear (held-out) | "
          "linears improved (held-out)")
    summary = []
    for label, _, _ in weights:
        for s_idx, setting in enumerate(settings):
            r = np.array(ratios[(label, s_idx)])
            varied = {k: v for k, v in setting.items() if k not in base or base[k] != v}
            name = ", ".join(f"{k} {v:g}" for k, v in varied.items()) or (
                "base" if base else "defaults")
            line = {"weights": label, "setting": setting,
                    "heldout_geomean": float(np.exp(np.mean(np.log(r[:, 0])))),
                    "calib_geomean": float(np.exp(np.mean(np.log(r[:, 1])))),
                    "heldout_worst": float(r[:, 0].max()),
                    "improved": int(np.sum(r[:, 0] < 1)), "linears": len(r)}
            summary.append(line)
            print(f"{label} | {name} | {line['heldout_geomean']:.4f} | "
                  f"{line['calib_geomean']:.4f} | {line['heldout_worst']:.3f} | "
                  f"{line['improved']}/{line['linears']}", flush=True)
    if args.out is not None:
        with open(args.out, "w") as f:
            f.write(json.dumps({"protocol": protocol}) + "\n")
            for line in summary:
                f.write(json.dumps({"summary": line}) + "\n")
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    from offq.bench.site_hessians import run_main

    run_main(main)
