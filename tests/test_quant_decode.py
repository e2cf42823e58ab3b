"""Dequantization where the packed bytes are: the FP8 block and MXFP4 decoders work on any device
and keep their output there; a streamed expert group arrives as its stored bytes (never a float
copy on the host) and is decoded after it was moved. Large tensors are decoded in bounded slices
that give the same values as the one-shot formula. GPU checks are marked ``gpu`` (skipped without
CUDA)."""

from __future__ import annotations

import shutil

import pytest
import torch

import lowmoe
from lowmoe.engine import formats
from lowmoe.engine.budget import plan_lazy_budget
from lowmoe.engine.checkpoint import Checkpoint, read_header
from lowmoe.engine.formats import E2M1_VALUES, QuantFormat, fp8_block_dequantize, fp8_block_quantize, mxfp4_quantize
from lowmoe.engine.lazy import ShardFiles, read_lazy_layer
from lowmoe.errors import CheckpointError

FP8 = dict(layers=3, hidden_size=64, intermediate_size=32, experts=8, top_k=2, shard_size="60KB", dtype="bfloat16",
           quant="fp8", fp8_block=32)
MXFP4 = dict(layers=2, hidden_size=64, intermediate_size=64, experts=8, top_k=2, shard_size="60KB", dtype="bfloat16",
             quant="mxfp4")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def fp8_reference(q, s, block, dtype):
    """W[i, j] = q[i, j] * s[i // b0, j // b1], element by element on the CPU."""
    rows, cols = q.shape[-2:]
    i = torch.arange(rows)[:, None] // block[0]
    j = torch.arange(cols)[None, :] // block[1]
    return (q.float() * s.float()[..., i, j]).to(dtype)


def mxfp4_reference(blocks, scales, dtype):
    """(..., out, G, 16) nibbles x 2**(s - 127) -> runtime (..., in, out), on the CPU."""
    lut = torch.tensor(E2M1_VALUES)
    lo, hi = lut[(blocks & 0xF).long()], lut[(blocks >> 4).long()]
    vals = torch.stack([lo, hi], -1).flatten(-2) * torch.exp2(scales.double() - 127).float().unsqueeze(-1)
    return vals.flatten(-2).transpose(-1, -2).to(dtype)


def test_decoders_keep_the_input_device():
    """On the meta device nothing is computed, but any tensor made on the CPU inside a decoder would
    make it fail or return a CPU tensor: the output device is the input's."""
    meta = torch.device("meta")
    q = torch.empty(3, 96, 64, dtype=torch.float8_e4m3fn, device=meta)
    s = torch.empty(3, 3, 2, device=meta)
    assert fp8_block_dequantize(q, s, (32, 32)).device == meta
    fmt = QuantFormat("mxfp4")
    b = torch.empty(3, 40, 2, 16, dtype=torch.uint8, device=meta)
    sc = torch.empty(3, 40, 2, dtype=torch.uint8, device=meta)
    out = fmt.dequantize({"x_blocks": b, "x_scales": sc}, "x", torch.bfloat16)
    assert out.device == meta and out.shape == (3, 64, 40)
    with pytest.raises(Exception, match="scales on cpu but"):
        fmt.dequantize({"x_blocks": b, "x_scales": sc.new_empty(sc.shape, device="cpu")}, "x", torch.bfloat16)


@pytest.mark.parametrize("scratch", [1 << 30, 4096])
def test_banded_fp8_decode_equals_the_formula(monkeypatch, scratch):
    """Decoded in bands of block rows (tiny scratch) or in one step: the same values, bit for bit,
    as the element-wise formula, including a ragged edge block."""
    monkeypatch.setattr(formats, "SCRATCH_BYTES", scratch)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 100, 72, generator=g) * 0.02
    q, s = fp8_block_quantize(w, (32, 16))
    for dtype in (torch.bfloat16, torch.float32):
        got = fp8_block_dequantize(q, s, (32, 16), dtype)
        assert got.dtype == dtype and torch.equal(got, fp8_reference(q, s, (32, 16), dtype))


