"""``offq quantize MODEL --out DIR [options]``: the command line of offq.pipeline.quantize.

Every QuantConfig field is a flag with the same name (``w_bits`` -> ``--w-bits``, booleans as
``--x`` / ``--no-x``) and the documented default, e.g.::

    offq quantize smollm2-135m --method offq --w-bits 4 --a-bits 4 --kv-bits 4 --out runs/offq
    offq quantize smollm2-135m --method quarot --out runs/quarot --calib-samples 32
    offq quantize smollm2-135m --method offq --pca standard --out runs/abl-standard-pca
    offq quantize ... --resume          # continue an interrupted run in the same --out

Wire it into the main CLI with :func:`add_quantize_parser` (it sets ``func`` on the parsed
namespace); ``python -m offq.quantize_cli`` runs it standalone.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Sequence

from .config import QuantConfig

logger = logging.getLogger("offq.quantize")

_HELP = {
    "method": "offq (PCA + block-Hadamard R1), quarot (random-sign Hadamard R1), gptq / rtn "
              "(no rotation), fp (nothing quantized)",
    "w_quantizer": "gptq, rtn, osaq+gptq, osaq+rtn (default: rtn for --method rtn, else gptq)",
    "w_group_size": "-1 = per output channel",
    "a_group_size": "-1 = per token; shrunk to the largest power of two dividing d when needed",
    "kv_group_size": "-1 = head_dim",
    "pca": "top1 (OffQ), standard (all tokens), none (identity basis)",
    "outlier_index": "ones (all-ones Hadamard row, OffQ) or other (ablation)",
    "r2": "hadamard, pca_hadamard, none",
    "calib_samples": "calibration sequences",
    "calib_seqlen": "tokens per calibration sequence",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The quantize flags: MODEL, --out, --resume, run settings and one flag per QuantConfig field."""
    p.add_argument("model", help="HF checkpoint directory, .gguf file or registered name "
                                 "(smollm2-135m)")
    p.add_argument("--out", required=True, help="output directory (the offq checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (same model, config, calibration)")
    p.add_argument("--calib-source", default=None,
                   help="calibration corpus (default: offq.data's default corpus; never the eval "
                        "text)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="calibration sequences per layer forward (memory vs speed)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for offq's kernels and OpenBLAS (one setting; default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    defaults = QuantConfig()
    group = p.add_argument_group("quantization (QuantConfig fields)")
    for f in dataclasses.fields(QuantConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name) if f.name != "w_quantizer" else None
        help_text = _HELP.get(f.name, "") + (f" (default: {default})" if f.name != "w_quantizer" else "")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        elif isinstance(default, int):
            group.add_argument(flag, type=int, default=default, help=help_text)
        elif isinstance(default, float):
            group.add_argument(flag, type=float, default=default, help=help_text)
        else:
            group.add_argument(flag, type=str, default=default, help=help_text)


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    """QuantConfig from parsed flags (ValueError names the offending field)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(QuantConfig)
              if f.name != "extra"}
    if values["method"] == "fp":
        values.update(w_bits=16, a_bits=16, kv_bits=16)
    return QuantConfig(**values)


def run_quantize(args: argparse.Namespace) -> int:
    """Execute ``offq quantize`` from parsed arguments; returns the exit status."""
    from .data import DEFAULT_CALIBRATION, sample_calibration
    from .formats import open_checkpoint
    from .kernels import threads
    from .pipeline import needs_hessians, needs_statistics, quantize

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"offq quantize: {exc}", file=sys.stderr)
        return 2
    with threads(args.threads):
        with open_checkpoint(args.model) as ckpt:
            calib = None
            t0 = time.perf_counter()
            if needs_hessians(cfg) or needs_statistics(cfg):
                calib = sample_calibration(ckpt.tokenizer, args.calib_source or DEFAULT_CALIBRATION,
                                           n=cfg.calib_samples, seqlen=cfg.calib_seqlen,
                                           seed=cfg.seed, add_bos=bool(ckpt.config.add_bos))
            t_calib = time.perf_counter() - t0
            result = quantize(ckpt, cfg, calib, out_dir=args.out, resume=args.resume,
                              batch_size=args.batch_size,
                              progress=None if not args.quiet else False)
    stages = {"calibration data": t_calib, **result.timings}
    print(f"offq quantize: {args.model} -> {args.out}")
    print(f"  config: {cfg.describe()}")
    print(f"  calibration: {args.calib_source or DEFAULT_CALIBRATION}, "
          f"{cfg.calib_samples} x {cfg.calib_seqlen} tokens, seed {cfg.seed}"
          if calib is not None else "  calibration: none needed")
    print("  time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
          + f"; total {sum(stages.values()):.1f} (threads {args.threads})")
    return 0


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``quantize`` on an ``argparse`` subparsers object (sets ``func=run_quantize``)."""
    p = subparsers.add_parser("quantize", help="quantize a model (OffQ, QuaRot-style, GPTQ, RTN)",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run_quantize)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offq quantize", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_quantize(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
