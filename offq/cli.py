"""The ``offq`` command line.

    offq quantize MODEL --out DIR [options]
    offq eval MODEL [--dataset wikitext2] [--seqlen 2048] [--max-windows N] [--json]
    offq generate MODEL --prompt TEXT [--max-new-tokens 64] [--temperature 0] [--seed 0]
    offq generate MODEL --chat MESSAGE [--system TEXT]
    offq generate MODEL --interactive [--system TEXT]

MODEL is a registered name (``smollm2-135m``), a HF checkpoint directory, a .gguf file, or an
offq checkpoint directory written by ``offq quantize`` (run on the real 4-bit kernels).
Each subcommand is one ``cmd_<name>(args)`` function that unpacks the parsed arguments into plain
values before calling library code; new subcommands register through ``add_<name>_parser``.

Errors: one line on stderr, ``offq COMMAND: error: MESSAGE``, no traceback. Exit status 0 on
success, 2 when the input is at fault (a bad flag or combination, a missing file, an unsupported
architecture, a malformed checkpoint), 1 for a failure of the machine (I/O errors). ``--threads`` defaults to every core
the process may use (``offq bench``: 1 and 2; ``offq export`` computes nothing and has none).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

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


def _add_common(p: argparse.ArgumentParser, default_mode: str) -> None:
    _add_model_and_threads(p)
    p.add_argument("--mode", choices=("auto", "real", "fake", "fused"), default=default_mode,
                   help=f"offq checkpoints (default {default_mode}): auto (fused where the "
                        "checkpoint is W4A4KV4 or weight-only 2/3/4/8-bit, else real), real "
                        "(4-bit kernels sequenced by NumPy), fused (every layer of a step in one "
                        "C call; W4A4KV4 and weight-only checkpoints) or fake (float32 "
                        "simulation)")


def _add_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", choices=("float", "int8"), default="float",
                   help="the fused C decoder's attention over the 4-bit KV cache (W4A4KV4 "
                        "checkpoints, --mode fused or auto): float32 sums (default) or the opt-in "
                        "int8 (8-bit queries and softmax weights, exact integer sums; prompts run "
                        "through the C step too; perplexity within +-1%% on SmolLM2-135M, +0.88%% on "
                        "Qwen2.5-Coder-1.5B; faster long prompts with AVX-512 VNNI)")


def _check_attention(args: argparse.Namespace) -> None:
    if args.attention != "float" and args.mode not in ("fused", "auto"):
        raise UsageError(f"--attention {args.attention} runs on the fused C decoder, which "
                         f"takes W4A4KV4 offq checkpoints: for one, add --mode fused (or auto); "
                         f"--mode is {args.mode}")


def _set_threads(n: int | None) -> None:
    """One thread setting for offq's kernels and BLAS; None leaves the default (every core)."""
    if n is None:
        return
    if n < 1:
        raise UsageError(f"--threads: expected a positive integer, got {n}")
    from .kernels import set_num_threads
    try:
        set_num_threads(n)
    except ValueError as e:
        raise UsageError(f"--threads {n}: {e}") from e


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
    "kv_centre_keys": "subtract each KV head's calibrated mean key before the K cache is "
                      "quantized (exact in float: softmax ignores it)",
    "pca": "top1 (OffQ), standard (all tokens), none (identity basis)",
    "outlier_index": "ones (all-ones Hadamard row, OffQ) or other (ablation)",
    "r2": "hadamard, pca_hadamard, none",
    "gptq_cd_sweeps": "coordinate-descent re-quantization sweeps after GPTQ on its objective, "
                      "grid fixed (OSAQ's +CD variant; 0 = off)",
    "gptq_dtype": "precision of GPTQ's arithmetic (the Hessian's factorization, the errors and the "
                  "weight updates): float64; float32 at twice the rate, as the reference GPTQ "
                  "code runs (a Hessian float32 cannot factor falls back to float64); auto: "
                  "float32 for sites of 4096 inputs or more, float64 below",
    "osaq_tail": "how OSAQ finds the Hessian tail: exact (tridiagonal reduction), subspace "
                 "(inverse subspace iteration, the same budget without the reduction), auto "
                 "(subspace from input width 4096 up)",
    "lm_head_bits": "16: the LM head stays float32 (the paper's); 8: int8 codes with one scale "
                    "per group of g inputs; 4: 4-bit asymmetric codes per group of g inputs, "
                    "run packed by the weight-only kernel (half the int8 head's bytes per token); "
                    "g = the largest power of two <= 128 dividing the hidden size (64 for 576)",
    "calib_samples": "calibration sequences",
    "calib_seqlen": "tokens per calibration sequence",
    "calib_activations": "quantized: the calibration batch crosses the quantized layers with "
                         "its activations rounded by the run-time activation quantizer, so the "
                         "4-bit products run on the real W4A4 kernels; float: float activations "
                         "and float32 products (QuaRot's way, slower; KV stays float in both)",
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
               "  offq quantize smollm2-135m --out runs/offq --calib-samples 16 --calib-seqlen 512 "
               "--eval-windows 4\n"
               "  offq quantize ... --resume    # continue an interrupted run in the same --out")
    _add_model_and_threads(p)
    p.add_argument("--out", required=True, help="output directory (the offq checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (same model, config, calibration)")
    p.add_argument("--calib-source", default=None,
                   help="calibration corpus: wiki-vital (the default: Wikipedia summaries), "
                        "wiki-vital-chat (the same as exchanges in the model's chat template, "
                        "for instruct models), or a .txt/.jsonl file or a directory of them; "
                        "never the eval text")
    p.add_argument("--batch-size", type=int, default=4,
                   help="calibration sequences per layer forward (memory vs speed)")
    p.add_argument("--eval-windows", type=int, default=0, metavar="N",
                   help="then measure WikiText-2 perplexity before (FP32) and after (real 4-bit "
                        "kernels) on the first N windows and print the table (default 0: no)")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per eval window (2048)")
    memory = p.add_mutually_exclusive_group()
    memory.add_argument("--hold-freed-memory", action="store_true",
                        help="glibc malloc keeps freed memory for reuse instead of unmapping "
                             "it for the whole command (the --eval-windows evaluation too, not "
                             "only the quantization, which holds it by default); freed memory "
                             "stays with the process until it exits (offq.process)")
    memory.add_argument("--return-freed-memory", action="store_true",
                        help="glibc's usual malloc throughout: by default the quantization holds "
                             "freed memory from its rotations to its write, which spares each "
                             "batch's page faults (Qwen2.5-1.5B on a 2-vCPU VM: ~40%% less time "
                             "per layer), and gives it back when it ends")
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
                            "rtn); settings --osaq-gamma/-tau-rel/-mu1/-mu2/-tail/-iters")
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
    if args.eval_windows < 0 or args.eval_seqlen < 2:
        raise UsageError("--eval-windows must be >= 0 and --eval-seqlen >= 2")
    if args.hold_freed_memory:
        from .process import hold_freed_memory

        if not hold_freed_memory():
            log.warning("--hold-freed-memory: the C library is not glibc; nothing changed")
    _set_threads(args.threads)
    from .formats.files import check_creatable

    check_creatable(args.out, "--out")  # before the model is read, not after
    from .formats.checkpoint import is_offq_checkpoint

    if is_offq_checkpoint(args.model):
        raise ValueError(f"{args.model}: an offq checkpoint, already quantized; quantize the "
                         "float model it came from (a registered name, HF directory or .gguf)")
    source = args.calib_source or DEFAULT_CALIBRATION
    if args.calib_source is not None and not needs_calibration(cfg):
        log.warning("--calib-source %s ignored: %s with these settings needs no calibration data",
                    args.calib_source, cfg.method)
    with open_checkpoint(args.model) as ckpt:
        if args.eval_windows and args.eval_seqlen > ckpt.config.max_position_embeddings:
            raise UsageError(f"--eval-seqlen {args.eval_seqlen} exceeds the model's context of "
                             f"{ckpt.config.max_position_embeddings} tokens")
        calib = None
        t0 = time.perf_counter()
        if needs_calibration(cfg):
            calib = sample_calibration(ckpt.tokenizer, source, n=cfg.calib_samples,
                                       seqlen=cfg.calib_seqlen, seed=cfg.seed,
                                       add_bos=bool(ckpt.config.add_bos))
        t_calib = time.perf_counter() - t0
        try:
            result = quantize(ckpt, cfg, calib, out_dir=args.out, resume=args.resume,
                              batch_size=args.batch_size,
                              hold_freed_memory=not args.return_freed_memory,
                              progress=None if not args.quiet else False,
                              calibration_source=str(source) if calib is not None else None,
                              calibration_seed=cfg.seed if calib is not None else None)
        except ValueError as e:  # the API's refusals of out_dir, named as this command's flag
            if str(e).startswith("out_dir: "):
                raise ValueError("--out: " + str(e)[len("out_dir: "):]) from None
            raise
    stages = {"calibration data": t_calib, **result.timings}
    print(f"offq quantize: {args.model} -> {args.out}")
    hidden = result.model_config.hidden_size
    print(f"  config: {result.quant_config.describe(hidden)}")
    print(f"  calibration: {source}, {cfg.calib_samples} x {cfg.calib_seqlen} tokens, seed {cfg.seed}"
          if calib is not None else "  calibration: none needed")
    from .kernels import get_num_threads
    print("  time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
          + f"; total {sum(stages.values()):.1f} (threads {get_num_threads()})")
    if result.pre_step_seconds:
        print(f"  of the quantize stage, the pre-steps ({cfg.w_quantizer.rsplit('+', 1)[0]}) "
              f"took {result.pre_step_seconds:.1f} s")
    if args.eval_windows:
        _before_after(args, cfg)
    return 0


