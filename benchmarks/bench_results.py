"""The results table of issue 4: perplexity of every method and ablation on one model.

Protocol (printed with every row): WikiText-2 test (shipped in the package), tokenized
once, non-overlapping windows of ``--seqlen`` tokens (BOS per window when the model uses one),
mean token NLL, ppl = exp(mean); ``--max-windows`` takes the first N windows. Calibration:
``--calib-samples`` x ``--calib-seqlen`` tokens from offq.data's default calibration corpus (never
the eval text), seed ``--seed`` (0). Each row quantizes in memory (offq.quantize) and evaluates
the real path (packed 4-bit kernels; ``--mode fake`` for the float32 simulation, which gives
bit-identical numbers, see tests/test_runtime.py, and runs slower).

    python benchmarks/bench_results.py --quick              # small calibration + 2 windows
    python benchmarks/bench_results.py                      # the full protocol (long)
    python benchmarks/bench_results.py --rows fp,offq-gptq --max-windows 8
    python benchmarks/bench_results.py --plot benchmarks/activations_offq.png --rows fp
    python benchmarks/bench_results.py --redraw benchmarks/results.md --chart benchmarks/perplexity.png

Writes a Markdown table (``--out``, default benchmarks/results.md) and prints each row as it
finishes.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

from offq.config import CALIB_ACTIVATIONS, QuantConfig  # noqa: E402
from offq.formats.files import atomic_write_text  # noqa: E402
from offq.progress import track  # noqa: E402

#: row name -> QuantConfig overrides (W4A4KV4 unless the row says otherwise)
ROWS: dict[str, dict] = {
    "fp": dict(method="fp"),
    "rtn": dict(method="rtn"),
    "gptq": dict(method="gptq"),
    "quarot-gptq": dict(method="quarot"),
    # QuaRot-style with the QuaRot paper's activation quantizer (symmetric, per token, clip 0.9)
    # instead of offq's shared asymmetric groups: the baseline the OffQ paper's gap is taken from
    "quarot-own-act": dict(method="quarot", a_symmetric=True, a_group_size=-1, a_clip=0.9),
    "offq-rtn": dict(method="offq", w_quantizer="rtn"),
    "offq-gptq": dict(method="offq"),
    "offq-osaq": dict(method="offq", w_quantizer="osaq+gptq"),  # OSAQ on the rotated weights
    # rows that change only run-time quantizers reuse the offq-gptq weights where the
    # calibration allows it (see weight_key)
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

#: QuantConfig fields of the run-time KV and activation quantizers. The stored weights never
#: depend on the KV fields, and on the activation fields only through the layers the calibration
#: batch crosses (propagation_setting): when the crossing rounds activations (the default,
#: ``calib_activations="quantized"``)
KV_FIELDS = ("kv_bits", "kv_group_size", "kv_symmetric")
ACTIVATION_FIELDS = ("a_bits", "a_symmetric", "a_clip")


def weight_key(cfg: QuantConfig) -> str:
    """Configs with the same key quantize to the same stored tensors, so a row may reuse the
    previous row's weights. OffQ's R1 depends on a_group_size (its block Hadamard is the
    activation group); with the quantized calibration crossing (the default) every activation
    field enters the weights too, and only the KV fields are free: so ``abl-sym-act``,
    ``offq-w4a8kv8`` and ``offq-w4a16`` quantize anew, as ``offq quantize`` with those flags
    would, and reuse only with ``--calib-activations float``."""
    from offq.recipe.calibrate import propagation_setting

    d = cfg.to_dict()
    free = list(KV_FIELDS)
    if propagation_setting(cfg)[1] != "real":  # the batch crossed the layers in float
        free += ACTIVATION_FIELDS
        if cfg.method != "offq":  # only OffQ's R1 (its block Hadamard) depends on the group
            free.append("a_group_size")
    for name in free:
        d.pop(name, None)
    return repr(sorted(d.items()))


def perplexity(model, windows: np.ndarray, batch: int = 1) -> tuple[float, int]:
    total, count = 0.0, 0
    for s in track(range(0, len(windows), batch), "evaluate windows", unit="batch"):
        nll = model.nll(windows[s:s + batch])
        total += float(nll.sum())
        count += nll.size
    return float(np.exp(total / count)), count


def activation_plot(ckpt, calib: np.ndarray, cfg: QuantConfig, layer: int, path: Path) -> None:
    """Per-channel max |x| of the attention input at ``layer`` (norm-fused) over calibration
    tokens, before and after OffQ's R1 (offq.outliers, drawn by offq.plots); the numbers go to a
    CSV beside the PNG."""
    from offq.outliers import activation_outliers, offq_r1
    from offq.plots import plot_activation_channels

    mc = ckpt.config
    r1 = offq_r1(ckpt, calib, cfg, show=False)
    x = calib[:4]
    _, ch = activation_outliers(ckpt, x, rotation=r1, layers=[layer], keep_channels=layer,
                                show=False)
    protocol = (f"{ckpt.name}, layer {layer} attention input (q/k/v_proj input of the norm-fused "
                f"float model), {x.shape[0]} x {x.shape[1]} calibration tokens (wiki-vital, seed "
                f"0); R1 from {calib.shape[0]} x {calib.shape[1]} tokens: top-1 PCA, channels "
                f"sorted into groups of {cfg.activation_group(mc.hidden_size)}, block Hadamard")
    plot_activation_channels(ch["before"], ch["after"], path,
                             title=f"{ckpt.name}: per-channel max |x| before and after OffQ's R1",
                             caption=f"Protocol: {protocol}. Shared linear y axis.")
    np.savetxt(path.with_suffix(".csv"), np.stack([ch["before"], ch["after"]], 1), delimiter=",",
               header="max_abs_before,max_abs_after_offq_r1", fmt="%.5g")
    print(f"wrote {path} (max |x| per channel {ch['before'].max():.1f} before, "
          f"{ch['after'].max():.1f} after OffQ R1)")


def table_rows(markdown: str) -> tuple[str, list[tuple[str, float]]]:
    """(protocol line, [(row, ppl)]) of a results table written by this script."""
    protocol = next((ln for ln in markdown.splitlines() if ln.startswith("model ")), "")
    rows = []
    for ln in markdown.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("row", "---"):
            try:
                rows.append((cells[0], float(cells[2])))
            except ValueError:
                continue
    return protocol, rows


def perplexity_chart(markdown: str, path: Path) -> None:
    """Bar chart of the table's perplexities (FP as the dashed reference line)."""
    from offq.plots import plot_perplexity_bars

    protocol, rows = table_rows(markdown)
    fp = next((v for n, v in rows if n == "fp"), None)
    plot_perplexity_bars([(n, v) for n, v in rows if n != "fp"], path,
                         title="Perplexity by method (W4A4KV4 unless the row says otherwise)",
                         caption=f"Protocol: {protocol}. Row names: benchmarks/bench_results.py "
                                 "ROWS; configs in benchmarks/results.md.",
                         reference=("FP32", fp) if fp is not None else None)
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0,
                   help="QuantConfig.seed: the calibration sample and QuaRot-style's random signs "
                        "(offq quantize --seed)")
    p.add_argument("--mode", choices=("fake", "real"), default="real")
    p.add_argument("--calib-activations", choices=CALIB_ACTIVATIONS,
                   default=QuantConfig.calib_activations,
                   help="how the calibration batch crosses the quantized layers (offq quantize's "
                        "flag; the default is QuantConfig's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true",
                   help="8 x 512 calibration, 2 windows of 512 (a smoke run, not the protocol)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results.md"))
    p.add_argument("--plot", type=Path, default=None, help="also write the activation plot (PNG)")
    p.add_argument("--plot-layer", type=int, default=3)
    p.add_argument("--chart", type=Path, default=None,
                   help="also draw the perplexity bar chart of the table (PNG)")
    p.add_argument("--redraw", type=Path, default=None, metavar="RESULTS_MD",
                   help="only redraw --chart from a table this script wrote (no runs)")
    args = p.parse_args()
    # stage progress as log lines on stderr (a bar on a terminal): rows take minutes to an hour
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.redraw:
        perplexity_chart(args.redraw.read_text(), args.chart or Path("perplexity.png"))
        return 0
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
                                   seqlen=args.calib_seqlen, seed=args.seed, add_bos=add_bos)
        protocol = (f"model {args.model}; WikiText-2 test, seqlen {args.seqlen}, {len(windows)} "
                    f"windows, BOS {add_bos}; calibration {DEFAULT_CALIBRATION} "
                    f"{args.calib_samples} x {args.calib_seqlen}, seed {args.seed}; "
                    f"{args.mode} path; threads {nthreads}")
        print(protocol)
        header = "| row | config | ppl | tokens | quantize s | eval s |\n|---|---|---|---|---|---|"
        print(header)
        cache: tuple[str, object] | None = None  # the last quantized weights, reusable
        for row in rows:
            over = dict(ROWS[row], calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                        calib_activations=args.calib_activations, seed=args.seed)
            cfg = QuantConfig(**over)
            t0 = time.perf_counter()
            tq = 0.0
            if row == "fp":
                model = Model.from_checkpoint(ckpt)
            else:
                key = weight_key(cfg)
                # the key offsets are stored only when the K cache was quantized
                if cache is None or cache[0] != key or (
                        cfg.centres_keys and not cache[1].quant_config.centres_keys):
                    cache = None  # free the previous weights first
                    cache = (key, pipeline.quantize(ckpt, cfg, calib, progress=None))
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
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    if args.chart:
        perplexity_chart(text, args.chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
