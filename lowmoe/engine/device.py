"""Where compute happens and in which dtype: ``--device`` and ``--dtype``.

Every command that computes (prune/score, eval, search) resolves its flags here once, before any
heavy work, so a bad value fails in the first second with a message naming the flag:

    --device auto | cpu | cuda | cuda:N   (auto = the current CUDA device when there is one, else cpu)
    --dtype  bf16 | fp16 | fp32           (long names bfloat16 / float16 / float32 are accepted too)

The compute dtype is what the decoder layer runs in (weights are cast per layer as they are
loaded). Statistics are accumulated in fp32 whatever it is: the scorers upcast router logits,
weights and expert-output norms before summing (see ``lowmoe.methods.scoring``), so bf16 compute changes
scores by rounding only, not by accumulated error.

``describe_device`` gives the line the report and the benchmark print (name, memory, capability).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
DTYPE_CHOICES = ("bf16", "fp16", "fp32", "bfloat16", "float16", "float32")


def cpu_runtime_defaults() -> None:
    """Process settings lowmoe's CPU compute needs, set before the first layer runs (``ModelSkeleton``).

    oneDNN (bf16 matmuls on CPU) caches a primitive, with its reordered weights, per distinct shape; a
    MoE layer's experts see a new row count on nearly every call, so the cache only grows: in the bf16
    EEP benchmark it took peak RSS from 1.37 to 1.65-1.79 GB, and turning it off cost no time
    (docs/eep.md). Read when oneDNN first runs; a value the user set is kept."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``--device`` value -> a ``torch.device`` that exists on this machine (ConfigError otherwise)."""
    if isinstance(name, torch.device):
        name = str(name)
    s = (name or "auto").strip().lower()
    if s == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s == "cuda" or s.startswith("cuda:"):
        idx_text = s[5:] if s.startswith("cuda:") else None
        if idx_text is not None and not idx_text.isdigit():
            raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N with N a GPU index")
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                              "use --device cpu or auto")
        n = torch.cuda.device_count()
        idx = int(idx_text) if idx_text is not None else torch.cuda.current_device()
        if idx >= n:
            raise ConfigError(f"--device {name}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return torch.device("cuda", idx)
    raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def resolve_dtype(name: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """``--dtype`` value -> a torch dtype; fp16/bf16 on a device that cannot run them is an error."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = str(name).strip().lower()
        if key not in DTYPES:
            raise ConfigError(f"--dtype {name!r}: choose one of bf16, fp16, fp32")
        dtype = DTYPES[key]
    if device is not None and device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use --dtype fp16 or fp32")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_MINMAX_CHECKED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on ``t``'s device: whether every value of float tensor ``t`` is finite
    (nothing synchronises: read it with ``bool()`` when needed).

    The smallest and largest value are NaN when any value is (``aminmax`` propagates NaN), and
    +/-Inf when one is: one reduction without temporaries, where ``isfinite(t).all()`` writes a
    bool per element first (50x slower on a CPU: 0.26 s against 0.005 s for a 176 MB bf16 group)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    if t.dtype in _MINMAX_CHECKED:
        lo, hi = torch.aminmax(t)
        return torch.isfinite(lo) & torch.isfinite(hi)
    if t.is_floating_point() and t.element_size() == 1:  # FP8: no reductions of its own; widened
        t = t.to(torch.float16)
    return torch.isfinite(t).all()


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of float tensor ``t`` is finite (``finite_flag``, read on the host)."""
    return bool(finite_flag(t))


# cuBLAS workspaces. torch gives every (cuBLAS handle, CUDA stream) pair that multiplies matrices a
# workspace from its caching allocator, so ``torch.cuda.max_memory_allocated`` counts it, and keeps it
# until the process ends: one per thread that computes (each thread has its own handle). Its size is
# CUBLAS_WORKSPACE_CONFIG's (":SIZE_KiB:COUNT" pairs, summed), else 32 MiB on Hopper and Blackwell
# (compute capability 9, 10, 12) and 8 MiB + 128 KiB before them (torch's CublasHandlePool.cpp).
# Measured on an H200: one 32 MiB block per computing thread (docs/gpu.md, session 10).
BLAS_WORKSPACE_DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8
BLAS_WORKSPACE_HOPPER = 32 << 20


def blas_workspace_bytes(device: torch.device) -> int:
    """The bytes of one cuBLAS workspace on ``device`` (0 on a CPU; planning for a CUDA device on a
    machine without one, the larger default)."""
    if device.type != "cuda":
        return 0
    pairs = re.findall(r":(\d+):(\d+)", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""))
    if pairs:
        return sum(int(size) * 1024 * int(count) for size, count in pairs)
    if not torch.cuda.is_available():
        return BLAS_WORKSPACE_HOPPER
    major = torch.cuda.get_device_properties(device).major
    return BLAS_WORKSPACE_HOPPER if major in (9, 10, 12) else BLAS_WORKSPACE_DEFAULT


def release_blas_workspaces(device: torch.device) -> None:
    """Give the cuBLAS workspaces back to the caching allocator once the device's queued work is done
    (torch makes new ones on the next matrix product): a pass leaves no workspace of its threads
    allocated behind it. A no-op on a CPU, or where torch has no such call. It releases every thread's
    workspace, so code that runs cuBLAS on another thread of the process while a pass ends must not
    share the device with it (lowmoe's own passes end one at a time)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if device.type == "cuda" and clear is not None:
        torch.cuda.synchronize(device)
        clear()


# Page-locked (pinned) host memory. torch's caching host allocator rounds every pinned block up to the
# next power of two and keeps freed blocks cached for reuse until told to give them back
# (``torch.cuda.host_memory_stats``: "Block sizes are rounded up to the next power of two"): a 0.75 GiB
# staging buffer holds 1 GiB of RAM. Newer torch skips the rounding above PYTORCH_CUDA_ALLOC_CONF's
# ``pinned_max_round_threshold_mb`` (and above ``pinned_max_cached_size_mb``, which it does not cache).
_MB = 1 << 20


def _pinned_limits() -> tuple[int | None, int | None]:
    conf = ",".join(os.environ.get(v, "") for v in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"))
    found = {k: int(v) * _MB for k, v in re.findall(r"(pinned_max_round_threshold_mb|pinned_max_cached_size_mb):(\d+)", conf)}
    return found.get("pinned_max_round_threshold_mb"), found.get("pinned_max_cached_size_mb")


def pinned_bytes(nbytes: int, device: torch.device) -> int:
    """The host bytes a page-locked buffer of ``nbytes`` takes for a pass on ``device``: on CUDA, torch's
    power-of-two block (unless PYTORCH_CUDA_ALLOC_CONF's pinned thresholds exempt that size); on a CPU
    nothing is pinned, so ``nbytes`` itself."""
    n = int(nbytes)
    if device.type != "cuda" or n <= 0:
        return max(n, 0)
    round_max, cached_max = _pinned_limits()
    if (round_max is not None and n > round_max) or (cached_max is not None and n > cached_max):
        return n
    return 1 << (n - 1).bit_length()


def pinned_stats(device: torch.device) -> dict:
    """What torch's pinned-memory allocator did in this process, for the report (CUDA only; {} where
    torch keeps no such statistics): its peak bytes (rounded blocks), how many blocks it made and the
    seconds spent making them."""
    if device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
        return {}
    s = torch.cuda.host_memory_stats()
    if not s:
        return {}
    out = {"peak_bytes": s.get("allocated_bytes.all.peak", s.get("allocated_bytes.peak")),
           "current_bytes": s.get("allocated_bytes.all.current", s.get("allocated_bytes.current")),
           "blocks_made": s.get("num_host_alloc"),
           "alloc_s": (s["host_alloc_time.total"] / 1e6) if "host_alloc_time.total" in s else None}
    return {k: v for k, v in out.items() if v is not None}


def release_pinned_cache(device: torch.device) -> None:
    """Give torch's cached, unused page-locked blocks back to the system (a pass's pinned buffers,
    once it dropped them; blocks still in use are untouched). A no-op on a CPU, before CUDA was
    used, or where torch has no such call."""
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return
    release = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if release is None:
        release = getattr(torch._C, "_host_emptyCache", None)
    if release is not None:
        release()


class DeviceWarmUp:
    """Creates the CUDA context (torch's lazy initialisation and the device's primary context) and
    page-locks one block of ``pinned`` bytes, dropped at once into torch's pinned-memory cache, where
    the staging pool's first buffer of that size then comes from -- on a thread of its own. A pass
    starts it before it imports transformers' code and tokenizes (seconds of work that need neither),
    so the first layer does not wait for either. ``seconds``: how long it took; ``error``: why it did
    not (the pass then meets the same error where it would have anyway)."""

    def __init__(self, device: torch.device, pinned: int = 0):
        self.device, self.pinned = device, int(pinned)
        self.seconds: float | None = None
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="lowmoe-device-warm-up", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            torch.zeros(1, device=self.device)  # an allocation: the context exists after it
            if self.pinned > 0:
                torch.empty(self.pinned, dtype=torch.uint8, pin_memory=True)  # freed into torch's cache
        except Exception as e:  # noqa: BLE001 -- reported; the pass raises it in order
            self.error = f"{type(e).__name__}: {e}"
            log.debug("device warm-up: %s", self.error)
        self.seconds = time.perf_counter() - t0

    def join(self) -> None:
        self.thread.join()

    def report(self) -> dict:
        """Once it is done, its seconds and error, as a report's ``io.device_warm_up`` gives them."""
        self.join()
        return {"s": round(self.seconds or 0.0, 4), "error": self.error}


