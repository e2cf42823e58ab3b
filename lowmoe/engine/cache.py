"""Disk cache of hidden states between decoder layers.

Boundary ``b`` holds the input of layer ``b`` (boundary 0 = the token embeddings), one
safetensors file per chunk of sequences. Only the boundaries in use are kept on disk: the
pipeline drops boundary L once layer L's outputs (boundary L+1) are written. Peak RAM is one
chunk, whatever the calibration size. Several streams (e.g. EEP candidates) use distinct
``stream`` names under the same root.

Each chunk is written to a temporary name and renamed, so a chunk on disk is always whole (a run
killed mid-write redoes it on ``--resume``). A chunk holding NaN/Inf is refused: the statistics
of every later layer would be garbage.

**Held in memory when they fit.** ``hold(nbytes)`` lets the cache keep up to ``nbytes`` of chunks as
the tensors they are (on the GPU for a CUDA run): ``keep`` stores a chunk there and ``read`` returns
it without touching the disk or copying it. With ``persist`` (a prune, which can be resumed) a kept
chunk is also written to disk, by the caller's background writer; without (``lowmoe score``, a
streaming eval: nothing to resume) it never reaches the disk. ``Stream`` decides how much to hold
from the budgets (``stream.activation_memory``). ``put`` is the same for passes with many streams
(EEP's candidates): held while they fit, the least recently used written to disk to make room.
"""

from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CalibrationError
from . import faults
from .device import all_finite, finite_flag


