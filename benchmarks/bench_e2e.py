"""End-to-end tokens/s: prompt processing (ppN) and generation (tgN), FP32 vs W4A4KV4, and
llama.cpp when a llama-bench binary is given (benchmarks/README.md says how to build one).

The same code as `offq bench --no-kernels` (offq/bench/e2e.py, whose docstring states the
protocol); this script adds the JSON record and the chart.

    python benchmarks/bench_e2e.py                                   # smollm2-135m, 1 and 2 threads
    python benchmarks/bench_e2e.py --ckpt runs/smollm2-offq          # time an offq checkpoint
    python benchmarks/bench_e2e.py --llama-bench ~/llama.cpp/build/bin/llama-bench \
        --llama-model /tmp/smollm2-q4_0.gguf
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

from offq.bench import E2EConfig, describe_machine, format_e2e, run_e2e  # noqa: E402
from offq.formats.files import atomic_write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ckpt", default=None, help="offq checkpoint timed as the W4A4KV4 model")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--depths", type=int, nargs="*", default=[],
                    help="also time the tgN steps after prompts of these lengths (tests tgN@dD)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("--llama-model", default=None)
    ap.add_argument("--fused-kernel", default="auto", choices=("auto", "generic", "avx2", "vnni"),
                    help="product variant of the fused C decoder; the other kernels follow the "
                         "dispatch (OFFQ_SIMD_MAX=avx2 in the environment caps everything at "
                         "what AVX2-only CPUs run)")
    ap.add_argument("--fused-prefill", default="auto", choices=("auto", "c", "numpy"),
                    help="prompts of the fused engine: the C step, the NumPy real path, or auto "
                         "(default: C below 1024 tokens and NumPy from there with the AVX2 "
                         "attention, C for every prompt with the AVX-512 one)")
    ap.add_argument("--fused-attention", default="float", choices=("float", "int8"),
                    help="the fused C step's attention: float32 sums (default) or the opt-in "
                         "8-bit one (8-bit queries and softmax weights, integer dot products; "
                         "its perplexity: benchmarks/bench_int8_attention.py)")
    ap.add_argument("--no-weight-only", dest="weight_only", action="store_false",
                    help="skip the weight-only W4 (RTN g64 asym, packed) engines")
    ap.add_argument("--weight-only-bits", type=int, nargs="+", default=[4],
                    help="the weight-only engines' widths (2, 3, 4, 8; default 4)")
    ap.add_argument("--out", default=str(HERE / "results" / "e2e.json"))
    ap.add_argument("--plot", default=None, help="also draw the table to this PNG")
    args = ap.parse_args()

    cfg = E2EConfig(model=args.model, ckpt=args.ckpt, threads=tuple(args.threads),
                    prompt_lengths=tuple(args.prompt_lengths), gen_tokens=args.gen_tokens,
                    depths=tuple(args.depths), repeats=args.repeats, llama_bench=args.llama_bench,
                    llama_model=args.llama_model, fused_kernel=args.fused_kernel,
                    fused_prefill=args.fused_prefill, fused_attention=args.fused_attention,
                    weight_only=args.weight_only,
                    weight_only_bits=tuple(args.weight_only_bits))
    print(f"# offq e2e: {describe_machine()}")
    result = run_e2e(cfg)
    proto = result["protocol"]
    print(f"{proto['model']}: FP32 vs {proto['quantized']}, real kernels, fused decoder kernel "
          f"{proto['fused_kernel']}, fused prefill {proto['fused_prefill']}, fused attention "
          f"{proto['fused_attention']}, best of {proto['repeats']}" + (f"; llama.cpp on {proto['llama_model']}"
                                   if proto["llama_model"] else ""))
    print(format_e2e(result))
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    if args.plot:
        from offq.plots import plot_e2e
        plot_e2e(result, args.plot, caption=f"Protocol: {proto['model']}, FP32 vs "
                 f"{proto['quantized']}; ppN = N prompt tokens, logits of the last; tgN = N "
                 f"single-token steps; best of {proto['repeats']}. "
                 f"Machine: {describe_machine(proto['machine'])}.")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
