"""Incremental writing of output shards.

Tensors are added unit by unit (one decoder layer, then the rest) and streamed straight into the
current shard file; a new shard starts as soon as adding the next tensor would exceed
``max_shard_bytes``, so peak memory is one tensor, not one shard. Shards are
written under temporary names (``.tmp-00001.safetensors``) and renamed to
``model-00001-of-0000N.safetensors`` by ``finalize``, which writes ``model.safetensors.index.json``
LAST: a directory without an index is never a finished checkpoint.

Besides tensors, ``add`` takes stored entries (anything with ``nbytes``, ``dtype`` -- the safetensors
code --, ``shape`` and ``copy_to(file)``, e.g. ``lazy.StoredTensor``): their bytes are copied from the
input shard into the output shard without being decoded (kept experts of a pruned layer).

Resume: the writer's state after a unit is (temporary shards finished so far, keys of the shard
still being written). The unfinished shard is started again on resume: the pipeline re-adds the
units that produced its tensors (their plan is in the manifest and applying a plan is deterministic), which replays the same
flush decisions and so produces the same bytes as a run that never stopped. ``finalize`` may itself be
stopped half-way: a finished shard is found under its temporary or its final name.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch

from ..errors import OutputError
from . import faults
from .checkpoint import ST_TORCH

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


def parse_size(text: str | int) -> int:
    """'5GB', '500MiB', '2e9' or an int -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            num = s[: -len(u)]
            try:
                return int(float(num) * units[u])
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise ValueError(f"cannot parse size {text!r} (expected e.g. 5GB, 500MiB or a byte count)") from None


def tensor_nbytes(t) -> int:
    """Bytes of a tensor, or of a stored entry (``lazy.StoredTensor``: ``nbytes``)."""
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return int(t.nbytes)


# safetensors dtype names (the format's own spelling), from the reader's table.
_ST_DTYPES = {dtype: code for code, dtype in ST_TORCH.items()}


class OpenShard:
    """A safetensors file written tensor by tensor.

    safetensors has no append mode and ``save_file`` needs every tensor in memory at once, which
    would make peak RAM one whole output shard. Instead the file is laid out as the format
    specifies (u64 header length, JSON header, raw data) with room reserved for the header: tensor
    bytes are streamed to disk as they arrive and the header is written into the reserved space at
    the end, padded with spaces (which the format allows). If the header outgrows the reservation
    the data is moved once to make room.
    """

    def __init__(self, path: Path, reserve: int, metadata: dict[str, str] | None = None):
        self.path = path
        self.reserve = reserve
        self.metadata = {"format": "pt", **(metadata or {})}
        self.f = open(path, "wb")
        self.f.write(b"\0" * (8 + reserve))
        self.entries: dict[str, dict] = {}
        self.offset = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):  # a stored entry: its bytes copied from the input shard as they are
            self.f.flush()
            t.copy_to(self.f)
            n = int(t.nbytes)
            self.entries[key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [self.offset, self.offset + n]}
            self.offset += n
            return
        if t.dtype not in _ST_DTYPES:
            raise OutputError(f"tensor {key}: dtype {t.dtype} cannot be stored in safetensors")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.f.write(memoryview(data))
        n = data.nbytes
        self.entries[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [self.offset, self.offset + n]}
        self.offset += n
        faults.point("shard-write", self.path)

    def add_parts(self, key: str, dtype: torch.dtype, shape: list[int], parts) -> None:
        """One tensor written from consecutive pieces (``parts``: tensors of ``dtype`` whose bytes, in
        order, are the tensor's), each piece written as it comes and none held afterwards: a tensor
        bigger than the memory at hand. OutputError when the pieces do not add up to ``shape``."""
        if dtype not in _ST_DTYPES:
            raise OutputError(f"tensor {key}: dtype {dtype} cannot be stored in safetensors")
        n = 0
        for t in parts:
            if t.dtype != dtype:
                raise OutputError(f"tensor {key}: a piece of dtype {t.dtype}, expected {dtype}")
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            self.f.write(memoryview(data))
            n += data.nbytes
        want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if n != want:
            raise OutputError(f"tensor {key}: pieces of {n} bytes in all, expected {want} for shape {list(shape)}")
        self.entries[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [self.offset, self.offset + n]}
        self.offset += n
        faults.point("shard-write", self.path)

    def close(self) -> None:
        header = {"__metadata__": self.metadata, **{k: self.entries[k] for k in sorted(self.entries)}}
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) <= self.reserve:
            self.f.seek(0)
            self.f.write(len(raw + b" " * (self.reserve - len(raw))).to_bytes(8, "little"))
            self.f.write(raw + b" " * (self.reserve - len(raw)))
            self.f.close()
            return
        self.f.close()  # header larger than reserved: rewrite once with the exact header size
        size = (len(raw) + 7) // 8 * 8
        tmp = self.path.with_name(self.path.name + ".grow")
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(size.to_bytes(8, "little"))
            dst.write(raw + b" " * (size - len(raw)))
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(tmp, self.path)


