"""Kernel benchmarks: every figure as a ratio against OpenBLAS/NumPy measured in the same run.

Runs offq.bench's kernel modules (fwht, cov, matmul, matmul_wq, matmul_i8; `offq bench --no-e2e` runs the same code)
at 1 and 2 threads (one setting for offq's OpenMP, its OpenBLAS and NumPy's BLAS), prints a table
and writes JSON; `--plot PNG` draws the speed-ups (matplotlib, the `plot` extra).

    python benchmarks/bench_kernels.py [--quick] [--threads 1 2] [--only fwht cov] [--out PATH]

Rows: seconds (per call; per row for fwht), GFLOP/s and GB/s as each module defines them (see its
docstring in offq/bench/), and `speedup_vs`: baseline seconds / offq seconds (> 1: offq faster).
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

from offq.bench import KERNEL_BENCHMARKS, describe_machine, machine_info, run_kernels  # noqa: E402
from offq.bench.kernels import HEADER, format_row  # noqa: E402
from offq.formats.files import atomic_write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and short timings (smoke run)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--only", nargs="+", choices=KERNEL_BENCHMARKS, help="run only these modules")
    ap.add_argument("--out", default=str(HERE / "results" / "kernels.json"))
    ap.add_argument("--plot", default=None, help="also draw the speed-ups to this PNG")
    args = ap.parse_args()

    print(f"# offq kernels vs OpenBLAS/NumPy: {describe_machine()}; quick={args.quick}")
    print(HEADER)
    print("-" * len(HEADER))
    rows = run_kernels(args.threads, quick=args.quick, only=args.only,
                       on_row=lambda r: print(format_row(r), flush=True), show=False)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "quick": args.quick,
        "protocol": "best of repeated timed loops per case (offq/bench/timing.py); baselines in "
                    "the same process, same arrays, same thread setting",
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
    print(f"wrote {out}")
    if args.plot:
        from offq.plots import plot_kernel_speedups
        top = max(args.threads)
        shown = [r for r in rows if r["threads"] == top and "+quantA" not in r["case"]]
        plot_kernel_speedups(
            shown, args.plot,
            caption=f"Protocol: {top} thread(s); best of 5 timed loops of >= 0.2 s per case "
                    "(quick: 3 x 0.02 s), baseline timed in the same process on the same arrays "
                    "with the same threads; fwht per row, float32; cov_update acc += X^T X; "
                    "matmul_w4a4: A 4-bit asymmetric g128 pre-quantized, W 4-bit symmetric per "
                    "channel, [kernel] = SIMD variant; matmul_wq: float32 x, W 2/3/4/8-bit "
                    "asymmetric g128 packed. Machine: "
                    f"{describe_machine(doc['machine'])}. All rows: {out}.")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
