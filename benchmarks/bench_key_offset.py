"""Why offq centres keys before the 4-bit K cache (docs/METHODS.md, "KV cache", key offset).

On the float model with R3 on Q/K, quantize only K, only V, or K after subtracting each head's
mean key, and measure WikiText-2 perplexity; also print each layer's largest |mean key| (the
common part a per-token 4-bit group would have to cover) and the per-token spread.

Protocol (printed): WikiText-2 test shipped with offq, first ``--windows`` windows of
``--seqlen`` tokens; KV quantizer 4-bit asymmetric per token and head (group = head_dim); the
mean key here is taken over the evaluated window itself (a diagnosis; the recipe takes it from
the calibration pass).

    python benchmarks/bench_key_offset.py --model qwen2.5-coder-1.5b     # ~1.5 min, 2 threads
    python benchmarks/bench_key_offset.py                                 # SmolLM2-135M
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

VARIANTS = {  # name -> (quantize K, quantize V, centre K)
    "fp": (False, False, False),
    "k4": (True, False, False),
    "v4": (False, True, False),
    "k4-centred": (True, False, True),
    "kv4-centred": (True, True, True),
}


def main() -> int:
    import offq
    from offq.bench.machine import describe_machine
    from offq.data import load_wikitext2_test
    from offq.eval import perplexity
    from offq.kernels import dequantize, quantize, set_num_threads
    from offq.model.decoder import Model
    from offq.model.kv_cache import FakeQuantKVCodec
    from offq.quant.online import HadamardQK

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    set_num_threads(args.threads)
    text = load_wikitext2_test()
    ckpt = offq.load(args.model)
    hd = ckpt.config.head_dim
    print(f"# {ckpt.name}: R3 on, KV 4-bit asym per token and head; WikiText-2 test "
          f"{args.windows} x {args.seqlen}; {describe_machine()}, {args.threads} threads")

    def rt(x: np.ndarray) -> np.ndarray:
        return dequantize(quantize(np.ascontiguousarray(x, np.float32), bits=4, group_size=hd,
                                   symmetric=False))

    stats: dict[int, tuple[float, float]] = {}
    for name in args.variants.split(","):
        qk, qv, centre = VARIANTS[name]

        def hook(layer, qk=qk, qv=qv, centre=centre):
            layer.qk_transform = HadamardQK(hd)
            i = layer.index

            def fn(x: np.ndarray, kind: str) -> np.ndarray:
                if kind == "k":
                    mu = x.mean(axis=2, keepdims=True)
                    stats.setdefault(i, (float(np.abs(mu).max()), float(x.std(axis=2).mean())))
                    if qk:
                        return rt(x - mu) if centre else rt(x)
                return rt(x) if (kind == "v" and qv) else x
            layer.kv_codec = FakeQuantKVCodec(fn)
            return layer

        model = Model.from_checkpoint(ckpt, layer_hook=hook)
        t = time.perf_counter()
        r = perplexity(model, ckpt.tokenizer, text, seqlen=args.seqlen, max_windows=args.windows,
                       quiet=True)
        print(f"{name:12s} ppl {r['ppl']:10.3f}   ({time.perf_counter() - t:.0f} s)", flush=True)
    print("\nlayer  max|mean key|  mean per-token std (after RoPE + R3)")
    for i, (m, s) in sorted(stats.items()):
        print(f"{i:5d}  {m:13.1f}  {s:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
