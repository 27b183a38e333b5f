"""Benchmarks shipped with offq (``offq bench``; the scripts in benchmarks/ call the same code).

- :mod:`offq.bench.kernels`: each C kernel as a ratio against OpenBLAS/NumPy in the same run
  (modules :mod:`~offq.bench.fwht`, :mod:`~offq.bench.cov`, :mod:`~offq.bench.matmul`,
  :mod:`~offq.bench.matmul_wq`, :mod:`~offq.bench.matmul_i8`, timing
  helpers in :mod:`~offq.bench.timing`);
- :mod:`offq.bench.e2e`: prompt-processing and generation tokens/s of a model, FP32 vs W4A4KV4
  (plus llama.cpp when a ``llama-bench`` binary is given);
- :mod:`offq.bench.machine`: the machine line printed with every table.

Speed is never asserted by the tests: these are measurements with their protocol, not checks.
"""
from .e2e import E2EConfig, format_e2e, run_e2e
from .kernels import KERNEL_BENCHMARKS, format_rows, run_kernels
from .machine import describe_machine, machine_info

__all__ = ["E2EConfig", "run_e2e", "format_e2e", "KERNEL_BENCHMARKS", "run_kernels",
           "format_rows", "machine_info", "describe_machine"]
