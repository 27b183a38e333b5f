"""A workload for a sampling profiler: the fused C prefill of a W4A4KV4 checkpoint, repeated.

Loads the checkpoint on the fused decoder (``mode="fused"``, prompt through the C step), takes the
first ``--tokens`` tokens of WikiText-2 test as the prompt, and runs ``--repeats`` prefills into a
fresh cache (logits of the last position only, as ``bench_e2e.py``'s ppN), printing the best and
median tokens/s. Run it under ``perf`` to see where a prefill's time goes, skipping the loading:

    perf record -D 4000 -e cpu-clock -F 1999 -o prefill.perf \\
        python benchmarks/profile_prefill.py --ckpt runs/smollm2-offq --repeats 20
    perf report -i prefill.perf --sort symbol

(``-D`` delays sampling by milliseconds; ``cpu-clock`` works in VMs without hardware counters.)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()


def main() -> int:
    from offq.bench.machine import describe_machine
    from offq.data import eval_windows, load_wikitext2_test
    from offq.kernels import set_num_threads
    from offq.quant.assemble import load_quantized

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, required=True, help="an offq W4A4KV4 checkpoint")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", choices=("float", "int8"), default="float",
                   help="the C step's attention (int8: the opt-in 8-bit one)")
    p.add_argument("--prefill", choices=("c", "numpy"), default="c",
                   help="the prompt's path: the C step (default) or the NumPy real path, the "
                        "two that prefill='auto' chooses between")
    args = p.parse_args()
    set_num_threads(args.threads)
    model, tokenizer, cfg = load_quantized(args.ckpt, mode="fused")
    model.fused_runner.prefill = args.prefill
    model.fused_runner.attention = args.attention
    ids = eval_windows(tokenizer, load_wikitext2_test(), args.tokens, 1,
                       bool(model.config.add_bos))[0]

    def prefill() -> float:
        cache = model.new_cache()
        t = time.perf_counter()
        h = model.hidden_states(ids[None], cache=cache)
        model.logits(h[:, -1:])
        return time.perf_counter() - t

    prefill()  # warm-up
    seconds = [prefill() for _ in range(args.repeats)]
    print(f"# {describe_machine()}; threads {args.threads}; prefill {args.prefill}; attention "
          f"{args.attention}; {args.ckpt}: "
          f"{cfg.describe(model.config.hidden_size)}")
    print(f"pp{args.tokens}: best {args.tokens / min(seconds):.1f}, median "
          f"{args.tokens / float(np.median(seconds)):.1f} tokens/s over {args.repeats} prefills")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
