"""FP8 re-quantization and its round-trip error computed a band of block rows at a time: the same
bytes and scales as the whole-tensor formula for any shape, input dtype and scale dtype, the same
error figures, and float32 temporaries bounded by ``SCRATCH_BYTES`` rather than by the tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lowmoe.engine import formats
from lowmoe.engine.formats import FP8_DTYPE, FP8_MAX, QuantFormat, fp8_block_dequantize, fp8_block_quantize


def _reference_quantize(w, block, scale_dtype=torch.float32):
    """The whole-tensor FP8 block quantizer that the banded one replaced (kept verbatim as the reference)."""
    rows, cols = w.shape[-2:]
    bo, bi = block
    R, C = -(-rows // bo), -(-cols // bi)
    x = w.float()
    pad = torch.zeros((*x.shape[:-2], R * bo, C * bi), dtype=torch.float32, device=x.device)
    pad[..., :rows, :cols] = x
    amax = pad.unflatten(-1, (C, bi)).unflatten(-3, (R, bo)).abs().amax(dim=(-3, -1))
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    y = x / s.float().repeat_interleave(bo, dim=-2)[..., :rows, :].repeat_interleave(bi, dim=-1)[..., :cols]
    q = y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, s


def _reference_roundtrip(parts, logical, w, block):
    """max |err| / max |w| and ||err|| / ||w|| of the whole tensor at once, in float64."""
    q, s = parts[logical], parts[logical + "_scale_inv"]
    err = fp8_block_dequantize(q, s, block, torch.float32).double() - w.double()
    amax, norm = w.double().abs().max().item(), w.double().norm().item()
    return {"max_abs_rel": err.abs().max().item() / amax if amax else 0.0,
            "fro_rel": err.norm().item() / norm if norm else 0.0}


def _weights(shape, dtype, seed):
    """Values over a wide dynamic range (per-row magnitudes 1e-4 .. 1e3) with an all-zero block at
    the top left, so scales round differently in bf16 and some values reach the clamp."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g) * 3).clamp(1e-4, 1e3)
    w[..., :8, :8] = 0
    return w.to(dtype)


CASES = [  # shape, block, input dtype
    ((300, 200), (128, 128), torch.float32),
    ((300, 200), (128, 128), torch.bfloat16),
    ((3, 100, 72), (32, 16), torch.bfloat16),
    ((2, 65, 33), (16, 8), torch.float16),
    ((2, 3, 40, 24), (8, 8), torch.float32),
    ((128, 256), (32, 32), torch.float32),
    ((7, 5), (128, 128), torch.bfloat16),
]


def _same(got, want):
    assert got[0].dtype == FP8_DTYPE and got[0].shape == want[0].shape
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    assert got[1].dtype == want[1].dtype and torch.equal(got[1], want[1])


@pytest.mark.parametrize("scratch", [1 << 30, 4096])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, block, dtype", CASES)
def test_banded_fp8_quantize_is_bit_identical(monkeypatch, scratch, scale_dtype, shape, block, dtype):
    """One step (large scratch) or one block row a step (4 KiB): the same bytes and scales."""
    monkeypatch.setattr(formats, "SCRATCH_BYTES", scratch)
    w = _weights(shape, dtype, seed=len(shape) + shape[-1])
    _same(fp8_block_quantize(w, block, scale_dtype), _reference_quantize(w, block, scale_dtype))


def test_banded_fp8_quantize_uses_several_bands(monkeypatch):
    """A band of 2 block rows over 300 rows (ragged last band), checked against the reference."""
    monkeypatch.setattr(formats, "SCRATCH_BYTES", 8 * 2 * 16 * 64)  # 2 block rows of (16, 64) padded
    w = _weights((300, 50), torch.bfloat16, seed=3)
    got = fp8_block_quantize(w, (16, 16), torch.bfloat16)
    _same(got, _reference_quantize(w, (16, 16), torch.bfloat16))


def test_fp8_quantize_special_values_and_layouts(monkeypatch):
    """inf, nan, a subnormal or zero scale and a transposed (non-contiguous) input: the same bytes."""
    monkeypatch.setattr(formats, "SCRATCH_BYTES", 4096)
    w = _weights((96, 80), torch.float32, seed=5)
    w[20, 30], w[40, 70], w[70, 3] = float("inf"), float("nan"), float("-inf")
    w[80:96, 64:80] = 1e-42  # amax / 448: a subnormal float32 scale, zero in bf16
    for x in (w, w.t(), w[::2], w.to(torch.bfloat16).t()):
        for scale_dtype in (torch.float32, torch.bfloat16):
            _same(fp8_block_quantize(x, (16, 16), scale_dtype), _reference_quantize(x, (16, 16), scale_dtype))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (2, 0, 7), (0, 3, 4)])
def test_fp8_quantize_empty(shape):
    w = torch.empty(shape, dtype=torch.bfloat16)
    _same(fp8_block_quantize(w, (4, 4), torch.bfloat16), _reference_quantize(w, (4, 4), torch.bfloat16))
    fmt = QuantFormat("fp8", (4, 4))
    assert fmt.roundtrip_of(fmt.quantize("x.weight", w), "x.weight", w) == {"max_abs_rel": 0.0, "fro_rel": 0.0}


def test_fp8_quantize_keeps_the_device():
    w = torch.empty(3, 96, 64, device="meta")
    q, s = fp8_block_quantize(w, (32, 32))
    assert q.device == s.device == w.device and q.shape == w.shape and s.shape == (3, 3, 2)


