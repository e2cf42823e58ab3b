"""Overlap reading with compute: the next layer's tensors and the next activation chunk are read
by a background thread while the current one computes.

Where it sits: ``stream.Stream.layers`` is a ``LayerReader``: layer loops iterate it instead of calling
``Checkpoint.read_layer`` themselves, and ``stream.Stream.forward`` reads its activation-cache chunks
through ``Prefetcher`` (and writes them behind, through ``WriteBehind``). Nothing here changes a
number: the same bytes arrive in the same order, only earlier.

    main thread:   compute L   | compute L+1 | compute L+2
    reader thread: read L+1    | read L+2    | read L+3        (depth 1: at most one layer ahead)

Reads release the GIL (safetensors' pread, torch copies), so one background thread is enough to
hide the disk behind the compute. On CUDA the reader also copies each tensor into page-locked
(pinned) host memory, so the host->device copy that ``materialize`` does later is a fast DMA, and
``DeviceStager`` issues such copies on a separate CUDA stream so they overlap with kernels on the
default stream (used for expert groups in ``experts.ChunkedExperts``).

``IOStats`` records what the main thread spent *waiting* for data (the part of the I/O that was not
hidden) next to the time the reads took; the prune report shows both ("io" section).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .device import finite_flag
from .lazy import ExpertSource, LazyLayer

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class IOStats:
    """Seconds the main thread waited for reads (``wait_s``) vs seconds the reads took (``read_s``).

    With prefetching off, every read is waited for, so ``wait_s == read_s``; with it on, ``wait_s``
    is the I/O that compute did not hide. Kinds: "layer" (checkpoint tensors), "cache" (activation
    chunks read), "cache_write" (activation chunks written), "experts" (expert groups to the device).
    """

    wait_s: dict[str, float] = field(default_factory=dict)
    read_s: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    # where the wall time goes, per stage (``stage``): seconds, calls, and the thread it ran on
    stage_s: dict[str, float] = field(default_factory=dict)
    stage_n: dict[str, int] = field(default_factory=dict)
    stage_thread: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_wait(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.wait_s[kind] = self.wait_s.get(kind, 0.0) + seconds
        self.add_stage(_WAIT_STAGE.get(kind, f"wait_{kind}"), seconds)

    def add_read(self, kind: str, seconds: float, nbytes: int = 0) -> None:
        with self._lock:
            self.read_s[kind] = self.read_s.get(kind, 0.0) + seconds
            self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)
            self.count[kind] = self.count.get(kind, 0) + 1
        if kind in _READ_STAGE:  # a layer's read is split into its own stages (LayerReader)
            self.add_stage(_READ_STAGE[kind], seconds)

    def add_stage(self, name: str, seconds: float, thread: str | None = None) -> None:
        """``thread``: "main" or "background" from the calling thread when None; "device" for time
        the device itself spent (CUDA events), which overlaps the host's stages."""
        if thread is None:
            # a chunk of an experts-major wave runs on its own thread, but in the main thread's place
            cur = threading.current_thread()
            thread = "main" if cur is threading.main_thread() or getattr(cur, "lowmoe_main", False) else "background"
        with self._lock:
            self.stage_s[name] = self.stage_s.get(name, 0.0) + seconds
            self.stage_n[name] = self.stage_n.get(name, 0) + 1
            self.stage_thread.setdefault(name, thread)

    @contextmanager
    def stage(self, name: str):
        """Time the block as stage ``name`` (see ``STAGES``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add_stage(name, time.perf_counter() - t0)

    def stage_snapshot(self) -> dict[str, tuple[float, int]]:
        with self._lock:
            return {k: (v, self.stage_n[k]) for k, v in self.stage_s.items()}

    def stages_json(self, wall_s: float | None = None, since: dict[str, tuple[float, int]] | None = None) -> dict:
        """``{stage: {"s", "count", "thread", "share"}}`` in ``STAGES`` order; ``share`` is the fraction
        of ``wall_s`` (main-thread stages add up to about the wall; background ones overlap it).
        ``since``: a ``stage_snapshot`` taken earlier, to report only what came after it."""
        since = since or {}
        secs = {k: v - since.get(k, (0.0, 0))[0] for k, v in self.stage_s.items()}
        counts = {k: n - since.get(k, (0.0, 0))[1] for k, n in self.stage_n.items()}
        order = [k for k in STAGES if counts.get(k)] + sorted(k for k in secs if k not in STAGES and counts[k])
        out = {}
        for k in order:
            d = {"s": round(secs[k], 4), "count": counts[k], "thread": self.stage_thread[k]}
            if wall_s:
                d["share"] = round(secs[k] / wall_s, 4)
            out[k] = d
        return out

    @property
    def total_wait_s(self) -> float:
        return sum(self.wait_s.values())

    def to_json(self, wall_s: float | None = None) -> dict:
        d = {"wait_s": {k: round(v, 4) for k, v in sorted(self.wait_s.items())},
             "read_s": {k: round(v, 4) for k, v in sorted(self.read_s.items())},
             "bytes": dict(sorted(self.bytes.items())), "count": dict(sorted(self.count.items())),
             "total_wait_s": round(self.total_wait_s, 4)}
        if wall_s:
            d["wait_fraction"] = round(self.total_wait_s / wall_s, 4)
        return d


# The stages of a streamed pass, in the order a layer goes through them (``IOStats.stage``):
STAGES = {
    "tokenize": "the calibration data tokenized (prune: before the stream starts)",
    "setup": "the stream built: transformers' model skeleton (its modeling code imported), token embeddings",
    "profile": "the super-expert profile: read from its cache, or computed by its own pass over the model",
    "embed": "token embeddings of every chunk, written to the activation cache",
    "read": "a layer's tensors read from the shards (routed experts only located when read lazily)",
    "to_runtime": "stacked/renamed into transformers' runtime layout",
    "pin": "copied into page-locked host memory (CUDA)",
    "wait_layer": "the main thread waiting for the layer reader",
    "materialize": "the layer built on the compute device (non-expert weights copied there)",
    "build": "EEP: a candidate's MoE block built from the loaded layer (kept experts addressed, or merged)",
    "staging_alloc": "a staging buffer for expert groups allocated (page-locked on CUDA; once per buffer)",
    "expert_read": "a group of routed experts read from the shards into a staging buffer",
    "h2d": "a group of experts copied to the device and cast (enqueued on a side stream on CUDA)",
    "wait_experts": "the main thread waiting for an expert group",
    "wait_cache": "the main thread waiting for an activation chunk",
    "cache_read": "an activation chunk read (from memory or disk)",
    "to_device": "an activation chunk moved to the device and cast",
    "compute": "the layer's forward over a chunk: kernels queued (CUDA: the host waits for them once, at the layer's end)",
    "compute_device": "the device's own time running the layer's kernels (CUDA events around each chunk; overlaps the host's stages)",
    "observe": "scorers and guards reading the MoE block's routing (inside compute)",
    "to_host": "a layer's output chunk copied to the host",
    "cache_write": "an output chunk written to the activation cache",
    "wait_write": "the main thread waiting for a cache write",
    "fitness": "EEP: the LM head and the fitness of each candidate on its scored positions",
    "decide": "the layer's scores read and its plan decided",
    "apply": "the plan applied to the layer, its output tensors handed to the output writer",
    "output_write": "a layer's output tensors written into the output shards (writer thread)",
    "wait_output": "the main thread waiting for the output writer before recording a layer as done",
}
_WAIT_STAGE = {"layer": "wait_layer", "cache": "wait_cache", "cache_write": "wait_write", "experts": "wait_experts",
               "output": "wait_output"}
_READ_STAGE = {"cache": "cache_read", "cache_write": "cache_write", "experts": "h2d", "output": "output_write"}


def tensors_nbytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, a dict of them, or a LayerData: as read)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, LazyLayer):
        return tensors_nbytes(obj.resident)  # the experts' bytes are counted where they are read
    if isinstance(obj, dict):
        return sum(tensors_nbytes(v) for v in obj.values())
    if hasattr(obj, "tensors"):
        return tensors_nbytes(obj.tensors)
    return 0


def pin(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Page-locked copies (CUDA only): host->device copies from them are DMA and can be async."""
    return {k: v.pin_memory() for k, v in tensors.items()}


