"""Atomic output files: every file offq writes appears whole or not at all.

A file is written to a temporary name in its directory, flushed and fsync'd, renamed onto its
final name (``os.replace``, atomic on POSIX), and then the directory itself is fsync'd so that
the rename survives a crash.
"""
from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["DirectoryLock", "atomic_copy", "atomic_write_bytes", "atomic_write_text",
           "atomic_write_json", "check_json_size", "check_output_dir", "fsync_dir",
           "read_json_object"]


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory (makes renames and unlinks inside it durable); a no-op where the
    platform cannot open directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DirectoryLock:
    """An exclusive advisory lock (``flock``) on a directory while offq writes into it.

    A second writer of the same directory (another process, or another run in this one) is
    refused with a ValueError naming it, instead of discarding the first one's unfinished run
    or interleaving its files with it. The lock is the directory's own (no lock file is left
    behind) and the kernel releases it when the process ends, so a crash never leaves it held.
    Where the file system or platform has no such locks (some network mounts, Windows),
    writing goes on unlocked. Creates the directory (and its parents) if needed."""

    def __init__(self, directory: str | os.PathLike, name: str = "out_dir"):
        self._fd: int | None = None
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX
            return
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:  # a directory this process may write but not open: unlocked
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"{name}: {directory} is being written by another offq run; wait "
                             "for it to finish or choose another directory") from None
        except OSError:  # no locks on this file system
            os.close(fd)
            return
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def atomic_write_bytes(path: str | os.PathLike, chunks: Iterable[bytes] | bytes) -> None:
    """Write ``chunks`` to ``path`` atomically (temporary name, fsync, rename, directory fsync)."""
    path = Path(path)
    # a name no other process or thread writing the same path picks ("x": never an existing
    # file, nor a link planted at the name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}-"
                         f"{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            for chunk in ([chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, chunk: int = 1 << 20) -> None:
    """Copy the file ``src`` to ``dst`` atomically, in chunks of ``chunk`` bytes."""
    with open(src, "rb") as f:
        atomic_write_bytes(dst, iter(lambda: f.read(chunk), b""))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_creatable(out_dir: str | os.PathLike, name: str = "out_dir") -> None:
    """Refuse a path no directory can be made at, before any work: its nearest existing ancestor
    must be a directory that takes a new entry (tried, not inferred from permission bits, which
    root and pseudo file systems such as /proc do not follow). An existing path passes: whether it
    may be written to is the writer's check. ValueError naming ``name`` and the path."""
    import tempfile

    target = Path(out_dir).absolute()
    if target.exists():
        return
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{name} {out_dir}: {ancestor} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".offq-probe-", dir=ancestor))
    except OSError as e:
        raise ValueError(f"{name} {out_dir}: cannot create it in {ancestor} "
                         f"({e.strerror or e})") from None


def check_output_dir(out_dir: str | os.PathLike, source: str | os.PathLike | None, *,
                     reusable: Callable[[Path], bool]) -> None:
    """Refuse an output directory whose use would destroy something: an empty path (the current
    directory), the ``source`` being read, a file, or an existing
    non-empty directory that ``reusable`` does not accept (e.g. one that is not an earlier
    output of the same kind); and one that cannot be created (:func:`check_creatable`).
    ValueError naming ``out_dir``."""
    if str(out_dir).strip() == "":
        raise ValueError("out_dir: empty (give a directory to write into)")
    out = Path(out_dir).resolve()
    if source is not None:
        src = Path(source).resolve()
        if out == src:
            raise ValueError(f"out_dir: {out_dir} is the input being read; write elsewhere")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {out_dir} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not reusable(out):
        raise ValueError(f"out_dir: {out_dir} exists, is not empty and holds something else; "
                         "choose a new or empty directory")
    check_creatable(out_dir)


#: the largest JSON side file offq reads (configs, a shard index, resume state): real ones are
#: kilobytes to a few MB; a 3.6 GB index ran out of memory in the parser
MAX_JSON_BYTES = 64 << 20


def check_json_size(path: str | os.PathLike, hint: str = "") -> None:
    """ValueError naming ``path`` when it is a file larger than `MAX_JSON_BYTES`."""
    try:
        size = Path(path).stat().st_size
    except OSError:
        return  # the read that follows names the problem
    if size > MAX_JSON_BYTES:
        end = f"; {hint}" if hint else ""
        raise ValueError(f"{path}: {size} bytes, more than offq reads of a JSON file "
                         f"({MAX_JSON_BYTES} bytes){end}")


def read_json_object(path: str | os.PathLike, hint: str = "") -> dict[str, Any]:
    """The JSON object in the file ``path`` (an untrusted file): ValueError naming it when it is
    larger than `MAX_JSON_BYTES`, unreadable, not UTF-8 JSON (nesting past the recursion limit
    included) or not an object; ``hint`` ends the message (what to do about it)."""
    end = f"; {hint}" if hint else ""
    check_json_size(path, hint)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e!r}){end}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}{end}")
    return data
