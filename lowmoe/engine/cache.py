"""Disk cache of hidden states between decoder layers.

Boundary ``b`` holds the input of layer ``b`` (boundary 0 = the token embeddings), one
safetensors file per chunk of sequences. Only the boundaries in use are kept on disk: the
pipeline drops boundary L once layer L's outputs (boundary L+1) are written. Peak RAM is one
chunk, whatever the calibration size. Several streams (e.g. EEP candidates) use distinct
``stream`` names under the same root.

Each chunk is written to a temporary name and renamed, so a chunk on disk is always whole (a run
killed mid-write redoes it on ``--resume``). A chunk holding NaN/Inf is refused: the statistics
of every later layer would be garbage.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CalibrationError
from . import faults


class ActivationCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.bytes_written = 0

    def _dir(self, boundary: int, stream: str = "main") -> Path:
        return self.root / stream / f"b{boundary:04d}"

    def write(self, boundary: int, chunk: int, hidden: torch.Tensor, stream: str = "main") -> None:
        if hidden.is_floating_point() and not bool(torch.isfinite(hidden).all()):
            where = "the token embeddings" if boundary == 0 else f"the outputs of layer {boundary - 1}"
            raise CalibrationError(f"{where} contain NaN/Inf on calibration chunk {chunk} (sequences from "
                                   f"{chunk}x--batch-size); check that layer's weights, or use --dtype fp32 if it overflows")
        d = self._dir(boundary, stream)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".c{chunk:05d}.tmp"
        save_file({"h": hidden.detach().to("cpu").contiguous()}, str(tmp))
        faults.point("cache-write", tmp)
        tmp.replace(d / f"c{chunk:05d}.safetensors")
        self.bytes_written += hidden.numel() * hidden.element_size()

    def read(self, boundary: int, chunk: int, stream: str = "main", device="cpu") -> torch.Tensor:
        return load_file(str(self._dir(boundary, stream) / f"c{chunk:05d}.safetensors"), device=str(device))["h"]

    def has(self, boundary: int, num_chunks: int, stream: str = "main") -> bool:
        d = self._dir(boundary, stream)
        return all((d / f"c{c:05d}.safetensors").is_file() for c in range(num_chunks))

    def drop(self, boundary: int, stream: str = "main") -> None:
        shutil.rmtree(self._dir(boundary, stream), ignore_errors=True)

    def drop_stream(self, stream: str) -> None:
        shutil.rmtree(self.root / stream, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