def _before_after(args: argparse.Namespace, cfg) -> None:
    """The perplexity table of ``--eval-windows``: FP32 (the source model) vs the checkpoint
    just written, on the real 4-bit kernels, same windows."""
    from .data import load_wikitext2_test
    from .eval import load_model, perplexity

    show = False if args.quiet else None
    rows = []
    stream = None  # tokenized once (the checkpoint carries the source model's tokenizer)
    for label, source in (("FP32", args.model), (f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits}"
                                                 f"KV{cfg.kv_bits}", args.out)):
        model, tok = load_model(source, mode="real")
        if stream is None:
            stream = tok.encode(load_wikitext2_test(), add_bos=False)
        rows.append((label, perplexity(model, tok, stream, seqlen=args.eval_seqlen,
                                       max_windows=args.eval_windows,
                                       quiet=None if show is None else True,
                                       dataset="wikitext2")))
        del model
    fp, q = rows[0][1], rows[1][1]
    print(f"\nperplexity: WikiText-2 test, first {fp['windows']} windows x {fp['seqlen']} "
          f"tokens ({fp['tokens']} predicted), BOS {fp['add_bos']}; quantized model on the real "
          "4-bit kernels")
    print(f"  {'model':<22}{'ppl':>10}{'tokens/s':>10}")
    for label, r in rows:
        print(f"  {label:<22}{r['ppl']:>10.2f}{r['tokens_per_s']:>10.0f}")
    print(f"  {'quantized / FP32':<22}{q['ppl'] / fp['ppl']:>9.3f}x")