@pytest.mark.parametrize("scratch", [1 << 30, 20000, 64])
def test_banded_mxfp4_decode_equals_the_formula(monkeypatch, scratch):
    """Several experts a step, one expert a step, or a band of one expert's rows: the same values."""
    monkeypatch.setattr(formats, "SCRATCH_BYTES", scratch)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 48, 96, generator=g)  # (E, out, in)
    blocks, scales = mxfp4_quantize(w)
    got = QuantFormat("mxfp4").dequantize({"x_blocks": blocks, "x_scales": scales}, "x", torch.bfloat16)
    assert torch.equal(got, mxfp4_reference(blocks, scales, torch.bfloat16))


@pytest.mark.parametrize("arch,opts", [("deepseek_v3", FP8), ("gpt_oss", MXFP4)])
def test_group_arrives_packed_and_decodes_on_its_device(synth_dir, arch, opts):
    """A quantized layer's expert group is loaded as uint8 stored bytes (what the host holds and the
    host->device copy moves, uncast) and decoded on the device the bytes are on, equal to the experts
    of the layer dequantized whole."""
    ck = Checkpoint(synth_dir(arch, **opts))
    L = ck.moe_layers()[0]
    src = read_lazy_layer(ck, ShardFiles(ck.path), L).experts
    assert src.packed
    host = src.load(2, 6)
    assert all(t.dtype == torch.uint8 and t.device.type == "cpu" for t in host.values())
    assert sum(t.numel() for t in host.values()) == 4 * src.expert_stored_bytes()
    got = src.decode(host, ck.compute_dtype)
    whole = ck.adapter.to_runtime(L, ck.read_layer(L), True)
    prefix = ck.adapter.runtime_moe_prefix + "experts."
    for name, t in got.items():
        assert t.device.type == "cpu" and torch.equal(t, whole[prefix + name][2:6]), name


def test_a_per_expert_group_decodes_gate_and_up_in_place(synth_dir, monkeypatch):
    """A per-expert FP8 group's gate and up decode straight into their rows of the stacked
    ``gate_up_proj``: no concatenation, so no second copy of the group while it decodes."""
    ck = Checkpoint(synth_dir("deepseek_v3", **FP8))
    L = ck.moe_layers()[0]
    src = read_lazy_layer(ck, ShardFiles(ck.path), L).experts
    host = src.load(0, 4)
    whole = ck.adapter.to_runtime(L, ck.read_layer(L), True)

    def no_cat(*a, **k):
        raise AssertionError("a decoded group was concatenated")

    monkeypatch.setattr(torch, "cat", no_cat)
    got = src.decode(host, ck.compute_dtype)
    monkeypatch.undo()
    prefix = ck.adapter.runtime_moe_prefix + "experts."
    assert set(got) == {"gate_up_proj", "down_proj"}
    assert all(torch.equal(t, whole[prefix + name][0:4]) for name, t in got.items())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("arch,opts", [("deepseek_v3", FP8), ("gpt_oss", MXFP4)])
def test_group_decoded_on_cuda_equals_cpu(synth_dir, arch, opts):
    ck = Checkpoint(synth_dir(arch, **opts))
    src = read_lazy_layer(ck, ShardFiles(ck.path), ck.moe_layers()[0]).experts
    host = src.load(0, src.num_experts)
    cpu = src.decode(host, torch.bfloat16)
    dev = src.decode({k: v.to("cuda") for k, v in host.items()}, torch.bfloat16)
    for name in cpu:
        assert dev[name].device.type == "cuda" and torch.equal(dev[name].cpu(), cpu[name]), name


@pytest.mark.gpu
@cuda
def test_decoders_on_cuda_equal_the_formula():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 100, 72, generator=g) * 0.02
    q, s = fp8_block_quantize(w, (32, 16))
    got = fp8_block_dequantize(q.cuda(), s.cuda(), (32, 16), torch.bfloat16)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), fp8_reference(q, s, (32, 16), torch.bfloat16))
    blocks, scales = mxfp4_quantize(w[..., :64])
    got = QuantFormat("mxfp4").dequantize({"x_blocks": blocks.cuda(), "x_scales": scales.cuda()}, "x", torch.bfloat16)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), mxfp4_reference(blocks, scales, torch.bfloat16))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("arch,opts", [("deepseek_v3", FP8), ("gpt_oss", MXFP4)])
