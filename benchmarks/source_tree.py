"""Which offq a benchmark script imports.

The scripts run from a clone. When the clone's own C core is built in place (``pip install -e .``
or ``python setup.py build_ext --inplace``) they import the clone's ``offq``; otherwise the
installed package (``pip install .``), which a clone without its ``_C`` extension would shadow
with an ImportError. The repository root stays on the path either way, for ``tests/`` helpers.
"""
from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_repository() -> Path:
    """Put the repository root on ``sys.path``: first when its ``offq/`` has the C core built
    for this interpreter, last otherwise (an installed offq is then imported). Returns the
    root."""
    built = any((ROOT / "offq" / f"_C{suffix}").is_file()  # for this interpreter, not another
                for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    # an entry that is already there (PYTHONPATH=., the current directory) moves too
    sys.path[:] = [p for p in sys.path if not _is_root(p)]
    if built:
        sys.path.insert(0, str(ROOT))
    else:
        sys.path.append(str(ROOT))
    return ROOT


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == ROOT
    except OSError:
        return False
