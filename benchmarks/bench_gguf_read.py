"""What reading a GGUF checkpoint's tensors costs: offq's C dequantizer against the gguf package's
NumPy one, on the model's own tensors, same run (issue 10: the statistics pass, the layer loop
and the final write each read the checkpoint; so does every evaluation).

For each tensor group (the embeddings, the LM head, the seven linears of one decoder layer) the
store's read (`ckpt.tensors[name]`: dequantized, q/k rows un-permuted, float32) is timed with the
C path on and with it off (the gguf package's dequantizers, a block of rows at a time, as before
2026-12-01). The arrays are checked equal bit for bit. Each read is timed twice, the better kept,
after one untimed read; the machine line gives the load at the start.

    python benchmarks/bench_gguf_read.py                              # SmolLM2-135M (Q4_1 file)
    python benchmarks/bench_gguf_read.py --model qwen2.5-coder-1.5b   # Q4_K_M (Q4_K, Q6_K)
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()


def best_of(fn, repeats: int = 2) -> tuple[float, np.ndarray]:
    out, best = None, float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    import offq
    import offq.kernels.gguf as kgguf
    from offq.bench.machine import describe_machine
    from offq.kernels import set_num_threads
    from offq.model.arch import architecture_of

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_num_threads(args.threads)
    ckpt = offq.load(args.model)
    arch = architecture_of(ckpt.config)
    store = ckpt.tensors
    groups = {"embeddings": [arch.embed[0]],
              "LM head": [n for n in arch.lm_head if n in store] or [arch.embed[0]],
              f"layer {args.layer} linears": [arch.weight(args.layer, n)
                                               for n in arch.linear_names]}
    print(f"# {args.model}: reading tensors, C dequantizer vs the gguf package; "
          f"{describe_machine()}, {args.threads} threads", flush=True)
    print("| tensors | MB (float32) | C | gguf package | speed-up |")
    print("|---|---|---|---|---|")
    c_types = kgguf.GGUF_TYPES
    for label, names in groups.items():
        def read_all() -> list[np.ndarray]:
            return [store[n] for n in names]

        kgguf.GGUF_TYPES = c_types
        read_all()
        t_c, fast = best_of(read_all)
        kgguf.GGUF_TYPES = frozenset()
        t_py, slow = best_of(read_all)
        kgguf.GGUF_TYPES = c_types
        for n, a, b in zip(names, fast, slow):
            if not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
                raise SystemExit(f"{n}: the C and gguf-package values differ")
        mb = sum(a.nbytes for a in fast) / 1e6
        print(f"| {label} | {mb:.0f} | {t_c:.3f} s | {t_py:.3f} s | {t_py / t_c:.1f}x |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
