"""How close offq's AVX2 W4A4 product runs to what AVX2 allows, and what that allows against
OpenBLAS sgemm: the ceiling behind issue 9's "prefill >= 3x offq's FP32" on AVX2-only CPUs.

An exact 4-bit x 4-bit dot product on AVX2 without VNNI costs a vpmaddubsw (32 products summed in
pairs) and a vpaddw (the 16-bit accumulate) per 32 byte pairs. ``isa_peak.c`` runs only those two
instructions on independent accumulators; its rate, in multiply-adds per second, bounds any
kernel made of them. The script compiles it (gcc, ``-O2 -mavx2``), runs it, and times in the same
process, one thread each, best of ``--repeats`` interleaved runs (offq.bench.timing):
- OpenBLAS sgemm (``numpy.matmul``) at M = 512 on the shapes below;
- ``matmul_w4a4(kernel="avx2")`` on the same shapes (activations grouped by 64 at K = 576,
  SmolLM2's width, else 128; weights per channel, symmetric).
Ratios: the ceiling over sgemm (what no AVX2 product can exceed), the kernel over sgemm, the kernel
over the ceiling.

    python benchmarks/bench_isa_peak.py [--repeats 5] [--out results.json]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

from offq.formats.files import atomic_write_json  # noqa: E402

#: (M, K, N, activation group): SmolLM2-135M's q/k/v and gate/up, its down_proj, a 4096 square
SHAPES = [(512, 576, 960, 64), (512, 576, 3072, 64), (512, 1536, 576, 128),
          (512, 4096, 4096, 128)]


def avx2_ceiling(repeats: int) -> float:
    """Multiply-adds per second of isa_peak.c's vpmaddubsw + vpaddw loop (best of repeats)."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("bench_isa_peak: no C compiler (set CC)")
    src = Path(__file__).with_name("isa_peak.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "isa_peak"
        subprocess.run([cc, "-O2", "-mavx2", str(src), "-o", str(exe)], check=True)
        return max(float(subprocess.run([str(exe)], check=True, capture_output=True,
                                        text=True).stdout.split()[0]) for _ in range(repeats))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()

    from offq import _C
    from offq.bench import describe_machine
    from offq.bench.timing import timeit_interleaved
    from offq.kernels import threads
    from offq.kernels.quant import matmul_w4a4, quantize

    if not _C.simd_info()["avx2"]:
        raise SystemExit("bench_isa_peak: this CPU has no AVX2")
    ceiling = avx2_ceiling(args.repeats)
    rng = np.random.default_rng(0)
    rows = []
    with threads(1):
        print(f"AVX2 vpmaddubsw+vpaddw ceiling and matmul_w4a4 (kernel avx2) against OpenBLAS "
              f"sgemm, 1 thread, best of {args.repeats}: {describe_machine()}")
        print(f"ceiling: {ceiling / 1e9:.1f} G multiply-adds/s")
        print(f"{'M x K x N (a group)':>24} {'sgemm GMAC/s':>13} {'w4a4 GMAC/s':>12} "
              f"{'ceiling/sgemm':>14} {'w4a4/sgemm':>11} {'w4a4/ceiling':>13}")
        for m, k, n, g in SHAPES:
            a = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((n, k), dtype=np.float32)
            qa, qw = quantize(a, bits=4, group_size=g), quantize(w, bits=4, group_size=-1,
                                                                 symmetric=True)
            out, ref = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
            wt = np.ascontiguousarray(w.T)
            t = timeit_interleaved({"w4a4": lambda: matmul_w4a4(qa, qw, out=out, kernel="avx2"),
                                    "sgemm": lambda: np.matmul(a, wt, out=ref)}, quick=False)
            macs = m * k * n
            row = dict(shape=[m, k, n], a_group=g, sgemm_gmacs=macs / t["sgemm"] / 1e9,
                       w4a4_gmacs=macs / t["w4a4"] / 1e9)
            row.update(ceiling_over_sgemm=ceiling / 1e9 / row["sgemm_gmacs"],
                       w4a4_over_sgemm=t["sgemm"] / t["w4a4"],
                       w4a4_over_ceiling=row["w4a4_gmacs"] / (ceiling / 1e9))
            rows.append(row)
            print(f"{f'{m} x {k} x {n} (g{g})':>24} {row['sgemm_gmacs']:13.1f} "
                  f"{row['w4a4_gmacs']:12.1f} {row['ceiling_over_sgemm']:14.2f} "
                  f"{row['w4a4_over_sgemm']:11.2f} {row['w4a4_over_ceiling']:13.2f}")
    if args.out is not None:
        atomic_write_json(args.out, {"machine": describe_machine(), "ceiling_macs": ceiling,
                                     "repeats": args.repeats, "rows": rows})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
