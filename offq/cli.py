"""The ``offq`` command line.

    offq quantize MODEL --out DIR [options]
    offq eval MODEL [--dataset wikitext2] [--seqlen 2048] [--max-windows N] [--json]
    offq generate MODEL --prompt TEXT [--max-new-tokens 64] [--temperature 0] [--seed 0]

MODEL is a registered name (``smollm2-135m``), a HF checkpoint directory, a .gguf file, or an
offq checkpoint directory written by ``offq quantize`` (run on the real 4-bit kernels).
Each subcommand is one ``cmd_<name>(args)`` function that unpacks the parsed arguments into plain
values before calling library code; new subcommands register through ``add_<name>_parser``.

Errors: one line on stderr, ``offq COMMAND: error: MESSAGE``, no traceback. Exit status 0 on
success, 2 when the input is at fault (a bad flag or combination, a missing file, an unsupported
architecture, a malformed checkpoint), 1 for a failure of the machine (I/O errors). ``--threads`` defaults to every core
the process may use, for every subcommand.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

log = logging.getLogger("offq")


# ------------------------------------------------------------------------------------------------
# shared
# ------------------------------------------------------------------------------------------------
class UsageError(ValueError):
    """A bad flag or flag combination (exit status 2)."""


def _add_model_and_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered name (smollm2-135m), HF checkpoint dir, .gguf file "
                                 "or offq (quantized) checkpoint dir")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for offq's kernels and BLAS (default: every available core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")


def _add_common(p: argparse.ArgumentParser) -> None:
    _add_model_and_threads(p)
    p.add_argument("--mode", choices=("real", "fake"), default="real",
                   help="offq checkpoints: real 4-bit kernels (default) or float32 simulation")


def _set_threads(n: int | None) -> None:
    """One thread setting for offq's kernels and BLAS; None leaves the default (every core)."""
    if n is None:
        return
    if n < 1:
        raise UsageError(f"--threads: expected a positive integer, got {n}")
    from .kernels import set_num_threads
    set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# quantize
# ------------------------------------------------------------------------------------------------
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


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    """``offq quantize MODEL --out DIR``: MODEL, --out, --resume, run settings and one flag per
    QuantConfig field (``w_bits`` -> ``--w-bits``, booleans as ``--x`` / ``--no-x``)."""
    from .config import QuantConfig

    p = sub.add_parser(
        "quantize", help="quantize a model (OffQ, QuaRot-style, GPTQ, RTN)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize MODEL and write an offq checkpoint directory.",
        epilog="examples:\n"
               "  offq quantize smollm2-135m --method offq --out runs/offq\n"
               "  offq quantize smollm2-135m --method quarot --out runs/quarot --calib-samples 32\n"
               "  offq quantize smollm2-135m --method offq --pca standard --out runs/abl-pca\n"
               "  offq quantize ... --resume    # continue an interrupted run in the same --out")
    _add_model_and_threads(p)
    p.add_argument("--out", required=True, help="output directory (the offq checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (same model, config, calibration)")
    p.add_argument("--calib-source", default=None,
                   help="calibration corpus (default: offq.data's default corpus; never the eval "
                        "text)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="calibration sequences per layer forward (memory vs speed)")
    defaults = QuantConfig()
    group = p.add_argument_group("quantization (QuantConfig fields; docs/METHODS.md)")
    for f in dataclasses.fields(QuantConfig):
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
    group.add_argument("--osaq", action="store_true",
                       help="OSAQ before rounding (--w-quantizer osaq+gptq, osaq+rtn for --method "
                            "rtn); settings --osaq-gamma/-tau-rel/-mu1/-mu2")
    p.set_defaults(func=cmd_quantize)


def config_from_args(args: argparse.Namespace):
    """QuantConfig from parsed flags (a UsageError names the offending field)."""
    from .config import QuantConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(QuantConfig)}
    if values["method"] == "fp":
        values.update(w_bits=16, a_bits=16, kv_bits=16)
    if getattr(args, "osaq", False):
        base = values["w_quantizer"] or ("rtn" if values["method"] == "rtn" else "gptq")
        values["w_quantizer"] = base if base.startswith("osaq+") else "osaq+" + base
    try:
        return QuantConfig(**values)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_quantize(args: argparse.Namespace) -> int:
    from .data import DEFAULT_CALIBRATION, sample_calibration
    from .formats import open_checkpoint
    from .recipe.pipeline import needs_calibration, quantize

    cfg = config_from_args(args)
    _set_threads(args.threads)
    source = args.calib_source or DEFAULT_CALIBRATION
    with open_checkpoint(args.model) as ckpt:
        calib = None
        t0 = time.perf_counter()
        if needs_calibration(cfg):
            calib = sample_calibration(ckpt.tokenizer, source, n=cfg.calib_samples,
                                       seqlen=cfg.calib_seqlen, seed=cfg.seed,
                                       add_bos=bool(ckpt.config.add_bos))
        t_calib = time.perf_counter() - t0
        result = quantize(ckpt, cfg, calib, out_dir=args.out, resume=args.resume,
                          batch_size=args.batch_size,
                          progress=None if not args.quiet else False,
                          calibration_source=str(source) if calib is not None else None,
                          calibration_seed=cfg.seed if calib is not None else None)
    stages = {"calibration data": t_calib, **result.timings}
    print(f"offq quantize: {args.model} -> {args.out}")
    print(f"  config: {result.quant_config.describe()}")
    print(f"  calibration: {source}, {cfg.calib_samples} x {cfg.calib_seqlen} tokens, seed {cfg.seed}"
          if calib is not None else "  calibration: none needed")
    from .kernels import get_num_threads
    print("  time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
          + f"; total {sum(stages.values()):.1f} (threads {get_num_threads()})")
    return 0


