"""The one-token W4A4 product as the fused decoder runs it, with its weights streamed from DRAM:
the decode layout (``pack_w4_decode``, what every decode step reads) against the row-major
layout, timed interleaved in the same process.

Protocol: A [1, K] and W [N, K] are N(0, 1) float32 (seed 0); W 4-bit symmetric per channel, A
4-bit asymmetric in groups of 128 (the OffQ runtime setting). Enough copies of W to fill
``--stream-mb`` are cycled through, so each call reads its weights from DRAM as a model's decode
step does, not from L3. ``timing.timeit_interleaved`` alternates the two layouts run by run (best
of 5 runs of >= 0.2 s each). Printed per shape and thread count: microseconds per product, GB/s of
packed weights, and decode / row-major, a ratio the VM's drift mostly cancels from (it is how
benchmarks/results_speed.md compares builds of the decode-layout kernel: run this once per
build, alternated).

    python benchmarks/bench_gemv_streamed.py                       # 16384 x 4096, 17920 x 1536
    python benchmarks/bench_gemv_streamed.py --shapes 4096x4096 --threads 2
"""
from __future__ import annotations

import argparse

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()


def main() -> int:
    from offq.bench.machine import describe_machine
    from offq.bench.timing import timeit_interleaved
    from offq.kernels import set_num_threads
    from offq.kernels.quant import matmul_w4a4, pack_w4_decode, quantize

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["16384x4096", "17920x1536"],
                    help="N x K (output columns x inputs); 17920 x 1536 is Qwen2.5-1.5B's gate/up")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--stream-mb", type=int, default=160)
    args = ap.parse_args()
    print(f"# W4A4 one-token product streamed from DRAM, decode vs row-major layout; "
          f"{describe_machine()}", flush=True)
    print("| N x K | threads | row-major us | decode us | decode GB/s | decode / row-major |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        a = rng.standard_normal((1, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        qa = quantize(a, bits=4, group_size=128)
        copies = max(1, (args.stream_mb << 20) // (n * k // 2))
        qws = [quantize(w, bits=4, group_size=-1, symmetric=True) for _ in range(copies)]
        decs = [pack_w4_decode(q) for q in qws]

        def row_major() -> None:
            for q in qws:
                matmul_w4a4(qa, q)

        def decode() -> None:
            for q, d in zip(qws, decs):
                matmul_w4a4(qa, q, w_decode=d)

        for th in args.threads:
            set_num_threads(th)
            t = timeit_interleaved({"row": row_major, "dec": decode}, quick=False)
            row_us, dec_us = t["row"] / copies * 1e6, t["dec"] / copies * 1e6
            print(f"| {n} x {k} | {th} | {row_us:.0f} | {dec_us:.0f} | "
                  f"{n * k / 2 / dec_us / 1e3:.1f} | {dec_us / row_us:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
