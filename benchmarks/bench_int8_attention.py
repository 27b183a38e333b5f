"""The opt-in 8-bit attention of the fused W4A4KV4 decoder (``FusedDecoder(attention="int8")``,
``csrc/attention_i8.c``): its perplexity effect and its prefill speed, against the default float
attention and offq's FP32, all in one run.

Perplexity: every window runs through the C step as one prompt (``prefill="c"``), once with each
attention, on the same windows; the float column is the fused decoder's default numbers (equal to
the NumPy real path's up to float32 rounding). Speed: ppN tokens/s of the C prefill (the hidden
states of an N-token WikiText-2 prompt and the last position's logits, as ``bench_e2e.py``'s
ppN), float and int8 attention and the FP32 model alternating, best of ``--repeats`` each.

Protocol (printed): an offq W4A4KV4 checkpoint, WikiText-2 test shipped with offq, the first
``--windows`` windows of ``--seqlen`` tokens (BOS as the model's config says).

    offq quantize smollm2-135m --method offq --lm-head-bits 8 --calib-samples 8 \\
        --calib-seqlen 512 --out runs/offq8
    python benchmarks/bench_int8_attention.py --ckpt runs/offq8            # ~9 min
    python benchmarks/bench_int8_attention.py --model qwen2.5-coder-1.5b --ckpt runs/qwen \\
        --windows 12 --prompt-lengths                          # perplexity only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()


def main() -> int:
    from offq.bench.machine import describe_machine
    from offq.data import eval_windows, load_wikitext2_test
    from offq.eval import perplexity
    from offq.formats import open_checkpoint
    from offq.kernels import set_num_threads
    from offq.model import Model
    from offq.quant.assemble import load_quantized

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="an offq W4A4KV4 checkpoint")
    ap.add_argument("--model", default="smollm2-135m",
                    help="the float model it was quantized from (the FP32 column)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=32,
                    help="perplexity windows (a 4-bit model's 8-window perplexity moves by ~0.4%% "
                         "with float32-level changes of the attention)")
    ap.add_argument("--prompt-lengths", type=int, nargs="*", default=[512, 2048],
                    help="ppN tests (none: perplexity only, the FP32 model is not loaded)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-ppl", action="store_true", help="speed only")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    model, tok, qcfg = load_quantized(args.ckpt, mode="fused")
    runner = model.fused_runner
    runner.prefill = "c"
    if args.prompt_lengths:
        with open_checkpoint(args.model) as ckpt:
            fp = Model.from_checkpoint(ckpt, resident=True)
            fp.layers  # read every layer now: the checkpoint closes below
    machine = describe_machine()
    print(f"# {qcfg.describe(model.config.hidden_size)} ({args.ckpt}); {machine}", flush=True)
    out: dict = {"protocol": {"ckpt": str(args.ckpt), "method": qcfg.describe(
        model.config.hidden_size), "machine": machine, "seqlen": args.seqlen,
        "windows": args.windows, "dataset": "wikitext2 test", "prefill": "c"},
        "perplexity": {}, "speed": []}

    if not args.skip_ppl:
        set_num_threads(max(args.threads))
        text = load_wikitext2_test()
        for attention in ("float", "int8"):
            runner.attention = attention
            r = perplexity(model, tok, text, seqlen=args.seqlen, max_windows=args.windows,
                           quiet=True)
            out["perplexity"][attention] = r["ppl"]
            print(f"perplexity, {attention} attention: {r['ppl']:.4f} ({r['windows']} windows "
                  f"x {args.seqlen}, {r['seconds']:.0f} s)", flush=True)
        f, i = out["perplexity"]["float"], out["perplexity"]["int8"]
        print(f"int8 / float: {i / f:.4f}x ({100 * (i / f - 1):+.2f}%)", flush=True)

    def timed(m, ids) -> float:
        cache = m.new_cache()
        t = time.perf_counter()
        h = m.hidden_states(ids[None], cache=cache)
        m.logits(h[:, -1:])
        return time.perf_counter() - t

    if args.prompt_lengths:
        print(f"{'prompt':>7s} {'threads':>7s} {'FP32':>8s} {'float':>8s} {'int8':>8s} "
              f"{'int8/float':>10s} {'float/FP32':>10s} {'int8/FP32':>10s}   tokens/s, best "
              f"of {args.repeats}", flush=True)
    for n in args.prompt_lengths:
        ids = eval_windows(tok, load_wikitext2_test(), n, 1, bool(model.config.add_bos))[0]
        for th in args.threads:
            set_num_threads(th)
            best = {"fp32": np.inf, "float": np.inf, "int8": np.inf}
            for rep in range(args.repeats + 1):  # the first round warms up
                for name in best:
                    if name == "fp32":
                        s = timed(fp, ids)
                    else:
                        runner.attention = name
                        s = timed(model, ids)
                    if rep:
                        best[name] = min(best[name], s)
            tps = {k: n / v for k, v in best.items()}
            out["speed"].append({"prompt": n, "threads": th, "tokens_per_s": tps})
            print(f"{n:7d} {th:7d} {tps['fp32']:8.1f} {tps['float']:8.1f} {tps['int8']:8.1f} "
                  f"{tps['int8'] / tps['float']:10.2f} {tps['float'] / tps['fp32']:10.2f} "
                  f"{tps['int8'] / tps['fp32']:10.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
