"""Peak memory of a piece of work in this process (Linux ``/proc/self/status``).

``RssAnon`` is memory the process itself allocated (sampled every few milliseconds: the kernel
keeps no high-water mark of it); ``VmHWM`` is the kernel's high-water mark of the total resident
set, which also counts clean pages of memory-mapped files (a GGUF or safetensors checkpoint) that
the kernel may drop at any time.
"""
from __future__ import annotations

import threading
from types import TracebackType

__all__ = ["status_bytes", "PeakMemory"]


def status_bytes(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (0 where the field or the file is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """``with PeakMemory() as pm: ...`` then ``pm.peak_anon`` (bytes, sampled every
    ``interval_s``), ``pm.base_anon`` (at entry) and ``pm.vm_hwm`` (at exit; process-wide)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = float(interval_s)
        self.base_anon = self.peak_anon = self.vm_hwm = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_anon = max(self.peak_anon, status_bytes("RssAnon"))

    def __enter__(self) -> "PeakMemory":
        self.base_anon = self.peak_anon = status_bytes("RssAnon")
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_anon = max(self.peak_anon, status_bytes("RssAnon"))
        self.vm_hwm = status_bytes("VmHWM")