# ------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------
def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="perplexity on an eval text (docs/METHODS.md, protocol)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Perplexity over non-overlapping windows of SEQLEN tokens (WikiText-2 test, "
                    "shipped with offq, unless --dataset names a file).",
        epilog="examples:\n"
               "  offq eval smollm2-135m --max-windows 4            # FP32\n"
               "  offq eval runs/smollm2-offq --max-windows 4       # real 4-bit kernels\n"
               "  offq eval runs/smollm2-offq --mode fake --json    # float32 simulation\n"
               "  offq eval runs/smollm2-offq --mode fused --attention int8  # 8-bit attention\n"
               "  offq eval model.gguf --dataset my_text.txt --seqlen 1024")
    # prompts of a perplexity window take the NumPy path under every mode, so the fused
    # decoder would only add its decode-layout weight copy: eval stays on "real"
    _add_common(p, "real")
    p.add_argument("--dataset", default="wikitext2",
                   help="wikitext2 (WikiText-2 raw test set) or a path to a UTF-8 text file")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate the first N windows")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_attention(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import load_dataset, load_model, perplexity

    _check_attention(args)
    _set_threads(args.threads)
    text = load_dataset(args.dataset)
    model, tokenizer = load_model(args.model, mode=args.mode, attention=args.attention)
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
    p = sub.add_parser(
        "generate", help="continue a prompt, or answer a chat message (greedy by default)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continue a prompt token by token with the KV cache (an offq checkpoint "
                    "runs on the real 4-bit kernels, its cache stored in 4 bits; a W4A4KV4 one "
                    "on the fused C decoder unless --mode says otherwise). --chat lays a user "
                    "message out with the model's chat template (instruct models) and prints "
                    "the assistant's reply; --interactive holds a conversation: each line of "
                    "standard input is a user message, each reply is streamed to standard "
                    "output and ends with a line end.",
        epilog="examples:\n"
               "  offq generate runs/smollm2-offq --prompt 'The capital of France is'\n"
               "  offq generate smollm2-135m --prompt 'Once upon a time' --temperature 0.8 "
               "--top-k 40 --seed 1\n"
               "  offq generate runs/smollm2-offq --chat 'What is the capital of France?'\n"
               "  offq generate runs/smollm2-offq --interactive --system 'Answer briefly.'")
    _add_common(p, "auto")  # the fused C decoder for W4A4KV4 checkpoints: ~2x tokens/s
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="text to continue")
    text.add_argument("--chat", metavar="MESSAGE",
                      help="a user message: the model's chat template lays it out and the "
                           "assistant's reply is printed (instruct models)")
    text.add_argument("--interactive", action="store_true",
                      help="a conversation: each line of standard input is a user message, "
                           "answered in turn with the earlier turns as context (the oldest "
                           "dropped when the context is full); Ctrl-C stops a reply and leaves "
                           "that turn out; ends at end of input")
    p.add_argument("--system", metavar="TEXT",
                   help="with --chat or --interactive: a system message first (else the "
                        "template's default)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    _add_attention(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from .eval import load_model
    from .generate import GenerationConfig, generate

    _check_attention(args)
    _set_threads(args.threads)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, seed=args.seed)
    if args.system is not None and args.prompt is not None:
        raise UsageError("--system: only with --chat or --interactive (a plain --prompt has no "
                         "roles)")
    flag = "--chat" if args.chat is not None else "--prompt"
    for name, value in ((flag, args.chat if args.chat is not None else args.prompt),
                        ("--system", args.system)):
        if value is None:  # --interactive (no --prompt), or no --system
            continue
        if not value and name != "--system":
            raise UsageError(f"{name}: empty (give the text to "
                             f"{'answer' if name == '--chat' else 'continue'})")
        try:  # argv's undecodable bytes arrive as lone surrogates, which no tokenizer takes
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{name}: not valid UTF-8 text") from None
    model, tokenizer = load_model(args.model, mode=args.mode, attention=args.attention)
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer found (tokenizer.json) to encode the prompt")
    if args.chat is not None or args.interactive:
        return _chat_reply(args, model, tokenizer, cfg)
    # The prompt is echoed with the first new token, after generate has checked it, so a
    # refused prompt leaves stdout empty (`offq generate ... > out.txt`).
    echoed = [False]

    def show(piece: str) -> None:
        if not echoed[0]:
            sys.stdout.write(args.prompt)
            echoed[0] = True
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        generate(model, tokenizer, args.prompt, cfg, on_token=show)
        show("")  # no new token (--max-new-tokens 0, or EOS first): the prompt alone
    except ValueError as e:
        if str(e).startswith("prompt: "):  # generate's argument is the --prompt flag's text
            raise UsageError(f"--{e}") from e
        raise
    finally:  # the error (on stderr) starts on a line of its own
        if echoed[0]:
            sys.stdout.write("\n")
            sys.stdout.flush()
    return 0


