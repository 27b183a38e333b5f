"""The ``offq`` command line.

    offq quantize MODEL --out DIR [options]          (offq.quantize_cli)
    offq eval MODEL [--dataset wikitext2] [--seqlen 2048] [--max-windows N] [--json]
    offq generate MODEL --prompt TEXT [--max-new-tokens 64] [--temperature 0] [--seed 0]

MODEL is a registered name (``smollm2-135m``), a HF checkpoint directory, a .gguf file, or an
offq checkpoint directory written by ``offq quantize`` (run on the real 4-bit kernels).
Each subcommand is one ``cmd_<name>(args)`` function that unpacks the parsed arguments into plain
values before calling library code; new subcommands register through ``add_<name>_parser``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

log = logging.getLogger("offq")


# ------------------------------------------------------------------------------------------------
# shared
# ------------------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered name (smollm2-135m), HF checkpoint dir, .gguf file "
                                 "or offq (quantized) checkpoint dir")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for offq's kernels and BLAS (default: all cores)")
    p.add_argument("--mode", choices=("real", "fake"), default="real",
                   help="offq checkpoints: real 4-bit kernels (default) or float32 simulation")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log messages")


def _set_threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads: expected a positive integer, got {n}")
    try:
        from .kernels import set_num_threads
    except ImportError:  # pragma: no cover - kernels not built: limit BLAS only
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=n)
        return
    set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------
def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity on an eval text (METHODS.md section 4)",
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
# entry point
# ------------------------------------------------------------------------------------------------
def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    from .quantize_cli import add_quantize_parser as add
    add(sub)


SUBCOMMANDS = [add_quantize_parser, add_eval_parser, add_generate_parser]


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
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"offq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"offq {args.command}: interrupted", file=sys.stderr)
        return 130