class Prefetcher(Iterable[tuple[T, R]]):
    """Yields ``(item, load(item))`` in order, loading up to ``depth`` items ahead on one thread.

    ``depth=0`` loads in the calling thread (no overlap; everything counts as wait). The thread is
    a daemon and the iterator shuts it down when exhausted or closed, so an exception in the
    consumer does not leave reads running.
    """

    def __init__(self, load: Callable[[T], R], items: Iterable[T], *, depth: int = 1, stats: IOStats | None = None,
                 kind: str = "read", name: str = "lowmoe-prefetch"):
        self.load, self.items = load, list(items)
        self.depth, self.stats, self.kind, self.name = max(0, int(depth)), stats or IOStats(), kind, name
        self.last_wait_s = 0.0  # how long the item just yielded was waited for

    def _timed(self, item: T) -> R:
        t0 = time.perf_counter()
        out = self.load(item)
        self.stats.add_read(self.kind, time.perf_counter() - t0, tensors_nbytes(out))
        return out

    def __len__(self) -> int:
        return len(self.items)

    def taken(self, out: R) -> None:
        """Called with each loaded item as the consumer takes it, before the next load is started."""

    def __iter__(self) -> Iterator[tuple[T, R]]:
        if self.depth == 0:
            for item in self.items:
                t0 = time.perf_counter()
                out = self._timed(item)
                self.last_wait_s = time.perf_counter() - t0
                self.stats.add_wait(self.kind, self.last_wait_s)
                yield item, out
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        pending: list[tuple[T, Future]] = []
        try:
            it = iter(self.items)
            for item in it:
                pending.append((item, pool.submit(self._timed, item)))
                if len(pending) >= self.depth:  # the rest is submitted as items are taken
                    break
            while pending:
                item, fut = pending.pop(0)
                t0 = time.perf_counter()
                out = fut.result()  # re-raises the reader's exception here, in order
                self.last_wait_s = time.perf_counter() - t0
                self.stats.add_wait(self.kind, self.last_wait_s)
                self.taken(out)  # before the next load starts
                nxt = next(it, _END)
                if nxt is not _END:
                    pending.append((nxt, pool.submit(self._timed, nxt)))
                yield item, out
                del out  # drop our reference before the next one is loaded further
        finally:
            for _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


