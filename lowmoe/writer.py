"""Incremental writing of output shards.

Tensors are added unit by unit (one decoder layer, then the rest). The writer buffers them and
flushes a shard as soon as adding the next tensor would exceed ``max_shard_bytes``. Shards are
written under temporary names (``.tmp-00001.safetensors``) and renamed to
``model-00001-of-0000N.safetensors`` by ``finalize``, which writes ``model.safetensors.index.json``
LAST: a directory without an index is never a finished checkpoint.

Resume: the writer's state after a unit is (temporary shards flushed so far, keys still buffered).
The buffered tensors are not persisted; on resume the pipeline re-adds the units that produced
them (their plan is in the manifest and applying a plan is deterministic), which replays the same
flush decisions and so produces the same bytes as a run that never stopped.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import OutputError

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


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[dict] = []  # [{"tmp": name, "keys": [...], "bytes": n}]
        self.total_bytes = 0
        self.bytes_written = 0

    # ---- state for resume ----------------------------------------------------------------
    def state(self) -> dict:
        return {"shards": self.shards, "buffered_keys": list(self.buffer), "total_bytes": self.total_bytes}

    def restore(self, state: dict) -> None:
        """Take back flushed shards from a manifest; buffered tensors must be re-added by the caller."""
        self.shards = [dict(s) for s in state["shards"]]
        for s in self.shards:
            if not (self.out_dir / s["tmp"]).is_file():
                raise OutputError(f"{self.out_dir / s['tmp']}: shard recorded in the resume manifest is missing; rerun with --overwrite")
        self.total_bytes = sum(s["bytes"] for s in self.shards)
        self.buffer, self.buffer_bytes = {}, 0

    # ---- writing -------------------------------------------------------------------------
    def add(self, key: str, tensor: torch.Tensor) -> None:
        n = tensor_nbytes(tensor)
        if self.buffer and self.buffer_bytes + n > self.max_shard_bytes:
            self.flush()
        self.buffer[key] = tensor.contiguous()
        self.buffer_bytes += n
        self.total_bytes += n

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, t in tensors.items():
            self.add(k, t)

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f".tmp-{len(self.shards) + 1:05d}.safetensors"
        path = self.out_dir / name
        try:
            save_file(self.buffer, str(path), metadata={"format": "pt"})
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OutputError(f"{self.out_dir}: disk full while writing {name}; free space (the output needs about "
                                  f"{self.total_bytes / 1e9:.1f} GB so far) and rerun with --resume") from None
            raise OutputError(f"{path}: cannot write shard ({e})") from None
        except Exception as e:  # safetensors wraps I/O errors in its own exception type
            if "No space left" in str(e):
                raise OutputError(f"{self.out_dir}: disk full while writing {name}; free space and rerun with --resume") from None
            raise
        self.shards.append({"tmp": name, "keys": list(self.buffer), "bytes": self.buffer_bytes})
        self.bytes_written += self.buffer_bytes
        log.debug("flushed %s (%d tensors, %.1f MB)", name, len(self.buffer), self.buffer_bytes / 1e6)
        self.buffer, self.buffer_bytes = {}, 0

    def finalize(self) -> dict[str, str]:
        """Flush, rename temporary shards to their final names and write the index (last)."""
        self.flush()
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        umask = os.umask(0)
        os.umask(umask)
        for i, s in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.chmod(self.out_dir / s["tmp"], 0o666 & ~umask)  # safetensors creates files 0600
            os.replace(self.out_dir / s["tmp"], self.out_dir / final)
            for k in s["keys"]:
                weight_map[k] = final
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
        tmp = self.out_dir / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, self.out_dir / INDEX_NAME)
        return weight_map
