"""The results table of issue 4: perplexity of every method and ablation on one model.

Protocol (printed with every row): WikiText-2 test (shipped in the package), tokenized
once, non-overlapping windows of ``--seqlen`` tokens (BOS per window when the model uses one),
mean token NLL, ppl = exp(mean); ``--max-windows`` takes the first N windows. Calibration:
``--calib-samples`` x ``--calib-seqlen`` tokens from offq.data's default calibration corpus (never
the eval text), seed 0. Each row quantizes in memory (offq.quantize) and evaluates the real path
(packed 4-bit kernels; ``--mode fake`` for the float32 simulation, which gives bit-identical
numbers, see tests/test_runtime.py, and runs slower).

    python benchmarks/bench_results.py --quick              # small calibration + 2 windows
    python benchmarks/bench_results.py                      # the full protocol (long)
    python benchmarks/bench_results.py --rows fp,offq-gptq --max-windows 8
    python benchmarks/bench_results.py --plot benchmarks/activations.png

Writes a Markdown table (``--out``, default benchmarks/results.md) and prints each row as it
finishes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offq.config import QuantConfig  # noqa: E402

#: row name -> QuantConfig overrides (W4A4KV4 unless the row says otherwise)
ROWS: dict[str, dict] = {
    "fp": dict(method="fp"),
    "rtn": dict(method="rtn"),
    "gptq": dict(method="gptq"),
    "quarot-gptq": dict(method="quarot"),
    "offq-rtn": dict(method="offq", w_quantizer="rtn"),
    "offq-gptq": dict(method="offq"),
    "offq-osaq": dict(method="offq", w_quantizer="osaq+gptq"),  # OSAQ on the rotated weights
    # rows that change only run-time quantizers reuse the offq-gptq weights (see weight_key)
    "abl-sym-act": dict(method="offq", a_symmetric=True),
    "offq-w4a8kv8": dict(method="offq", a_bits=8, kv_bits=8),
    "offq-w4a16": dict(method="offq", a_bits=16, kv_bits=16),
    "abl-standard-pca": dict(method="offq", pca="standard"),
    "abl-no-pca": dict(method="offq", pca="none"),
    "abl-unsorted": dict(method="offq", sorted_grouping=False),
    "abl-outlier-other": dict(method="offq", outlier_index="other"),
    "abl-per-token-act": dict(method="offq", a_group_size=-1),
    "abl-centred": dict(method="offq", pca_centred=True),
    "abl-group192": dict(method="offq", a_group_size=192),
    # activation clip c < 1 shrinks each group's range about its midpoint (docs/METHODS.md)
    "abl-a-clip-0.95": dict(method="offq", a_clip=0.95),
    "abl-a-clip-0.9": dict(method="offq", a_clip=0.9),
}

#: QuantConfig fields used only at run time (activation and KV quantizers): the calibration runs
#: weights-only, so configs that differ only here have identical stored weights
RUNTIME_FIELDS = ("a_bits", "a_symmetric", "a_clip", "kv_bits", "kv_group_size", "kv_symmetric")


def weight_key(cfg: QuantConfig) -> str:
    """Configs with the same key quantize to the same stored tensors (R1 still depends on
    a_group_size: its block Hadamard is the activation group)."""
    d = cfg.to_dict()
    for name in RUNTIME_FIELDS:
        d.pop(name, None)
    return repr(sorted(d.items()))


def perplexity(model, windows: np.ndarray, batch: int = 1) -> tuple[float, int]:
    total, count = 0.0, 0
    for s in range(0, len(windows), batch):
        nll = model.nll(windows[s:s + batch])
        total += float(nll.sum())
        count += nll.size
    return float(np.exp(total / count)), count


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Minimal PNG writer (8-bit RGB, zlib from the standard library; no plotting package)."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path.write_bytes(png)


def bar_panels(panels: list[np.ndarray], height: int = 220, gap: int = 20) -> np.ndarray:
    """Side-by-side bar charts (one bar per channel, shared linear y axis, white background,
    light grid lines every 10% of the shared maximum)."""
    top = max(float(p.max()) for p in panels)
    width = sum(len(p) for p in panels) + gap * (len(panels) + 1)
    img = np.full((height + 2 * gap, width, 3), 255, dtype=np.uint8)
    x0 = gap
    for p in panels:
        region = img[gap:gap + height, x0:x0 + len(p)]
        for frac in np.arange(0.1, 1.0001, 0.1):
            region[height - 1 - int(frac * (height - 1))] = (225, 225, 225)
        bars = np.round(p / top * (height - 1)).astype(int)
        for c, b in enumerate(bars):
            region[height - 1 - b:, c] = (31, 119, 180)
        img[gap + height, x0:x0 + len(p)] = 0  # x axis
        img[gap:gap + height, x0 - 1] = 0  # y axis
        x0 += len(p) + gap
    return img


def activation_plot(ckpt, calib: np.ndarray, cfg: QuantConfig, layer: int, path: Path) -> None:
    """Per-channel max |x| of the attention input at ``layer`` (norm-fused) over calibration
    tokens, before (left) and after (right) OffQ's R1, same y scale; also writes the numbers as
    CSV beside the PNG."""
    from offq.recipe import pipeline
    from offq.recipe import rotations as rot
    from offq.model import Model
    from offq.model.arch import architecture_of

    mc = ckpt.config.replace(tie_word_embeddings=False)
    arch = architecture_of(mc)
    r1, _, _ = pipeline.compute_rotations(ckpt, mc, cfg, calib, 2, False)
    w = {n: ckpt.tensors[n] for n in ckpt.tensors.keys()
         if arch.layer_of(n) is None or arch.layer_of(n) <= layer}
    rot.fuse_norms(w, layer + 1, arch)
    model = Model.from_tensors(mc.replace(num_hidden_layers=layer + 1), w)
    caps: list[np.ndarray] = []
    model.hidden_states(calib[:4], capture=lambda s, i, x: caps.append(
        x.reshape(-1, x.shape[-1]).copy()) if s == "attn_in" and i == layer else None)
    x = caps[0].astype(np.float64)
    before, after = np.abs(x).max(axis=0), np.abs(x @ r1).max(axis=0)
    write_png(path, bar_panels([before, after]))
    np.savetxt(path.with_suffix(".csv"), np.stack([before, after], 1), delimiter=",",
               header="max_abs_before,max_abs_after_offq_r1", fmt="%.5g")
    print(f"wrote {path} (layer {layer} attention input, {x.shape[0]} tokens: max |x| per channel "
          f"{before.max():.1f} before, {after.max():.1f} after OffQ R1; left/right panels)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--mode", choices=("fake", "real"), default="real")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true",
                   help="8 x 512 calibration, 2 windows of 512 (a smoke run, not the protocol)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results.md"))
    p.add_argument("--plot", type=Path, default=None, help="also write the activation plot (PNG)")
    p.add_argument("--plot-layer", type=int, default=3)
    args = p.parse_args()
    if args.quick:
        args.seqlen, args.max_windows, args.calib_samples, args.calib_seqlen = 512, 2, 8, 512

    from offq.recipe import pipeline
    from offq.data import DEFAULT_CALIBRATION, eval_windows, load_wikitext2_test, sample_calibration
    from offq.formats import open_checkpoint
    from offq.kernels import get_num_threads, threads
    from offq.model import Model
    from offq.quant.assemble import build_model

    nthreads = args.threads or get_num_threads()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    lines = []
    with threads(nthreads), open_checkpoint(args.model) as ckpt:
        add_bos = bool(ckpt.config.add_bos)
        windows = eval_windows(ckpt.tokenizer, load_wikitext2_test(), args.seqlen,
                               args.max_windows, add_bos)
        calib = sample_calibration(ckpt.tokenizer, DEFAULT_CALIBRATION, n=args.calib_samples,
                                   seqlen=args.calib_seqlen, seed=0, add_bos=add_bos)
        protocol = (f"model {args.model}; WikiText-2 test, seqlen {args.seqlen}, {len(windows)} "
                    f"windows, BOS {add_bos}; calibration {DEFAULT_CALIBRATION} "
                    f"{args.calib_samples} x {args.calib_seqlen}, seed 0; {args.mode} path; "
                    f"threads {nthreads}")
        print(protocol)
        header = "| row | config | ppl | tokens | quantize s | eval s |\n|---|---|---|---|---|---|"
        print(header)
        cache: tuple[str, object] | None = None  # the last quantized weights, reusable
        for row in rows:
            over = dict(ROWS[row], calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
            cfg = QuantConfig(**over)
            t0 = time.perf_counter()
            tq = 0.0
            if row == "fp":
                model = Model.from_checkpoint(ckpt)
            else:
                key = weight_key(cfg)
                if cache is None or cache[0] != key:
                    cache = None  # free the previous weights first
                    cache = (key, pipeline.quantize(ckpt, cfg, calib, progress=False))
                    tq = time.perf_counter() - t0
                res = cache[1]
                model = build_model(res.model_config, cfg, res.tensors, mode=args.mode)
            t1 = time.perf_counter()
            ppl, ntok = perplexity(model, windows)
            reused = "" if row == "fp" or tq else " (weights reused)"
            line = (f"| {row} | {cfg.describe(ckpt.config.hidden_size)} | {ppl:.3f} | {ntok} | "
                    f"{tq:.0f}{reused} | {time.perf_counter() - t1:.0f} |")
            print(line, flush=True)
            lines.append(line)
            del model
        if args.plot:
            activation_plot(ckpt, calib, QuantConfig(method="offq"), args.plot_layer, args.plot)
    text = f"{protocol}\n\n{header}\n" + "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
