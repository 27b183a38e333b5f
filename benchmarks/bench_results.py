"""The results table of issue 4: perplexity of every method and ablation on one model.

Protocol (printed with every row): WikiText-2 test (``../shared/data/wikitext-2-raw``), tokenized
once, non-overlapping windows of ``--seqlen`` tokens (BOS per window when the model uses one),
mean token NLL, ppl = exp(mean); ``--max-windows`` takes the first N windows. Calibration:
``--calib-samples`` x ``--calib-seqlen`` tokens from offq.data's default calibration corpus (never
the eval text), seed 0. Each row quantizes in memory (offq.quantize) and evaluates the fake-quant
path (``--mode real`` for the packed kernels; the two agree, see tests/test_pipeline.py).

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
    "abl-standard-pca": dict(method="offq", pca="standard"),
    "abl-no-pca": dict(method="offq", pca="none"),
    "abl-unsorted": dict(method="offq", sorted_grouping=False),
    "abl-outlier-other": dict(method="offq", outlier_index="other"),
    "abl-sym-act": dict(method="offq", a_symmetric=True),
    "abl-per-token-act": dict(method="offq", a_group_size=-1),
    "abl-centred": dict(method="offq", pca_centred=True),
    "abl-group192": dict(method="offq", a_group_size=192),
    "offq-w4a8kv8": dict(method="offq", a_bits=8, kv_bits=8),
    "offq-w4a16": dict(method="offq", a_bits=16, kv_bits=16),
}


def perplexity(model, windows: np.ndarray, batch: int = 1) -> tuple[float, int]:
    total, count = 0.0, 0
    for s in range(0, len(windows), batch):
        nll = model.nll(windows[s:s + batch])
        total += float(nll.sum())
        count += nll.size
    return float(np.exp(total / count)), count


def activation_plot(ckpt, calib: np.ndarray, cfg: QuantConfig, layer: int, path: Path) -> None:
    """Per-channel max |x| of the attention input at ``layer`` before and after OffQ's R1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from offq import pipeline
    from offq import rotations as rot
    from offq.model import Model

    mc = ckpt.config.replace(tie_word_embeddings=False)
    r1, _, _ = pipeline.compute_rotations(ckpt, mc, cfg, calib, 2, False)
    caps = []
    w = {n: ckpt.tensors[n] for n in ckpt.tensors.keys()
         if not n.startswith("model.layers.") or int(n.split(".")[2]) <= layer}
    rot.fuse_norms(w, layer + 1)
    small = mc.replace(num_hidden_layers=layer + 1)
    model = Model.from_tensors(small, w)
    model.hidden_states(calib[:2, :512], capture=lambda s, i, x: caps.append(x.reshape(-1, x.shape[-1]).copy())
                        if s == "attn_in" and i == layer else None)
    x = caps[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3), dpi=80)
    for ax, data, title in ((axes[0], x, "before (norm-fused input)"), (axes[1], x @ r1, "after OffQ R1")):
        ax.bar(np.arange(x.shape[1]), np.abs(data).max(axis=0), width=1.0)
        ax.set_title(f"layer {layer} attention input, {title}")
        ax.set_xlabel("channel")
    axes[0].set_ylabel("max |x| over tokens")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--mode", choices=("fake", "real"), default="fake")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true",
                   help="8 x 512 calibration, 2 windows of 512 (a smoke run, not the protocol)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results.md"))
    p.add_argument("--plot", type=Path, default=None, help="also write the activation plot (PNG)")
    args = p.parse_args()
    if args.quick:
        args.seqlen, args.max_windows, args.calib_samples, args.calib_seqlen = 512, 2, 8, 512

    from offq import pipeline
    from offq.data import DEFAULT_CALIBRATION, eval_windows, load_wikitext2_test, sample_calibration
    from offq.formats import open_checkpoint
    from offq.kernels import get_num_threads, threads
    from offq.model import Model

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
        for row in rows:
            over = dict(ROWS[row], calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
            cfg = QuantConfig(**over)
            t0 = time.perf_counter()
            if row == "fp":
                model, tq = Model.from_checkpoint(ckpt), 0.0
            else:
                res = pipeline.quantize(ckpt, cfg, calib, progress=False)
                tq = time.perf_counter() - t0
                model = res.model(args.mode)
            t1 = time.perf_counter()
            ppl, ntok = perplexity(model, windows)
            line = (f"| {row} | {cfg.describe(ckpt.config.hidden_size)} | {ppl:.3f} | {ntok} | {tq:.0f} | "
                    f"{time.perf_counter() - t1:.0f} |")
            print(line, flush=True)
            lines.append(line)
            del model
        if args.plot:
            activation_plot(ckpt, calib, QuantConfig(method="offq"), 3, args.plot)
    text = f"{protocol}\n\n{header}\n" + "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