class ActivationCache:
    def __init__(self, root: Path, *, persist: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.bytes_written = 0
        self.persist = persist  # chunks kept in memory are written to disk too (for --resume)
        self.memory_limit = 0  # bytes of chunks that may be kept in memory (``hold``)
        self.memory_bytes = 0  # bytes kept now
        self.memory_peak = 0
        self._mem: OrderedDict[tuple[str, int, int], torch.Tensor] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()  # a pass's chunk reader thread reads while its main thread keeps
        self.spilled_bytes = 0  # held chunks written to disk to make room (``put``)

    def hold(self, nbytes: int) -> None:
        """Keep up to ``nbytes`` of chunks in memory from now on (``keep``)."""
        self.memory_limit = max(0, int(nbytes))

    def fits(self, nbytes: int) -> bool:
        """Whether a chunk of ``nbytes`` can be kept in memory now."""
        return self.memory_bytes + nbytes <= self.memory_limit

    def keep(self, boundary: int, chunk: int, hidden: torch.Tensor, stream: str = "main", checked: bool = False,
             checks: FiniteChecks | None = None) -> None:
        """Hold ``hidden`` (any device) as chunk ``chunk`` of ``boundary``; ``read`` returns it as is.
        Unless ``checked``, refuse NaN/Inf now, or with ``checks`` when they are read (``FiniteChecks``)."""
        if checks is not None and not checked:
            checks.add(boundary, chunk, hidden)
        elif not checked:
            _check_finite(hidden, boundary, chunk)
        key = (stream, boundary, chunk)
        with self._lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self.memory_bytes -= _nbytes(old)
            self._mem[key] = hidden.detach()
            self.memory_bytes += _nbytes(hidden)
            self.memory_peak = max(self.memory_peak, self.memory_bytes)

    def put(self, boundary: int, chunk: int, hidden: torch.Tensor, stream: str = "main",
            checks: FiniteChecks | None = None) -> None:
        """Store the chunk: in memory (``keep``) when it fits the ``hold`` limit, after writing the
        least recently used held chunks to disk to make room; on disk when it alone is larger. For
        passes with many streams (EEP's candidates): the chunks read next stay in memory, the ones
        not touched for longest go to disk, and nothing is lost (``read`` finds either)."""
        n = _nbytes(hidden)
        if n > self.memory_limit:
            self.write(boundary, chunk, hidden, stream)
            return
        if checks is not None:  # read with the layer's others (``FiniteChecks``)
            checks.add(boundary, chunk, hidden)
        else:
            _check_finite(hidden, boundary, chunk)
        with self._lock:
            self.forget(lambda k: k == (stream, boundary, chunk))  # replaced, not spilled
            while self._mem and self.memory_bytes + n > self.memory_limit:
                (s, b, c), old = next(iter(self._mem.items()))  # the least recently used
                # a chunk whose check is still queued is checked as it is written (copied to the host anyway)
                self.write(b, c, old, s, checked=checks is None)
                self.spilled_bytes += _nbytes(old)
                self.forget(lambda k, key=(s, b, c): k == key)
            self.keep(boundary, chunk, hidden, stream, checked=True)

    def in_memory(self, boundary: int, chunk: int, stream: str = "main") -> bool:
        return (stream, boundary, chunk) in self._mem

    def _dir(self, boundary: int, stream: str = "main") -> Path:
        return self.root / stream / f"b{boundary:04d}"

    def write(self, boundary: int, chunk: int, hidden: torch.Tensor, stream: str = "main", checked: bool = False) -> None:
        """Write the chunk to disk (``checked``: already checked for NaN/Inf by ``keep``)."""
        if not checked:
            _check_finite(hidden, boundary, chunk)
        d = self._dir(boundary, stream)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".c{chunk:05d}.tmp"
        save_file({"h": hidden.detach().to("cpu").contiguous()}, str(tmp))
        faults.point("cache-write", tmp)
        tmp.replace(d / f"c{chunk:05d}.safetensors")
        self.bytes_written += hidden.numel() * hidden.element_size()

    def read(self, boundary: int, chunk: int, stream: str = "main", device="cpu") -> torch.Tensor:
        """The chunk: the kept tensor itself (wherever it is) when held in memory, else read from disk
        onto ``device``."""
        key = (stream, boundary, chunk)
        with self._lock:
            held = self._mem.get(key)
            if held is not None:
                self._mem.move_to_end(key)  # now the most recently used
                return held
        return load_file(str(self._dir(boundary, stream) / f"c{chunk:05d}.safetensors"), device=str(device))["h"]

    def has(self, boundary: int, num_chunks: int, stream: str = "main") -> bool:
        d = self._dir(boundary, stream)
        return all((stream, boundary, c) in self._mem or (d / f"c{c:05d}.safetensors").is_file() for c in range(num_chunks))

    def forget(self, match) -> None:
        """Drop the held chunks whose key ``(stream, boundary, chunk)`` matches (their disk copies stay)."""
        with self._lock:
            for key in [k for k in self._mem if match(k)]:
                self.memory_bytes -= _nbytes(self._mem.pop(key))

    def drop(self, boundary: int, stream: str = "main") -> None:
        self.forget(lambda k: k[0] == stream and k[1] == boundary)
        shutil.rmtree(self._dir(boundary, stream), ignore_errors=True)

    def drop_stream(self, stream: str) -> None:
        self.forget(lambda k: k[0] == stream)
        shutil.rmtree(self.root / stream, ignore_errors=True)

    def clear(self) -> None:
        self.forget(lambda k: True)
        shutil.rmtree(self.root, ignore_errors=True)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_finite(hidden: torch.Tensor, boundary: int, chunk: int) -> None:
    if hidden.is_floating_point() and not all_finite(hidden):
        raise nonfinite_chunk_error(boundary, chunk)


def nonfinite_chunk_error(boundary: int, chunk: int) -> CalibrationError:
    where = "the token embeddings" if boundary == 0 else f"the outputs of layer {boundary - 1}"
    return CalibrationError(f"{where} contain NaN/Inf on calibration chunk {chunk} (sequences from "
                            f"{chunk}x--batch-size); check that layer's weights, or use --dtype fp32 if it overflows")


class FiniteChecks:
    """NaN/Inf checks of chunks held on a device, read together once a layer's chunks have all been
    queued: ``add`` takes a chunk's flag without reading it (on a GPU, reading it would make the host
    wait for the chunk's kernels before it may queue the next chunk's), ``raise_first`` reads every
    flag in one copy and raises the first chunk's error, as a check per chunk would have."""

    def __init__(self):
        self._flags: list[tuple[int, int, torch.Tensor]] = []

    def add(self, boundary: int, chunk: int, hidden: torch.Tensor) -> None:
        if hidden.is_floating_point():
            self._flags.append((boundary, chunk, finite_flag(hidden)))

    def raise_first(self) -> None:
        flags, self._flags = self._flags, []
        if not flags:
            return
        ok = torch.stack([f for *_, f in flags]).tolist()  # one read (a pass holds its chunks on one device)
        for (boundary, chunk, _), good in zip(flags, ok):
            if not good:
                raise nonfinite_chunk_error(boundary, chunk)
