"""A layer's chunks are queued without the host waiting for each one's kernels.

On a GPU, reading a chunk's NaN/Inf check (``bool(flag)``) or synchronising after its forward makes
the host wait until the device has run it before it may queue the next chunk. A pass now takes every
held chunk's flag without reading it, reads them all in one copy at the layer's end, and raises the
first bad chunk's error as a per-chunk check would have; a chunk written to the disk cache is checked
on its host copy as it is written, so none reaches the disk unchecked. CUDA events time the kernels
(stage ``compute_device``); tests/test_gpu.py checks that on a card.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import lowmoe
from lowmoe.engine import cache as cache_mod
from lowmoe.engine.cache import FiniteChecks
from lowmoe.engine.device import DeviceTimer
from lowmoe.errors import CalibrationError
from lowmoe.score import score

OPTS = dict(n_samples=8, seq_len=16, batch_size=2, progress=False, device="cpu")


class Reads(TorchDispatchMode):
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        Reads.n += str(func) in ("aten._local_scalar_dense.default", "aten.is_nonzero.default")
        return func(*args, **(kwargs or {}))


def test_checks_are_taken_without_a_read_and_the_first_bad_chunk_is_named():
    checks = FiniteChecks()
    good = torch.ones(2, 3)
    Reads.n = 0
    with Reads():
        for c in range(5):
            h = good.clone()
            if c in (2, 4):
                h[1, 1] = float("nan") if c == 2 else float("inf")
            checks.add(3, c, h)
        checks.add(3, 9, torch.zeros(2, dtype=torch.long))  # not floating point: nothing to check
    assert Reads.n == 0
    with pytest.raises(CalibrationError, match=r"the outputs of layer 2 contain NaN/Inf on calibration chunk 2 "):
        checks.raise_first()
    checks.raise_first()  # read once: nothing left
    for c in range(3):
        checks.add(0, c, good)
    checks.raise_first()


def test_the_device_timer_times_nothing_off_cuda():
    timer = DeviceTimer(torch.device("cpu"))
    with timer:
        torch.ones(3).sum()
    assert timer.seconds() is None


def test_a_pass_reads_each_layers_checks_once(synth_dir, calib_txt, monkeypatch):
    """Held chunks (a non-resumable score keeps every chunk in memory here) are not checked one at a
    time; each layer's forward reads its checks once, and the token embeddings once."""
    per_chunk, reads = [], []
    monkeypatch.setattr(cache_mod, "all_finite", lambda t: per_chunk.append(t.shape) or True)
    orig = FiniteChecks.raise_first

    def raise_first(self):
        reads.append(len(self._flags))
        return orig(self)

    monkeypatch.setattr(FiniteChecks, "raise_first", raise_first)
    rep = score(synth_dir("mixtral"), calib=[calib_txt], method="frequency", **OPTS)
    layers = 3  # synth_dir's default
    assert rep["activations"]["held_bytes"] > 0 and not per_chunk
    assert len(reads) == 1 + layers and set(reads) == {OPTS["n_samples"] // OPTS["batch_size"]}
    assert "compute_device" not in rep["stages"], "CUDA events only"


def _overflowing(synth_dir, tmp_path):
    """A model whose layer 0 outputs overflow float32 (finite weights, Inf activations)."""
    model = tmp_path / "model"
    shutil.copytree(synth_dir("mixtral", layers=2), model)
    key = "model.layers.0.self_attn.o_proj.weight"
    wm = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = load_file(str(model / wm[key]))
    tensors[key].fill_(3e38)
    save_file(tensors, str(model / wm[key]), metadata={"format": "pt"})
    return model


def test_a_bad_chunk_is_named_and_never_reaches_the_resumable_cache(synth_dir, calib_txt, tmp_path, monkeypatch):
    written = []
    orig = cache_mod.ActivationCache.write

    def write(self, boundary, chunk, hidden, stream="main", checked=False):
        orig(self, boundary, chunk, hidden, stream, checked)
        written.append((boundary, chunk, bool(torch.isfinite(hidden).all())))

    monkeypatch.setattr(cache_mod.ActivationCache, "write", write)
    with pytest.raises(CalibrationError, match="the outputs of layer 0 contain NaN/Inf on calibration chunk 0 "):
        lowmoe.prune(_overflowing(synth_dir, tmp_path), tmp_path / "out", keep=4, method="frequency",
                     calib=[calib_txt], **OPTS)
    assert written and all(finite for _, _, finite in written), written  # the embeddings, never layer 0's outputs
    assert {b for b, _, _ in written} == {0}
