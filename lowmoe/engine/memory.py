"""Memory figures: process peaks for reports and benchmarks, and lowmoe's own device-byte books.

``Accountant`` keeps the device bytes held by lowmoe's weights (+ the planned activations) while a
run goes, so a report can show the planned and the held peak next to CUDA's own figure.
``out_of_memory_errors`` turns a pass that runs out of memory anyway into one line naming the flag.
"""

from __future__ import annotations

import os
import re
import resource
import sys
import threading
import weakref
from contextlib import contextmanager

from ..errors import ResourceError


# glibc's M_MMAP_THRESHOLD (malloc.h): allocations at least this large are mapped on their own
M_MMAP_THRESHOLD = -3
FREED_RETURNED_BYTES = 1 << 20
_returning: list[int] = []  # the threshold set, once per process


def return_freed_memory() -> int | None:
    """Keep glibc from holding on to freed tensors: a fixed 1 MiB mmap threshold (``mallopt``).

    By default glibc raises its threshold, up to 32 MiB, each time a mapped block is freed; blocks
    below it then come from the heap, and freed ones stay in the process (resident) as free heap,
    so a pass that allocates and frees mid-sized tensors (a merge's, an experts group's) peaks well
    above what it holds at once. Fixed, every block of 1 MiB or more is mapped on its own and given
    back to the OS when freed, at the cost of a page fault per page of each new one. lowmoe sets it
    for a pass under ``--max-ram`` (``Stream``); returns the threshold, or None where the C library
    is not glibc (nothing set)."""
    if _returning:
        return _returning[0]
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not libc.mallopt(M_MMAP_THRESHOLD, FREED_RETURNED_BYTES):
            return None
    except (OSError, AttributeError):
        return None
    _returning.append(FREED_RETURNED_BYTES)
    return FREED_RETURNED_BYTES


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


def _detail(e: BaseException) -> str:
    """The useful part of an allocator's message: what torch tried to allocate and what was free, else its first line."""
    msg = " ".join(str(e).split())
    tried = re.search(r"[Tt]ried to allocate ([0-9.]+ ?\w+)", msg)
    free = re.search(r"of which ([0-9.]+ ?\w+) is free", msg)
    parts = ([f"tried to allocate {tried.group(1)}"] if tried else []) + ([f"{free.group(1)} was free"] if free else [])
    return ", ".join(parts) if parts else (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


@contextmanager
def out_of_memory_errors(device, plan=None, *, resume: bool = False):
    """Run a pass; if it runs out of memory, raise ``ResourceError`` with one line saying which memory,
    what the plan expected (``plan``: the pass's ``BudgetPlan``), which flag to lower, and (``resume``:
    a prune, whose finished layers are kept) that rerunning with --resume loses nothing.

    The plan holds lowmoe's own bytes; a card shared with other processes, the CUDA context,
    fragmentation, or a machine with less free RAM than the budget promises can still run out."""
    again = "; nothing is lost: rerun the same command with --resume" if resume else ""
    try:
        yield
    except MemoryError as e:
        raise ResourceError(_host_message(e, plan, again)) from None
    except RuntimeError as e:  # torch.OutOfMemoryError (a device allocation) is a RuntimeError too
        import torch

        text = str(e).lower()
        if isinstance(e, torch.OutOfMemoryError):
            peak = f" with lowmoe's planned device peak {fmt_bytes(plan.device_peak_bytes)}" if plan is not None else ""
            flag = ("lower --max-vram (the card has less free than it promises: other processes, the CUDA context, "
                    "fragmentation)" if plan is not None and plan.max_vram is not None else
                    "pass --max-vram 1-2 GB below the card's free memory")
            raise ResourceError(f"out of GPU memory on {device} ({_detail(e)}){peak}: {flag}, or lower "
                                f"--batch-size/--seq-len{again}") from None
        if "can't allocate memory" in text or "cannot allocate memory" in text:
            raise ResourceError(_host_message(e, plan, again)) from None
        if "out of memory" in text:  # a CUDA error: a page-locked host allocation or the device
            raise ResourceError(f"out of memory on {device} ({_detail(e)}): page-locked host memory or the device; "
                                f"lower --max-ram and --max-vram, or --batch-size/--seq-len{again}") from None
        raise


def _host_message(e: BaseException, plan, again: str) -> str:
    peak = f" with lowmoe's planned host peak {fmt_bytes(plan.host_peak_bytes)}" if plan is not None else ""
    flag = ("lower --max-ram below the memory free on this machine" if plan is not None and plan.max_ram is not None
            else "pass --max-ram below the memory free on this machine (lowmoe inspect MODEL --max-ram SIZE shows what it holds)")
    return f"out of host memory ({_detail(e)}){peak}: {flag}{again}"