def _chat_reply(args: argparse.Namespace, model, tokenizer, cfg) -> int:
    """``offq generate --chat`` / ``--interactive``: stream the assistant's replies (one
    :class:`offq.generate.Conversation`, whose cache keeps the earlier turns)."""
    from .formats.memory import as_tokenizer
    from .generate import Conversation

    tokenizer = as_tokenizer(tokenizer)
    flag = "--interactive" if args.interactive else "--chat"
    if tokenizer.chat_template is None:
        raise UsageError(f"{flag}: {args.model} has no chat template (a base model; a GGUF "
                         "without tokenizer.chat_template or a directory without chat_template; "
                         "an offq checkpoint written before offq kept templates, 2026-12-07); "
                         "use --prompt to continue text")
    talk = Conversation(model, tokenizer, system=args.system, cfg=cfg)
    wrote = [False]

    def show(piece: str) -> None:
        wrote[0] = True
        sys.stdout.write(piece)
        sys.stdout.flush()

    def answer(message: str) -> None:
        wrote[0] = False
        try:
            talk.say(message, on_token=show)
        finally:  # the reply (or an error on stderr) ends its line
            sys.stdout.write("\n" if wrote[0] or args.interactive else "")
            sys.stdout.flush()
        log.debug("turn: %d prompt tokens already cached, %d prefilled", talk.last_reused,
                  talk.last_prefilled)

    if not args.interactive:
        answer(args.chat)
        return 0
    for line in _input_lines(sys.stdin):
        if not line.strip():
            continue
        try:
            answer(line)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the conversation
            log.warning("reply interrupted: this turn is left out of the conversation (Ctrl-C "
                        "at the prompt, or end of input, ends it)")
    return 0