# ------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------
def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity on an eval text (docs/METHODS.md, protocol)",
                       description="Perplexity over non-overlapping windows of SEQLEN tokens.")
    _add_common(p)
    p.add_argument("--dataset", default="wikitext2",
                   help="wikitext2 (WikiText-2 raw test set) or a path to a UTF-8 text file")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate the first N windows")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import load_dataset, load_model, perplexity

    _set_threads(args.threads)
    text = load_dataset(args.dataset)
    model, tokenizer = load_model(args.model, mode=args.mode)
    res = perplexity(model, tokenizer, text, seqlen=args.seqlen, max_windows=args.max_windows,
                     batch_size=args.batch_size, quiet=True if args.quiet else None,
                     dataset=args.dataset)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"model={res['model']} method={res['method']} dataset={res['dataset']} "
              f"seqlen={res['seqlen']} bos={res['add_bos']} windows={res['windows']} "
              f"tokens={res['tokens']} nll={res['nll']:.5f} ppl={res['ppl']:.4f} "
              f"({res['tokens_per_s']:.0f} tok/s)")
    return 0


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt (greedy by default)")
    _add_common(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from .eval import load_model
    from .generate import GenerationConfig, generate

    _set_threads(args.threads)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, seed=args.seed)
    model, tokenizer = load_model(args.model, mode=args.mode)
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer found (tokenizer.json) to encode the prompt")
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate(model, tokenizer, args.prompt, cfg, on_token=show)
    sys.stdout.write("\n")
    return 0


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a weight-only offq checkpoint in another format",
                       description="Export DIR (an offq checkpoint) as --format into --out "
                                   "(gptq: the layout HF-side GPTQ loaders read; "
                                   "offq/formats/gptq_export.py).")
    p.add_argument("model", help="offq checkpoint directory")
    p.add_argument("--format", choices=("gptq",), required=True, help="output format")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq",
                   help="gptq: stored zero = zero-point - 1 (every GPTQ loader); gptq_v2: the "
                        "zero-point itself (GPTQModel)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .formats.gptq_export import export_gptq

    out = export_gptq(args.model, args.out, checkpoint_format=args.checkpoint_format)
    print(f"wrote {out} (format {args.format})")
    return 0


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
SUBCOMMANDS = [add_quantize_parser, add_eval_parser, add_generate_parser, add_export_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offq", description="W4A4KV4 quantization of open LLMs with real 4-bit CPU kernels")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``offq`` command; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.DEBUG if args.verbose else
                        (logging.WARNING if quiet else logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, TypeError) as e:  # the user's input (UsageError too)
        print(f"offq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"offq {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"offq {args.command}: interrupted", file=sys.stderr)
        return 130
