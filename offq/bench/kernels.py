"""The kernel table: each C kernel against OpenBLAS/NumPy, measured in the same run.

``run_kernels(threads=[1, 2])`` runs the benchmark modules of this package (``fwht``, ``cov``,
``matmul``, ``matmul_wq``, ``matmul_i8``; each exposes ``run(threads, quick) -> list[row]``) under each thread setting (one
setting for offq's OpenMP, its OpenBLAS and NumPy's BLAS) and returns the rows; ``format_rows``
prints them. Row fields: ``seconds`` per call (per row for fwht), ``gflops`` and ``gbps`` as each
module's docstring defines them, ``speedup_vs``: baseline seconds / offq seconds (> 1: offq is
faster).
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from ..kernels import threads as thread_limit
from ..progress import Progress

__all__ = ["KERNEL_BENCHMARKS", "run_kernels", "format_rows", "HEADER"]

KERNEL_BENCHMARKS = ("fwht", "cov", "matmul", "matmul_wq", "matmul_i8")
HEADER = (f"{'bench':<11} {'case':<40} {'th':>2} {'time':>13} {'GFLOP/s':>8} {'GB/s':>8}  "
          "speedup (baseline time / offq time)")


def format_row(r: dict[str, Any]) -> str:
    ratios = ", ".join(f"{k} {v:.2f}x" if v is not None else f"{k} n/a"
                       for k, v in r["speedup_vs"].items())
    sec = r["seconds"]
    t = f"{sec * 1e6:10.2f} us" if sec < 1e-2 else f"{sec * 1e3:10.2f} ms"
    return (f"{r['bench']:<11} {r['case']:<40} {r['threads']:>2} {t} {r['gflops']:8.2f} "
            f"{r['gbps']:8.2f}  {ratios}")


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    return "\n".join([HEADER, "-" * len(HEADER), *(format_row(r) for r in rows)])


def run_kernels(threads: Sequence[int] = (1, 2), *, quick: bool = False,
                only: Sequence[str] | None = None, on_row: Any = None,
                show: bool | None = None) -> list[dict[str, Any]]:
    """Rows of every kernel benchmark (``only`` picks some) at each thread count.

    ``on_row(row)`` is called as each row is measured (to print the table as it grows).
    """
    names = list(only or KERNEL_BENCHMARKS)
    unknown = sorted(set(names) - set(KERNEL_BENCHMARKS))
    if unknown:
        raise ValueError(f"only: unknown kernel benchmark(s) {unknown}; "
                         f"choose from {list(KERNEL_BENCHMARKS)}")
    modules = {n: importlib.import_module(f".{n}", __package__) for n in names}
    rows: list[dict[str, Any]] = []
    with Progress(len(threads) * len(modules), "kernel benchmarks", unit="module",
                  show=show) as bar:
        for t in threads:
            with thread_limit(t):
                for name, mod in modules.items():
                    for r in mod.run(threads=t, quick=quick):
                        r["module"] = name
                        rows.append(r)
                        if on_row is not None:
                            on_row(r)
                    bar.update()
    return rows