def _input_lines(stream) -> Iterator[str]:
    """The lines of ``stream`` without their line ends, a prompt on standard error before each
    when it is a terminal; UsageError for text that is not UTF-8."""
    tty = stream.isatty()
    while True:
        if tty:
            sys.stderr.write("> ")
            sys.stderr.flush()
        try:
            line = stream.readline()
            line.encode("utf-8")  # undecodable bytes read as lone surrogates
        except (UnicodeDecodeError, UnicodeEncodeError):
            raise UsageError("--interactive: standard input is not UTF-8 text") from None
        if not line:
            return
        yield line.rstrip("\r\n")


# ------------------------------------------------------------------------------------------------
# inspect
# ------------------------------------------------------------------------------------------------
def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="architecture, sizes, tensor types and activation outlier statistics",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Describe MODEL; for a float model also measure, per layer and input site, "
                    "the activation outliers on a few calibration sequences (max |x|, its "
                    "channel, max/median of the per-channel max, energy along the top-1 "
                    "direction), before and after OffQ's R1 with --r1 or --plot.",
        epilog="examples:\n"
               "  offq inspect smollm2-135m\n"
               "  offq inspect smollm2-135m --layers 0 3 29 --r1 --json\n"
               "  offq inspect smollm2-135m --plot outliers.png --plot-layer 3\n"
               "  offq inspect runs/smollm2-offq            # an offq checkpoint: its config")
    _add_model_and_threads(p)
    p.add_argument("--no-activations", action="store_true",
                   help="only the architecture and tensors (no forward pass)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layers to measure (default: all)")
    p.add_argument("--calib-samples", type=int, default=4, help="calibration sequences (4)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per sequence (512)")
    p.add_argument("--calib-source", default=None,
                   help="calibration corpus (default: offq.data's default corpus) or a file")
    p.add_argument("--r1", action="store_true",
                   help="also measure the residual sites after OffQ's R1 (computed on the same "
                        "sequences: one more float pass)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw per-channel max |x| at --plot-layer's attention input before and "
                        "after R1 (implies --r1; needs matplotlib: pip install 'offq[plot]')")
    p.add_argument("--plot-layer", type=int, default=3, help="layer drawn by --plot (3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .formats.checkpoint import is_offq_checkpoint

    _set_threads(args.threads)
    from .formats.gptq_export import is_gptq_export

    facts = (_inspect_offq_checkpoint(args.model) if is_offq_checkpoint(args.model)
             else _inspect_gptq_export(args.model) if is_gptq_export(args.model) else None)
    if facts is not None and (args.plot or args.r1):
        raise UsageError(f"--plot / --r1 measure a float model's activations; {args.model} is "
                         "quantized (inspect the float model it came from)")
    if facts is not None:  # a quantized model: its stored facts, no activations
        print(json.dumps(facts) if args.json else _format_facts(facts))
        return 0
    from .formats import open_checkpoint

    with open_checkpoint(args.model) as ckpt:
        report: dict = {"model": ckpt.describe()}
        if not args.no_activations:
            report["activations"] = _inspect_activations(ckpt, args)
    if args.json:
        print(json.dumps(report))
        return 0
    print(_format_facts(report["model"]))
    if "activations" in report:
        from .outliers import SiteOutliers, summarize
        act = report["activations"]
        print(f"\nactivation outliers: {act['protocol']}")
        print(summarize([SiteOutliers(**r) for r in act["sites"]]))
        if act.get("plot"):
            print(f"wrote {act['plot']}")
    return 0


def _inspect_activations(ckpt, args: argparse.Namespace) -> dict:
    from .config import QuantConfig
    from .data import DEFAULT_CALIBRATION, sample_calibration
    from .outliers import activation_outliers, offq_r1

    if args.calib_samples < 1 or args.calib_seqlen < 2:
        raise UsageError(f"--calib-samples must be >= 1 and --calib-seqlen >= 2, got "
                         f"{args.calib_samples} and {args.calib_seqlen}")

    if args.plot and args.plot_layer not in (args.layers or [args.plot_layer]):
        raise UsageError(f"--plot-layer {args.plot_layer} is not among --layers {args.layers}")
    n_layers = ckpt.config.num_hidden_layers
    if args.plot and not 0 <= args.plot_layer < n_layers:
        raise UsageError(f"--plot-layer {args.plot_layer}: the model has layers 0..{n_layers - 1}")
    source = args.calib_source or DEFAULT_CALIBRATION
    calib = sample_calibration(ckpt.tokenizer, source, n=args.calib_samples,
                               seqlen=args.calib_seqlen, seed=0,
                               add_bos=bool(ckpt.config.add_bos))
    show = False if args.quiet else None
    r1 = None
    qcfg = QuantConfig(method="offq", calib_samples=args.calib_samples,
                       calib_seqlen=args.calib_seqlen)
    if args.r1 or args.plot:
        r1 = offq_r1(ckpt, calib, qcfg, show=show)
    rows, channels = activation_outliers(ckpt, calib, rotation=r1, layers=args.layers,
                                         keep_channels=args.plot_layer if args.plot else None,
                                         show=show)
    protocol = (f"{ckpt.name}, norm-fused float32, {args.calib_samples} x {args.calib_seqlen} "
                f"tokens of {source} (seed 0)"
                + ("; R1 = OffQ's (top-1 PCA, sorted groups, block Hadamard of "
                   f"{qcfg.activation_group(ckpt.config.hidden_size)}) computed on the same tokens"
                   if r1 is not None else ""))
    out = {"protocol": protocol, "sites": [r.to_dict() for r in rows]}
    if args.plot:
        from .plots import plot_activation_channels
        plot_activation_channels(
            channels["before"], channels.get("after"), args.plot,
            title=f"{ckpt.name}: layer {args.plot_layer} attention input, per-channel max |x|",
            caption=f"Protocol: {protocol}. Left: the input of q/k/v_proj in the norm-fused float "
                    "model; right: the same tokens after x -> x R1 (OffQ's top-1 PCA basis, "
                    "channels sorted into groups, block Hadamard). Shared linear y axis.")
        out["plot"] = str(args.plot)
    return out


def _inspect_offq_checkpoint(path: str) -> dict:
    from .formats.checkpoint import MODEL_FILE, load_safetensors, read_config

    model_config, qcfg, block = read_config(path)
    tensors, _ = load_safetensors(f"{path}/{MODEL_FILE}")
    types: dict[str, int] = {}
    for a in tensors.values():
        types[str(a.dtype)] = types.get(str(a.dtype), 0) + 1
    return {"path": str(path), "format": "offq checkpoint",
            "architecture": model_config.architecture, "layers": model_config.num_hidden_layers,
            "hidden_size": model_config.hidden_size,
            "intermediate_size": model_config.intermediate_size,
            "quantization": qcfg.describe(model_config.hidden_size),
            "rotations": block.get("rotations"), "calibration": block.get("calibration"),
            "tensors": len(tensors), "tensor_dtypes": types,
            "bytes": sum(int(a.nbytes) for a in tensors.values())}


def _inspect_gptq_export(path: str) -> dict:
    """The facts of a GPTQ-layout directory, from its config.json and file sizes (``offq eval``
    reads and checks its tensors)."""
    from .model.config import ModelConfig

    raw = json.loads((Path(path) / "config.json").read_text("utf-8"))
    q = raw["quantization_config"]
    mc = ModelConfig.from_hf({k: v for k, v in raw.items() if k != "quantization_config"})
    return {"path": str(path), "format": f"GPTQ export ({q.get('checkpoint_format', 'gptq')})",
            "architecture": mc.architecture, "layers": mc.num_hidden_layers,
            "hidden_size": mc.hidden_size, "intermediate_size": mc.intermediate_size,
            "quantization": f"weight-only, {q.get('bits')}-bit weights, group "
                            f"{q.get('group_size', -1)}, sym {q.get('sym', True)}, "
                            f"desc_act {q.get('desc_act', False)}",
            "bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))}


def _format_facts(facts: dict) -> str:
    return "\n".join(f"{k:>24}: {v}" for k, v in facts.items())


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------
def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="kernel speed-ups over OpenBLAS and end-to-end tokens/s (FP32 vs W4A4KV4)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure offq's kernels against OpenBLAS/NumPy and a model's prompt "
                    "processing (ppN) and generation (tgN) tokens/s, FP32 vs W4A4KV4 on the real "
                    "4-bit kernels, every figure against a baseline measured in the same run.",
        epilog="examples:\n"
               "  offq bench                                # kernels + smollm2-135m e2e\n"
               "  offq bench --quick --json\n"
               "  offq bench --no-kernels --ckpt runs/smollm2-offq --threads 2\n"
               "  offq bench --no-kernels --llama-bench ./llama-bench --llama-model q4_0.gguf")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="model for the end-to-end figures (default smollm2-135m)")
    p.add_argument("--ckpt", default=None,
                   help="offq checkpoint timed as the W4A4KV4 model (default: QuaRot-style + "
                        "RTN quantized in process; same run-time work as OffQ)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (1 2)")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="the kernel table")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                   help="the end-to-end table")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=None,
                   help="the ppN tests (default: 512 2048; 128 with --quick)")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help="the tgN test (default: 128; 16 with --quick)")
    p.add_argument("--depths", type=int, nargs="*", default=[],
                   help="also time the tgN steps after prompts of these lengths (tests tgN@dD, "
                        "llama-bench's -d)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default: 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="small kernel shapes, pp128 + tg16, 1 repeat (a smoke run; explicit "
                        "--prompt-lengths, --gen-tokens or --repeats still apply)")
    p.add_argument("--llama-bench", default=None, help="a llama-bench binary (llama.cpp column)")
    p.add_argument("--llama-model", default=None, help="the GGUF llama-bench runs (e.g. Q4_0)")
    p.add_argument("--attention", choices=("float", "int8"), default="float",
                   help="the fused decoder's attention: float32 sums (default) or the opt-in "
                        "8-bit one (faster long prompts, its own perplexity: within +-1%% on "
                        "SmolLM2-135M, +0.88%% on Qwen2.5-1.5B)")
    p.add_argument("--weight-only-bits", type=int, nargs="+", default=[4],
                   help="widths of the weight-only engines (RTN g64 asymmetric, packed): any of "
                        "2 3 4 8 (default 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress, warnings only")
    p.set_defaults(func=cmd_bench)


def bench_sizes(args: argparse.Namespace) -> tuple[list[int], int, int]:
    """(prompt lengths, generated tokens, repeats) of ``offq bench``: the flags given, the rest
    from --quick's smoke sizes or the full ones (an explicit --gen-tokens 4 is kept)."""
    quick = bool(args.quick)
    return (args.prompt_lengths if args.prompt_lengths is not None
            else [128] if quick else [512, 2048],
            args.gen_tokens if args.gen_tokens is not None else 16 if quick else 128,
            args.repeats if args.repeats is not None else 1 if quick else 3)


#: E2EConfig's field names as the bench flags that set them, for its messages
_BENCH_FLAGS = {"prompt_lengths": "--prompt-lengths", "gen_tokens": "--gen-tokens",
                "depths": "--depths", "repeats": "--repeats", "fused_attention": "--attention",
                "llama_bench": "--llama-bench", "llama_model": "--llama-model",
                "weight_only_bits": "--weight-only-bits"}


def _as_bench_flags(message: str) -> str:
    """An E2EConfig message with its field names replaced by the flags the user typed; a name
    inside a path or file name (``/opt/llama_bench/bin``, ``llama_model.gguf``) is left alone."""
    names = "|".join(_BENCH_FLAGS)
    return re.sub(rf"(?<![\w/.-])({names})(?![\w/.-])", lambda m: _BENCH_FLAGS[m[1]], message)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import E2EConfig, describe_machine, format_e2e, format_rows, machine_info
    from .bench.e2e import check_context
    from .bench import run_e2e, run_kernels

    if any(t < 1 for t in args.threads):
        raise UsageError(f"--threads: expected positive integers, got {args.threads}")
    from .kernels import threads

    for t in args.threads:  # each count checked as --threads before anything is timed; the
        try:                # context manager restores offq's and the BLAS settings after
            with threads(t):
                pass
        except ValueError as e:
            raise UsageError(f"--threads {t}: {e}") from e
    if not (args.kernels or args.e2e):
        raise UsageError("--no-kernels and --no-e2e leave nothing to measure")
    args.prompt_lengths, args.gen_tokens, args.repeats = bench_sizes(args)
    show = False if args.quiet or args.json else None
    cfg = None
    if args.e2e:  # checked before the kernel table runs, not after it
        try:
            cfg = E2EConfig(model=args.model, ckpt=args.ckpt, threads=tuple(args.threads),
                            prompt_lengths=tuple(args.prompt_lengths),
                            gen_tokens=args.gen_tokens, depths=tuple(args.depths),
                            repeats=args.repeats, fused_attention=args.attention,
                            llama_bench=args.llama_bench, llama_model=args.llama_model,
                            weight_only_bits=tuple(args.weight_only_bits))
            check_context(cfg)
        except ValueError as e:
            raise UsageError(_as_bench_flags(str(e))) from e
    report: dict = {"machine": machine_info()}
    if not args.json:
        print(f"# offq bench: {describe_machine(report['machine'])}")
    if args.kernels:
        report["kernels"] = run_kernels(args.threads, quick=args.quick, show=show)
        if not args.json:
            print("\nkernels (ratio = baseline time / offq time in the same run; > 1: offq "
                  "faster)\n" + format_rows(report["kernels"]))
    if cfg is not None:
        report["e2e"] = run_e2e(cfg, show=show)
        if not args.json:
            proto = report["e2e"]["protocol"]
            print(f"\nend to end: {proto['model']} FP32 vs {proto['quantized']}, real kernels, "
                  f"fused attention {proto['fused_attention']}; "
                  f"ppN = N prompt tokens (logits of the last), tgN = N single-token steps; "
                  f"best of {proto['repeats']}\n" + format_e2e(report["e2e"]))
    if args.json:
        print(json.dumps(report))
    return 0


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a weight-only offq checkpoint in another format",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export DIR (an offq checkpoint) as --format into --out (gptq: the layout "
                    "HF-side GPTQ loaders read; offq/formats/gptq_export.py). Only what the "
                    "format can express: weight-only, no online rotation.",
        epilog="examples:\n"
               "  offq quantize smollm2-135m --method gptq --a-bits 16 --kv-bits 16 "
               "--w-group-size 64 --out runs/w4g64\n"
               "  offq export runs/w4g64 --format gptq --out runs/w4g64-gptq\n"
               "  offq export runs/w4g64 --format gptq --checkpoint-format gptq_v2 --out OUT\n"
               "  offq eval runs/w4g64-gptq --max-windows 4")
    p.add_argument("model", help="offq checkpoint directory")
    p.add_argument("--format", choices=("gptq",), required=True, help="output format")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq",
                   help="gptq: stored zero = zero-point - 1 (every GPTQ loader); gptq_v2: the "
                        "zero-point itself (GPTQModel)")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .formats.files import check_creatable
    from .formats.gptq_export import export_gptq

    check_creatable(args.out, "--out")  # export_gptq checks it too, as out_dir; here as the flag
    out = export_gptq(args.model, args.out, checkpoint_format=args.checkpoint_format)
    print(f"wrote {out} (format {args.format}, checkpoint_format {args.checkpoint_format})")
    return 0


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
SUBCOMMANDS = [add_quantize_parser, add_eval_parser, add_generate_parser, add_inspect_parser,
               add_bench_parser, add_export_parser]


