"""Build the C core ``offq._C`` (C11, OpenMP, OpenBLAS from the scipy-openblas32 wheel).

Environment switches (read at build time):
  OFFQ_WERROR=1    add -Werror (CI compiles with -Wall -Wextra -Werror)
  OFFQ_SANITIZE=1  debug build with AddressSanitizer + UBSan (run with libasan preloaded)
No -march=native: SIMD variants are compiled per function with target attributes and chosen at
run time, so a wheel built here runs on any x86-64.
"""
import os
import sys
from glob import glob

import numpy
import scipy_openblas32
from setuptools import Extension, setup

# -ffp-contract=off (ISO C's default, stated so it stays): no fused multiply-adds the source does
# not write, so the generic, AVX2 and NumPy quantizers round identically
compile_args = ["-std=c11", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wextra",
                "-Wno-unused-parameter"]
link_args = ["-fopenmp", "-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib"]
if os.environ.get("OFFQ_WERROR") == "1":
    compile_args.append("-Werror")
if os.environ.get("OFFQ_SANITIZE") == "1":
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    compile_args += ["-O1", "-g"] + san
    link_args += san
else:
    compile_args += ["-O3"]

ext = Extension(
    "offq._C",
    sources=sorted(glob("csrc/*.c") + glob("csrc/x86/*.c") + glob("csrc/python/*.c")),
    depends=sorted(glob("csrc/*.h") + glob("csrc/x86/*.h") + glob("csrc/python/*.h")),
    include_dirs=["csrc", numpy.get_include(), scipy_openblas32.get_include_dir()],
    library_dirs=[scipy_openblas32.get_lib_dir()],
    libraries=[scipy_openblas32.get_library()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"),
                   ("NPY_TARGET_VERSION", "NPY_1_23_API_VERSION")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

if sys.platform != "linux":
    print("offq: only Linux builds are tested", file=sys.stderr)

setup(ext_modules=[ext])