_END = object()


@dataclass
class LayerData:
    tensors: dict[str, torch.Tensor]  # on-disk keys, stored dtype: what apply/write use (a LazyLayer: experts not read)
    runtime: dict[str, torch.Tensor] | None  # transformers' state-dict layout (pinned on CUDA); no routed experts when lazy
    experts: ExpertSource | None = None  # lazy: the routed experts, read in groups while the layer computes


class LayerReader(Prefetcher):
    """``(layer_idx, LayerData)`` for ``layers`` in order, the next one read while this one computes.

    The reader thread reads the layer (``read``, default ``ck.read_layer``), turns it into the
    runtime layout (``to_runtime(layer_idx, tensors)``: stacking per-expert tensors is CPU work
    worth overlapping too) and, with ``pin_memory`` (CUDA runs), page-locks the runtime tensors so
    the host->device copy is a DMA. Host memory holds at most two layers (the budget planner turns
    prefetching off when ``--max-ram`` cannot hold two). ``preload(layer_idx, source)``, for a layer
    whose routed experts are read lazily: read its first group of experts on the reader thread too
    (``lazy.ExpertSource.preload``), so a layer whose experts form one group arrives whole.
    """

    def __init__(self, ck, layers: Iterable[int], *, prefetch: bool = True, pin_memory: bool = False,
                 stats: IOStats | None = None, read: Callable[[int], dict] | None = None,
                 to_runtime: Callable[[int, dict], dict] | None = None,
                 preload: Callable[[int, ExpertSource], None] | None = None):
        read = read or ck.read_layer

        st = stats if stats is not None else IOStats()

        def load(layer_idx: int) -> LayerData:
            with st.stage("read"):
                t = read(layer_idx)
            src = None
            with st.stage("to_runtime"):
                if isinstance(t, LazyLayer):  # the routed experts stay in the shards
                    src = t.experts
                    rt = to_runtime(layer_idx, t.resident) if to_runtime is not None else None
                else:
                    rt = to_runtime(layer_idx, t) if to_runtime is not None else None
            if pin_memory and rt is not None:
                with st.stage("pin"):
                    rt = pin(rt)
            if src is not None and preload is not None:
                preload(layer_idx, src)  # the first group of experts, read here too (off the main thread)
            return LayerData(t, rt, src)

        super().__init__(load, layers, depth=1 if prefetch else 0, stats=st, kind="layer", name="lowmoe-layer-reader")

    def taken(self, out: LayerData) -> None:
        if out.experts is not None and hasattr(out.experts, "adopt_preloaded"):
            out.experts.adopt_preloaded()  # the layer's group is the computing layer's now