class _OneLineErrors(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``offq COMMAND: error: ...`` (exit status 2), as
    offq's own errors are, instead of the usage block; ``--help`` still prints the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog="offq", description="W4A4KV4 quantization of open LLMs with real 4-bit CPU kernels")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _report(args: argparse.Namespace, error: BaseException) -> None:
    """The one-line error on stderr; with -v, the traceback first (where it came from)."""
    if args.verbose:
        traceback.print_exception(error, file=sys.stderr)
    print(f"offq {args.command}: error: {error}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``offq`` command; returns the process exit status."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as e:  # --help (0), or a usage error already printed on one line (2)
        return e.code if isinstance(e.code, int) else 2
    if unknown:  # named by the command they were given to, not always the top-level parser
        given = list(sys.argv[1:] if argv is None else argv)
        before = given.index(args.command) if args.command in given else len(given)
        prog = "offq" if any(a in given[:before] for a in unknown) else f"offq {args.command}"
        print(f"{prog}: error: unrecognized arguments: {' '.join(unknown)} (see {prog} --help)",
              file=sys.stderr)
        return 2
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.DEBUG if args.verbose else
                        (logging.WARNING if quiet else logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, TypeError) as e:  # the user's input (UsageError too)
        _report(args, e)
        return 2
    except OSError as e:
        _report(args, e)
        return 1
    except KeyboardInterrupt:
        hint = ""
        if args.command == "quantize":  # the one command whose finished work can be resumed
            from .formats.checkpoint import PARTIAL_DIR

            partial = Path(args.out) / PARTIAL_DIR
            if partial.is_dir():
                hint = (f"; the finished layers are kept in {partial}: the same command with "
                        "--resume continues from them")
        print(f"offq {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
