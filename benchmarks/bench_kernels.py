"""Kernel benchmarks: every figure as a ratio against OpenBLAS/NumPy measured in the same run.

Runs each module in benchmarks/kernels/ (fwht, cov, matmul when present; each exposes
`run(threads: int, quick: bool) -> list[dict]`) at 1 and 2 threads (one setting for offq's
OpenMP, its OpenBLAS and NumPy's BLAS, via offq.kernels.threads), prints a table and writes JSON.

    python benchmarks/bench_kernels.py [--quick] [--threads 1 2] [--only fwht cov] [--out PATH]

Rows: seconds (per call; per row for fwht), GFLOP/s and GB/s as each module defines them (see its
docstring), and `speedup_vs`: baseline seconds / offq seconds (> 1 means offq is faster).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # `kernels.<name>` below is benchmarks/kernels/<name>.py

import numpy as np  # noqa: E402

import offq  # noqa: E402
from offq import _C  # noqa: E402
from offq.kernels import threads as thread_limit  # noqa: E402

MODULES = ["fwht", "cov", "matmul"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_row(r: dict) -> str:
    ratios = ", ".join(f"{k} {v:.2f}x" if v is not None else f"{k} n/a"
                       for k, v in r["speedup_vs"].items())
    sec = r["seconds"]
    t = f"{sec * 1e6:10.2f} us" if sec < 1e-2 else f"{sec * 1e3:10.2f} ms"
    return (f"{r['bench']:<11} {r['case']:<40} {r['threads']:>2} {t} {r['gflops']:8.2f} "
            f"{r['gbps']:8.2f}  {ratios}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and short timings (smoke run)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--only", nargs="+", choices=MODULES, help="run only these modules")
    ap.add_argument("--out", default=str(HERE / "results" / "kernels.json"))
    args = ap.parse_args()

    names = args.only or MODULES
    modules = {}
    for name in names:
        try:
            modules[name] = importlib.import_module(f"kernels.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kernels.{name}":
                raise
            print(f"[skip] benchmarks/kernels/{name}.py not present", file=sys.stderr)

    header = (f"{'bench':<11} {'case':<40} {'th':>2} {'time':>13} {'GFLOP/s':>8} {'GB/s':>8}  "
              "speedup (baseline time / offq time)")
    print(f"# offq {offq.__version__} kernels, {cpu_model()}, simd {_C.simd_info()}, "
          f"numpy {np.__version__}, quick={args.quick}")
    print(header)
    print("-" * len(header))
    results = []
    for t in args.threads:
        with thread_limit(t):
            for name, mod in modules.items():
                for r in mod.run(threads=t, quick=args.quick):
                    r["module"] = name
                    results.append(r)
                    print(fmt_row(r), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "simd": _C.simd_info(),
        "numpy": np.__version__,
        "offq": offq.__version__,
        "quick": args.quick,
        "protocol": "best of repeated timed loops per case (benchmarks/kernels/common.py); "
                    "baselines in the same process, same arrays, same thread setting",
        "results": results,
    }
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