def warm_up(device: torch.device, pinned: int = 0, enabled: bool = True) -> DeviceWarmUp | None:
    """``DeviceWarmUp`` on a CUDA ``device`` (None on a CPU, or when not ``enabled``: ``--no-prefetch``,
    whose pass does its work on the main thread, in order)."""
    return DeviceWarmUp(device, pinned) if enabled and device.type == "cuda" else None


def describe_device(device: torch.device) -> dict:
    """What the report records about the compute device."""
    if device.type != "cuda":
        return {"device": "cpu", "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    p = torch.cuda.get_device_properties(device)
    return {"device": str(device), "name": p.name, "total_memory_bytes": int(p.total_memory),
            "capability": f"{p.major}.{p.minor}", "torch_cuda": torch.version.cuda}


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device now (None on CPU)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


class DeviceTimer:
    """Times what a CUDA device runs inside ``with timer:`` blocks with CUDA events, without making
    the host wait; ``seconds()``, once the device has finished them, is their sum (None off CUDA)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._events: list[tuple] = []

    def _record(self) -> "torch.cuda.Event":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # the stream the pass computes on
        return event

    def __enter__(self):
        if self.cuda:
            self._events.append((self._record(),))
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self._events[-1] += (self._record(),)

    def seconds(self) -> float | None:
        if not self.cuda:
            return None
        return sum(start.elapsed_time(end) for start, end in self._events) / 1000.0


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timings on CUDA are meaningless without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