@pytest.mark.parametrize("scratch", [1 << 30, 4096])
@pytest.mark.parametrize("shape, block, dtype", CASES)
def test_banded_fp8_roundtrip_of_matches_whole_tensor(monkeypatch, scratch, shape, block, dtype):
    monkeypatch.setattr(formats, "SCRATCH_BYTES", scratch)
    fmt = QuantFormat("fp8", block)
    w = _weights(shape, dtype, seed=11)
    parts = fmt.quantize("x.weight", w, torch.bfloat16)
    # a merged expert differs from what was quantized, so the error is not just rounding
    w2 = w + (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 1e-3).to(dtype)
    for target in (w, w2):
        got = fmt.roundtrip_of(parts, "x.weight", target)
        want = _reference_roundtrip(parts, "x.weight", target, block)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=0)


def test_fp8_roundtrip_of_zero_and_mismatch():
    fmt = QuantFormat("fp8", (16, 16))
    w = torch.zeros(40, 24)
    assert fmt.roundtrip_of(fmt.quantize("x.weight", w), "x.weight", w) == {"max_abs_rel": 0.0, "fro_rel": 0.0}
    parts = fmt.quantize("x.weight", torch.ones(40, 24))
    parts["x.weight_scale_inv"] = parts["x.weight_scale_inv"][:2]
    with pytest.raises(formats.CheckpointError, match="x.weight"):
        fmt.roundtrip_of(parts, "x.weight", torch.ones(40, 24))


_PEAK = """
import json, resource, sys, torch
from lowmoe.engine import formats
torch.set_num_threads(1)
formats.SCRATCH_BYTES = 1 << 20
unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
formats.fp8_block_quantize(torch.randn(256, 256), (128, 128))  # first-call allocations out of the way
w = torch.empty(4096, 4096, dtype=torch.bfloat16).normal_(generator=torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
q, s = formats.fp8_block_quantize(w, (128, 128))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps((after - before) * unit / w.nbytes))
"""


def test_fp8_quantize_peak_memory_is_bounded():
    """Quantizing a 32 MiB bf16 matrix with 1 MiB of scratch: peak RSS grows by the fp8 output
    (0.5x the input) and a few bands, not by several float32 copies (the whole-tensor code: ~8.5x)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PEAK], env=env, capture_output=True, text=True, check=True)
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    assert growth < 2.5, f"peak RSS grew by {growth:.2f}x the input"


# ---- MXFP4 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scratch", [1 << 30, 64 * 64 * 3])  # one step, or 3 rows a step
@pytest.mark.parametrize("layout", ["2d", "3d", "transposed"])
def test_banded_mxfp4_quantize_is_bit_identical(monkeypatch, scratch, layout):
    """MXFP4 encodes a band of rows at a time: the same blocks and scales as the whole tensor at once
    (``_mxfp4_encode``), all-zero groups included."""
    w = _weights((2, 40, 64), torch.bfloat16, seed=7)
    x = {"2d": w[0], "3d": w, "transposed": w.transpose(-1, -2).contiguous().transpose(-1, -2)}[layout]
    want = formats._mxfp4_encode(x)
    monkeypatch.setattr(formats, "SCRATCH_BYTES", scratch)
    got = formats.mxfp4_quantize(x)
    assert all(torch.equal(g, v) for g, v in zip(got, want))


@pytest.mark.parametrize("scratch", [1 << 30, 24 * 2 * 32 * 3])  # one step, or 3 stored rows a step
def test_banded_mxfp4_roundtrip_matches_whole_tensor(monkeypatch, scratch):
    """A fused (E, in, out) weight's round trip, a band of stored rows (its columns) at a time: the
    figures of the whole tensor dequantized at once."""
    monkeypatch.setattr(formats, "SCRATCH_BYTES", scratch)
    fmt = QuantFormat("mxfp4")
    w = _weights((3, 64, 40), torch.bfloat16, seed=9)
    parts = fmt.quantize("e.gate_up_proj", w)
    w2 = w + (torch.randn(w.shape, generator=torch.Generator().manual_seed(4)) * 1e-2).to(w.dtype)
    for target in (w, w2):
        err = fmt.dequantize(parts, "e.gate_up_proj", torch.float32).double() - target.double()
        want = (err.abs().max() / target.double().abs().max()).item(), (err.norm() / target.double().norm()).item()
        got = fmt.roundtrip_of(parts, "e.gate_up_proj", target)
        assert got["max_abs_rel"] == pytest.approx(want[0], rel=1e-6) and got["fro_rel"] == pytest.approx(want[1], rel=1e-6)
    with pytest.raises(ValueError, match="e.gate_up_proj"):
        fmt.roundtrip_of(parts, "e.gate_up_proj", w[:, :, :8])


def test_mxfp4_quantize_peak_memory_is_bounded():
    """Encoding a 32 MiB bf16 matrix with 1 MiB of scratch: peak RSS grows by the packed output and a
    few bands, not by the encoder's ~30 bytes a value of int64 codes and float32 copies."""
    code = _PEAK.replace("formats.fp8_block_quantize(torch.randn(256, 256), (128, 128))",
                         "formats.mxfp4_quantize(torch.randn(256, 256))").replace(
                         "q, s = formats.fp8_block_quantize(w, (128, 128))", "q, s = formats.mxfp4_quantize(w)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    assert growth < 2.5, f"peak RSS grew by {growth:.2f}x the input"
