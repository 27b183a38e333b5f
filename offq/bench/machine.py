"""What a benchmark figure was measured on: the machine, its CPU features and the threads.

Every table offq prints carries this line (the brief: a number comes with its protocol).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_model", "machine_info", "describe_machine"]


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU, usable cores, SIMD paths offq dispatches to, kernel threads, versions, load."""
    import numpy as np

    import offq
    from offq import _C
    from offq.kernels import get_num_threads

    simd = _C.simd_info()
    return {
        "cpu": cpu_model(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "simd": {k: bool(v) for k, v in simd.items()},
        # OFFQ_SIMD_MAX=avx2 emulates an AVX2-only CPU (Zen3) on an AVX-512 one
        "simd_max": os.environ.get("OFFQ_SIMD_MAX", ""),
        "threads": get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        # forces matmul_wq's decode (convert or subnormal) over the import-time probe
        "wq_decode_env": os.environ.get("OFFQ_WQ_DECODE", ""),
        # a forced OpenBLAS kernel changes every BLAS baseline (Haswell: AVX2 sgemm on any CPU)
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "offq": offq.__version__,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def describe_machine(info: dict[str, Any] | None = None) -> str:
    """One line: ``CPU, N cores usable, SIMD avx2+avx512+avx512_vbmi+avx512_vnni (matmul_wq
    decode D), offq V, numpy V, load L``."""
    info = info or machine_info()
    feats = "+".join(k for k in ("avx2", "avx512", "avx512_vbmi", "avx512_vnni")
                     if info["simd"].get(k)) or "none"
    if info["simd"].get("disabled_by_env"):
        feats += " (SIMD disabled by the environment: generic C)"
    elif info.get("simd_max"):
        feats += f" (OFFQ_SIMD_MAX={info['simd_max']})"
    if info["simd"].get("avx2") and not info["simd"].get("disabled_by_env"):
        feats += (" (matmul_wq decode "
                  + ("subnormal" if info["simd"].get("wq_subnormal_decode") else "convert")
                  + (f", OFFQ_WQ_DECODE={info['wq_decode_env']}" if info.get("wq_decode_env")
                     else "") + ")")
    load = info.get("load_average_1min")
    core = info.get("openblas_coretype")
    return (f"{info['cpu']}, {info['cores_usable']} cores usable, SIMD {feats}, offq "
            f"{info['offq']}, numpy {info['numpy']}"
            + (f", OPENBLAS_CORETYPE={core}" if core else "")
            + (f", load average {load:.1f}" if load is not None else ""))
