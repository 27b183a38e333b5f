"""Weight-only results (issue 11): RTN, GPTQ and GPTQ + OSAQ at W4/W3/W2, per channel and in
groups, symmetric or asymmetric, on one model.

Protocol (printed with every row): WikiText-2 test (shipped in the package), tokenized once,
non-overlapping windows of ``--seqlen`` tokens, first ``--max-windows``; mean token NLL,
ppl = exp(mean). Calibration: ``--calib-samples`` x ``--calib-seqlen`` tokens of offq's default
corpus (never the eval text), drawn with ``--calib-seed`` (0). Weight-only: ``method="gptq"`` (no
rotation), activations and KV in float (``a_bits = kv_bits = 16``); each row quantizes in memory
and evaluates the dequantized float32 model. Group sizes that do not divide every input
dimension (128 for SmolLM2's d = 576) are skipped with the reason.

    python benchmarks/bench_weight_only.py --quick                      # 8 x 512 calib, 2 windows
    python benchmarks/bench_weight_only.py --rows fp,gptq-w4-g64-asym --max-windows 8
    python benchmarks/bench_weight_only.py --grid                        # the OSAQ grid (see GRID)
    python benchmarks/bench_weight_only.py --rows gptq-w4-ch-asym --calib-seed 1  # sampling noise
    python benchmarks/bench_weight_only.py --rows gptq-w2-g64-asym --no-clip-search  # min-max grids

Rows are named ``{rtn|gptq|osaq}-w{bits}-{ch|g64|g128}-{sym|asym}[-cdN]`` (``osaq`` = OSAQ +
GPTQ; ``-cdN``: N coordinate-descent sweeps after GPTQ, OSAQ's +CD variant) or ``fp``;
``--osaq k=v,...`` overrides OSAQ settings. Each finished row is appended as one JSON line to
``--jsonl`` (default benchmarks/results/weight_only.jsonl).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import json
import time
from pathlib import Path

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

from offq.config import QuantConfig  # noqa: E402
from offq.formats.files import atomic_write_text  # noqa: E402
from offq.progress import track  # noqa: E402

#: the issue's table: FP; RTN, GPTQ, GPTQ + OSAQ at each bits/group (asymmetric grids)
TABLE = ["fp"] + [f"{m}-w{b}-{g}-asym" for b, g in (
    (4, "ch"), (4, "g64"), (4, "g128"), (3, "ch"), (3, "g64"), (3, "g128"), (2, "g64"),
    (2, "g128")) for m in ("rtn", "gptq", "osaq")]

#: the OSAQ grid (each point at W3 per channel and W2 g64, asymmetric)
GRID = dict(osaq_gamma=(1e-4, 1e-5, 1e-6), osaq_tau_rel=(0.1,), osaq_mu1=(1e-2,),
            osaq_mu2=(100.0,), osaq_iters=(8, 1))


def row_config(row: str, calib: tuple[int, int], osaq: dict, seed: int = 0,
               clip_search: bool = True) -> QuantConfig:
    """The QuantConfig of a row name (ValueError for an unknown name); ``clip_search=False``
    gives every row min-max weight grids (the GPTQ reference code's default)."""
    if row == "fp":
        return QuantConfig(method="fp")
    try:
        method, bits, group, sym, *cd = row.split("-")
        if len(cd) > 1 or cd and (method == "rtn" or not cd[0].startswith("cd")):
            raise ValueError
        cd_sweeps = int(cd[0][2:]) if cd else 0
        w_bits = int(bits.removeprefix("w"))
        w_group = -1 if group == "ch" else int(group.removeprefix("g"))
        quantizer = {"rtn": "rtn", "gptq": "gptq", "osaq": "osaq+gptq"}[method]
        symmetric = {"sym": True, "asym": False}[sym]
    except (ValueError, KeyError):
        raise ValueError(f"row {row!r}: expected fp or {{rtn|gptq|osaq}}-w{{bits}}-"
                         f"{{ch|gNN}}-{{sym|asym}}[-cdN]") from None
    return QuantConfig(method="gptq", w_bits=w_bits, a_bits=16, kv_bits=16, w_quantizer=quantizer,
                       w_group_size=w_group, w_symmetric=symmetric, calib_samples=calib[0],
                       calib_seqlen=calib[1], seed=seed, gptq_cd_sweeps=cd_sweeps,
                       w_clip_search=clip_search, **(osaq if method == "osaq" else {}))


def perplexity(model, windows: np.ndarray) -> tuple[float, int]:
    total, count = 0.0, 0
    for s in track(range(len(windows)), "evaluate windows", unit="window"):
        nll = model.nll(windows[s:s + 1])
        total += float(nll.sum())
        count += nll.size
    return float(np.exp(total / count)), count


def group_problem(cfg: QuantConfig, mc) -> str | None:
    """Why ``cfg``'s weight group cannot be used on this model (None when it can)."""
    if cfg.w_bits == 16 or cfg.w_group_size == -1:
        return None
    for k in {mc.hidden_size, mc.intermediate_size, mc.num_attention_heads * mc.head_dim}:
        if k % cfg.w_group_size and cfg.w_group_size < k:
            return f"group {cfg.w_group_size} does not divide input dimension {k}"
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default=",".join(TABLE))
    p.add_argument("--grid", action="store_true", help="run the OSAQ grid (W3 ch, W2 g64)")
    p.add_argument("--osaq", default="", help="OSAQ overrides, e.g. osaq_gamma=1e-3,osaq_mu1=1")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--calib-seed", type=int, default=0,
                   help="which calibration windows are drawn (rows at other seeds measure how "
                        "much a row moves with its calibration sample)")
    p.add_argument("--no-clip-search", action="store_true",
                   help="min-max weight grids in every row, no MSE clip search (the GPTQ "
                        "reference code's grids)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="8 x 512 calibration, 2 windows")
    p.add_argument("--jsonl", type=Path,
                   default=Path(__file__).with_name("results") / "weight_only.jsonl")
    args = p.parse_args()
    # stage progress as log lines on stderr (a bar on a terminal): rows take minutes to an hour
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.max_windows, args.calib_samples, args.calib_seqlen = 2, 8, 512
    osaq = {k: (int(v) if k == "osaq_iters" else float(v))
            for k, v in (kv.split("=") for kv in args.osaq.split(",") if kv)}

    from offq.data import DEFAULT_CALIBRATION, eval_windows, load_wikitext2_test, sample_calibration
    from offq.formats import open_checkpoint
    from offq.kernels import get_num_threads, threads
    from offq.model import Model
    from offq.quant.assemble import build_model
    from offq.recipe import pipeline

    calib_shape = (args.calib_samples, args.calib_seqlen)
    if args.grid:
        points = [dict(zip(GRID, vals)) for vals in itertools.product(*GRID.values())]
        jobs = [(r, pt) for pt in points for r in ("osaq-w3-ch-asym", "osaq-w2-g64-asym")]
    else:
        jobs = [(r.strip(), osaq) for r in args.rows.split(",") if r.strip()]
    nthreads = args.threads or get_num_threads()
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    with threads(nthreads), open_checkpoint(args.model) as ckpt:
        add_bos = bool(ckpt.config.add_bos)
        windows = eval_windows(ckpt.tokenizer, load_wikitext2_test(), args.seqlen,
                               args.max_windows, add_bos)
        calib = sample_calibration(ckpt.tokenizer, DEFAULT_CALIBRATION, n=calib_shape[0],
                                   seqlen=calib_shape[1], seed=args.calib_seed,
                                   add_bos=add_bos)
        protocol = (f"model {args.model}; WikiText-2 test, seqlen {args.seqlen}, {len(windows)} "
                    f"windows, BOS {add_bos}; calibration {DEFAULT_CALIBRATION} "
                    f"{calib_shape[0]} x {calib_shape[1]}, seed {args.calib_seed}; weight-only, "
                    f"float activations; threads {nthreads}")
        print(protocol, flush=True)
        for row, over in jobs:
            cfg = row_config(row, calib_shape, over, args.calib_seed,
                             clip_search=not args.no_clip_search)
            why = group_problem(cfg, ckpt.config)
            if why:
                print(f"{row}: skipped ({why})", flush=True)
                continue
            t0 = time.perf_counter()
            if row == "fp":
                model, res = Model.from_checkpoint(ckpt), None
            else:
                res = pipeline.quantize(ckpt, cfg, calib, progress=None)
                model = build_model(res.model_config, cfg, res.tensors, mode="fake")
            tq = time.perf_counter() - t0
            ppl, ntok = perplexity(model, windows)
            rec = dict(row=row, config=cfg.describe(), osaq={k: getattr(cfg, k) for k in GRID}
                       if row.startswith("osaq") else None, ppl=ppl, tokens=ntok,
                       quantize_s=round(tq, 1),
                       timings={k: round(v, 1) for k, v in (res.timings if res else {}).items()},
                       protocol=protocol)
            if res is not None and res.reports:
                reps = list(res.reports.values())
                rec["osaq_summary"] = dict(
                    max_rel_change_wx=max(r["rel_change_wx"] for r in reps),
                    mean_row_max_drop=float(np.mean([1 - r["row_max_after"] / r["row_max_before"]
                                                     for r in reps])),
                    mean_tail_dim=float(np.mean([r["tail_dim"] for r in reps])))
            print(json.dumps(rec), flush=True)
            # the record appended by rewriting the file atomically: a crash mid-write cannot
            # leave a half line that spoils the records before it
            before = args.jsonl.read_text() if args.jsonl.is_file() else ""
            atomic_write_text(args.jsonl, before + json.dumps(rec) + "\n")
            del model, res
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
