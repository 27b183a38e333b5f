"""Test code run in a fresh process with the SIMD dispatch capped: ``OFFQ_SIMD_MAX`` is read once,
when offq's C core is imported, so comparing what an AVX2-only CPU runs with what this one runs
takes a second process."""
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np


def run_capped(code: str, cap: str, args: list[str], cwd: os.PathLike | str) -> None:
    """``python -c code *args`` with ``OFFQ_SIMD_MAX=cap`` ("" = uncapped), this offq and the
    tests' helpers importable; fails the test with the child's stderr when it fails."""
    import offq

    root = os.path.dirname(os.path.dirname(os.path.abspath(offq.__file__)))
    path = os.pathsep.join(filter(None, [root, os.path.dirname(os.path.abspath(__file__)),
                                         os.environ.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=dict(os.environ, OFFQ_SIMD_MAX=cap, PYTHONPATH=path), cwd=cwd,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def outputs_by_cap(code: str, tmp_path: Path, args: tuple[str, ...] = (),
                   caps: tuple[str, ...] = ("", "avx2")) -> dict[str, Any]:
    """Run ``code`` once per cap with the path of an .npz file appended to ``args`` (the code
    writes it with ``np.savez``); returns {cap: np.load(that file)}."""
    out = {}
    for cap in caps:
        path = tmp_path / f"out_{cap or 'uncapped'}.npz"
        run_capped(code, cap, [*args, str(path)], tmp_path)
        out[cap] = np.load(path)
    return out