def test_quantized_prune_on_cuda_matches_cpu(synth_dir, calib_txt, tmp_path, arch, opts):
    """A one-shot prune of a quantized checkpoint on CUDA (groups moved packed, decoded on the GPU)
    keeps the experts the CPU run keeps, and the kept experts' stored bytes are the same files."""
    src = synth_dir(arch, **opts)
    kw = dict(keep=4, calib=[calib_txt], n_samples=8, seq_len=16, batch_size=4, progress=False)
    cpu = lowmoe.prune(src, tmp_path / "cpu", device="cpu", **kw)
    gpu = lowmoe.prune(src, tmp_path / "gpu", device="cuda", **kw)
    assert gpu["plan"]["layers"] == cpu["plan"]["layers"]
    assert gpu["io"]["bytes_copied"] == cpu["io"]["bytes_copied"] > 0


@pytest.mark.parametrize("arch,opts,key,byte", [
    ("deepseek_v3", FP8, "model.layers.1.mlp.experts.3.up_proj.weight", 0x7F),  # an e4m3fn NaN code
    ("gpt_oss", MXFP4, "model.layers.1.mlp.experts.down_proj_scales", 0xFF),  # an E8M0 NaN scale
])
def test_nan_in_packed_bytes_names_the_expert(synth_dir, tmp_path, arch, opts, key, byte):
    """A NaN stored in a quantized expert is refused when its group is read, naming the tensor, the
    layer and the expert (as ``Checkpoint.read`` does for float weights)."""
    src = tmp_path / "m"
    shutil.copytree(synth_dir(arch, **opts), src)
    ck = Checkpoint(src)
    shard = src / ck.weight_map[key]
    header, start = read_header(shard)
    a, z = header[key]["data_offsets"]
    row = (z - a) // header[key]["shape"][0] if "experts.3." not in key else 0
    at = start + a + 3 * row + 5  # expert 3 (fused: its row of the tensor)
    with open(shard, "r+b") as f:
        f.seek(at)
        f.write(bytes([byte]))
    L = 1
    experts = read_lazy_layer(Checkpoint(src), ShardFiles(src), L).experts
    with pytest.raises(CheckpointError, match=r"layer 1, expert 3\)"):
        experts.load(0, experts.num_experts)


@pytest.mark.parametrize("arch,opts", [("deepseek_v3", FP8), ("gpt_oss", MXFP4)])
def test_budget_counts_quantized_groups_at_their_stored_size(synth_dir, arch, opts):
    """The planner's staging pool is two groups of stored bytes (what ``load`` fills; a third for the next
    layer's read-ahead when layers are prefetched), and a device
    run adds the two packed groups in flight and the decode scratch to the device terms."""
    ck = Checkpoint(synth_dir(arch, **opts))
    L = ck.moe_layers()[0]
    src = read_lazy_layer(ck, ShardFiles(ck.path), L).experts
    cpu = plan_lazy_budget(ck, device=torch.device("cpu"), dtype=torch.float32, batch_size=2, seq_len=16)
    g = cpu.layers[L].group_size
    assert cpu.staging_bytes == (3 if cpu.prefetch_layers else 2) * g * src.expert_stored_bytes()
    assert cpu.device_terms["packed_groups_and_decode"] == formats.SCRATCH_BYTES  # on CPU the packed group is the staging buffer
    dev = plan_lazy_budget(ck, device=torch.device("cuda"), dtype=torch.bfloat16, batch_size=2, seq_len=16)
    gd = dev.layers[L].group_size
    assert dev.device_terms["packed_groups_and_decode"] == 2 * gd * src.expert_stored_bytes() + formats.SCRATCH_BYTES
