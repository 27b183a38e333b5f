"""Test code run in a fresh process with the SIMD dispatch set by the environment:
``OFFQ_SIMD_MAX`` and ``OFFQ_WQ_DECODE`` are read once, when offq's C core is imported, so
comparing what an AVX2-only CPU runs with what this one runs (or one decode with the other) takes
a second process."""
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np


def run_with_env(code: str, env: dict[str, str], args: list[str],
                 cwd: os.PathLike | str) -> None:
    """``python -c code *args`` with ``env`` added to the environment, this offq and the tests'
    helpers importable; fails the test with the child's stderr when it fails."""
    import offq

    root = os.path.dirname(os.path.dirname(os.path.abspath(offq.__file__)))
    path = os.pathsep.join(filter(None, [root, os.path.dirname(os.path.abspath(__file__)),
                                         os.environ.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=dict(os.environ, **env, PYTHONPATH=path), cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def outputs_by_env(code: str, tmp_path: Path, envs: dict[str, dict[str, str]],
                   args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run ``code`` once per entry of ``envs`` ({label: environment}) with the path of an .npz
    file appended to ``args`` (the code writes it with ``np.savez``); returns
    {label: np.load(that file)}."""
    out = {}
    for label, env in envs.items():
        path = tmp_path / f"out_{label or 'default'}.npz"
        run_with_env(code, env, [*args, str(path)], tmp_path)
        out[label] = np.load(path)
    return out


def outputs_by_cap(code: str, tmp_path: Path, args: tuple[str, ...] = (),
                   caps: tuple[str, ...] = ("", "avx2")) -> dict[str, Any]:
    """``outputs_by_env`` with one ``OFFQ_SIMD_MAX`` cap per run: {cap: outputs}."""
    return outputs_by_env(code, tmp_path, {cap: {"OFFQ_SIMD_MAX": cap} for cap in caps}, args)