class Readahead:
    """Asks the kernel to read a checkpoint's shards into the page cache, in the order a pass reads
    them (the embedding's shard, then each layer's), on a thread of its own, up to ``limit`` bytes.

    A pass starts with seconds of work that touch no weight: importing transformers' tokenizer and
    modeling code (6-10 s on a GPU machine with a full Python stack, 2 s on a slim one; docs/gpu.md),
    tokenizing the calibration text, building the layer skeleton. The disk is idle all that time;
    with this it reads the first layers meanwhile, so the pass's own reads of them come from memory.
    ``posix_fadvise(WILLNEED)`` only queues reads: nothing is held in this process (the page cache is
    the kernel's, and it gives it back under memory pressure), and no byte that a pass computes with
    changes. Where the call does not exist (macOS), it does nothing."""

    STEP = 64 << 20  # advice per call: stopping is at most this late

    def __init__(self, ck, limit: int):
        self.limit = max(0, int(limit))
        self.bytes = 0  # advised so far
        self._stop = threading.Event()
        self._paths = shard_read_order(ck)
        self._thread = None
        if self.limit and self._paths and hasattr(os, "posix_fadvise"):
            self._thread = threading.Thread(target=self._run, name="lowmoe-readahead", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for path in self._paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # the pass reports a missing or unreadable shard itself
            try:
                size, off = os.fstat(fd).st_size, 0
                while off < size and self.bytes < self.limit and not self._stop.is_set():
                    n = min(self.STEP, size - off, self.limit - self.bytes)
                    os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
                    off += n
                    self.bytes += n
            except OSError as e:
                log.debug("readahead of %s stopped: %s", path, e)
                return
            finally:
                os.close(fd)
            if self.bytes >= self.limit or self._stop.is_set():
                return

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait until every byte up to the limit was advised (or ``stop``)."""
        if self._thread is not None:
            self._thread.join(timeout)


def shard_read_order(ck) -> list:
    """The checkpoint's shard files in the order a pass first needs them: the embedding's, then each
    layer's in turn, then the rest."""
    names: list[str] = []
    keys = ["model.embed_tokens.weight"] + [k for L in range(ck.num_layers) for k in ck.layer_keys(L)] + list(ck.weight_map)
    for k in keys:
        name = ck.weight_map.get(k)
        if name is not None and name not in names:
            names.append(name)
    return [ck.path / n for n in names]


class WriteBehind:
    """Runs ``write`` calls on one background thread, in order; ``flush()`` waits for all of them.

    Used for activation-cache chunks: the next chunk computes while the previous one is saved.
    At most ``max_pending`` writes are queued (each holds its tensor), so memory stays bounded.
    """

    def __init__(self, enabled: bool = True, stats: IOStats | None = None, kind: str = "cache_write", max_pending: int = 2):
        self.enabled, self.stats, self.kind, self.max_pending = enabled, stats or IOStats(), kind, max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowmoe-write") if enabled else None
        self._pending: list[Future] = []

    def _timed(self, fn: Callable, args: tuple, nbytes: int) -> None:
        t0 = time.perf_counter()
        fn(*args)
        self.stats.add_read(self.kind, time.perf_counter() - t0, nbytes)

    def submit(self, fn: Callable, *args, nbytes: int = 0) -> None:
        if not self.enabled:
            t0 = time.perf_counter()
            self._timed(fn, args, nbytes)
            self.stats.add_wait(self.kind, time.perf_counter() - t0)
            return
        while len(self._pending) >= self.max_pending:
            self._wait(self._pending.pop(0))
        self._pending.append(self._pool.submit(self._timed, fn, args, nbytes))

    def _wait(self, fut: Future) -> None:
        t0 = time.perf_counter()
        fut.result()
        self.stats.add_wait(self.kind, time.perf_counter() - t0)

    def flush(self) -> None:
        while self._pending:
            self._wait(self._pending.pop(0))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class DeviceStager:
    """Host->device copies on a side CUDA stream, so they overlap with compute on the main stream.

    ``stage(tensors)`` enqueues non-blocking copies (casting on the device afterwards is cheaper
    than on the host) and returns a handle; ``handle.wait()`` makes the current stream wait for the
    copies and returns the device tensors. On CPU it casts synchronously (nothing to overlap).
    Source tensors should be pinned for the copy to be truly asynchronous.
    """

    def __init__(self, device: torch.device, stats: IOStats | None = None, kind: str = "experts"):
        self.device = torch.device(device)
        self.stats, self.kind = stats or IOStats(), kind
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    def stage(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
              check_finite: bool = False) -> "Staged":
        """Copy ``tensors`` to the device and cast floating ones to ``dtype``. ``check_finite`` (CUDA):
        also look for NaN/Inf in the floating tensors as copied, before the cast (the weights as stored,
        what a host-side check would see), on the side stream; ``Staged.finite`` holds the answer."""
        t0 = time.perf_counter()
        if self.stream is None:
            out = {k: v.to(dtype=dtype) if dtype is not None and v.is_floating_point() else v for k, v in tensors.items()}
            self.stats.add_read(self.kind, time.perf_counter() - t0, tensors_nbytes(tensors))
            return Staged(out, None, self.stats, self.kind)
        # The side stream must not start copying before the main stream has finished with whatever
        # memory the caching allocator hands these tensors (they may reuse freed blocks).
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out, flags = {}, []
            for k, v in tensors.items():
                d = v.to(self.device, non_blocking=True)
                if check_finite and d.is_floating_point():
                    flags.append(finite_flag(d))
                out[k] = d.to(dtype) if dtype is not None and d.is_floating_point() else d
            event = torch.cuda.Event()
            event.record(self.stream)
            staged = Staged(out, event, self.stats, self.kind)
            if flags:  # to the host on the side stream: reading it never waits for the main stream
                staged.finite = torch.empty((), dtype=torch.bool, pin_memory=True)
                staged.finite.copy_(torch.stack(flags).all(), non_blocking=True)
                staged.finite_ready = torch.cuda.Event()
                staged.finite_ready.record(self.stream)
        self.stats.add_read(self.kind, time.perf_counter() - t0, tensors_nbytes(tensors))
        return staged


class Staged:
    def __init__(self, tensors: dict[str, torch.Tensor], event, stats: IOStats, kind: str):
        self.tensors, self.event, self.stats, self.kind = tensors, event, stats, kind
        self.waited = False  # the event stays: it also marks when the copy out of the host buffer is done
        self.finite = None  # with ``stage(check_finite=True)``: whether the weights as copied are finite
        self.finite_ready = None  # recorded on the side stream once ``finite`` is computed

    def wait(self) -> dict[str, torch.Tensor]:
        if self.event is not None and not self.waited:
            t0 = time.perf_counter()
            cur = torch.cuda.current_stream()
            cur.wait_event(self.event)
            # Tensors made on the side stream and used on this one: tell the allocator, so their
            # memory is not reused by the side stream while kernels here still read it.
            for v in self.tensors.values():
                v.record_stream(cur)
            self.stats.add_wait(self.kind, time.perf_counter() - t0)
            self.waited = True
        return self.tensors
