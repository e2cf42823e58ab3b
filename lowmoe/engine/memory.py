"""Memory figures: process peaks for reports and benchmarks, and lowmoe's own device-byte books.

``Accountant`` keeps the device bytes held by lowmoe's weights (+ the planned activations) while a
run goes, so a report can show the planned and the held peak next to CUDA's own figure.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import weakref


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def cuda_peak_bytes() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
    except Exception:
        pass
    return None


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class Accountant:
    """Device bytes held by lowmoe's weights (+ the planned activation bytes): current and peak.

    ``track(obj, nbytes)`` counts ``nbytes`` until ``obj`` is garbage-collected (or ``release``d).
    Thread-safe: the layer reader and the expert loader add and release from their own threads.
    """

    def __init__(self, activation_bytes: int = 0):
        self.activation_bytes = activation_bytes
        self.current = 0
        self.peak = activation_bytes
        self._live: dict[int, int] = {}
        self._next = 0
        self._lock = threading.RLock()  # reentrant: a finalizer (track) may run in a GC inside add

    def add(self, nbytes: int) -> int:
        with self._lock:
            token = self._next
            self._next += 1
            self._live[token] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current + self.activation_bytes)
            return token

    def release(self, token: int) -> None:
        with self._lock:
            self.current -= self._live.pop(token, 0)

    def track(self, obj, nbytes: int) -> int:
        token = self.add(nbytes)
        weakref.finalize(obj, self.release, token)
        return token