class ShardWriter:
    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        # Header room per shard: ~120 bytes per tensor; tiny shards get a small reservation.
        self.header_reserve = int(min(1 << 20, max(4096, max_shard_bytes // 256)) + 7) // 8 * 8
        self.current: OpenShard | None = None
        self.buffer_bytes = 0
        self.shards: list[dict] = []  # [{"tmp": name, "keys": [...], "bytes": n}]
        self.total_bytes = 0
        self.bytes_written = 0

    @property
    def buffer(self) -> dict:
        """Keys of the shard being written (in order), for resume bookkeeping."""
        return dict.fromkeys(self.current.entries) if self.current else {}

    # ---- state for resume ----------------------------------------------------------------
    def state(self) -> dict:
        return {"shards": self.shards, "buffered_keys": list(self.buffer), "total_bytes": self.total_bytes}

    def restore(self, state: dict) -> None:
        """Take back finished shards from a manifest; the keys of the shard that was being written
        must be re-added by the caller (the partial file is started again)."""
        self.shards = [dict(s) for s in state["shards"]]
        for i, s in enumerate(self.shards, 1):
            if not (self.out_dir / s["tmp"]).is_file() and not list(self.out_dir.glob(f"model-{i:05d}-of-*.safetensors")):
                raise OutputError(f"{self.out_dir / s['tmp']}: shard recorded in the resume manifest is missing; rerun with --overwrite")
        self.total_bytes = sum(s["bytes"] for s in self.shards)
        self.current, self.buffer_bytes = None, 0

    # ---- writing -------------------------------------------------------------------------
    def add(self, key: str, tensor: torch.Tensor) -> None:
        n = tensor_nbytes(tensor)
        if self.current is not None and self.current.entries and self.buffer_bytes + n > self.max_shard_bytes:
            self.flush()
        if self.current is None:
            self.current = OpenShard(self.out_dir / f".tmp-{len(self.shards) + 1:05d}.safetensors", self.header_reserve)
        try:
            self.current.add(key, tensor)
        except OSError as e:
            self._io_error(e)
        self.buffer_bytes += n
        self.total_bytes += n

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, t in tensors.items():
            self.add(k, t)

    def _io_error(self, e: OSError):
        name = self.current.path.name if self.current else "shard"
        if e.errno == errno.ENOSPC:
            raise OutputError(f"{self.out_dir}: disk full while writing {name}; free space (the output needs about "
                              f"{self.total_bytes / 1e9:.1f} GB so far) and rerun the same command with --resume") from None
        raise OSError(e.errno, e.strerror, str(e.filename or self.out_dir / name)) from None  # rundir.output_os_error words it

    def flush(self) -> None:
        if self.current is None:
            return
        try:
            self.current.close()
            faults.point("shard-close", self.current.path)
        except OSError as e:
            self._io_error(e)
        self.shards.append({"tmp": self.current.path.name, "keys": list(self.current.entries), "bytes": self.buffer_bytes})
        self.bytes_written += self.buffer_bytes
        log.debug("wrote %s (%d tensors, %.1f MB)", self.current.path.name, len(self.current.entries), self.buffer_bytes / 1e6)
        self.current, self.buffer_bytes = None, 0

    def finalize(self) -> dict[str, str]:
        """Flush, rename temporary shards to their final names and write the index (last)."""
        self.flush()
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        umask = os.umask(0)
        os.umask(umask)
        for i, s in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            tmp = self.out_dir / s["tmp"]
            if tmp.is_file() or not (self.out_dir / final).is_file():  # else: renamed before a kill
                os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files 0600
                os.replace(tmp, self.out_dir / final)
                faults.point("shard-rename", self.out_dir / final)
            for k in s["keys"]:
                weight_map[k] = final
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
        tmp = self.out_dir / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        faults.point("index", self.out_dir / INDEX_NAME)
        os.replace(tmp, self.out_dir / INDEX_NAME)
        return weight_map
