"""The per-layer NF4/int8 weight cache: built once, ~4x fewer bytes, close to the originals,
router tensors exact, and the EEP fitness on it close to full precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowmoe.engine.calibration import load_tokenizer
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.methods.eep.fitness import FitnessData
from lowmoe.methods.eep.population import PopulationEvaluator
from lowmoe.methods.eep.space import SearchSpace
from lowmoe.errors import ConfigError
from lowmoe.engine.quant import QuantizedWeights, layer_weights

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("mode, tol, ratio", [("nf4", 0.15, 0.2), ("int8", 0.03, 0.3)])
def test_quantized_layers_round_trip(synth_dir, tmp_path, mode, tol, ratio):
    src = synth_dir("mixtral", hidden_size=64, intermediate_size=128, dtype="float32")
    ck = Checkpoint(src)
    q = layer_weights(ck, mode, tmp_path / "q", progress=False)
    assert isinstance(q, QuantizedWeights)
    full = sum(ck.layer_bytes(i) for i in range(ck.num_layers))
    assert q.cache_bytes() < ratio * full + 20_000, (q.cache_bytes(), full)
    mtime = (tmp_path / "q" / "layer0000.safetensors").stat().st_mtime_ns
    layer_weights(ck, mode, tmp_path / "q")  # second open: reuses the cache
    assert (tmp_path / "q" / "layer0000.safetensors").stat().st_mtime_ns == mtime
    for L in range(ck.num_layers):
        orig, deq = ck.read_layer(L), q.layer(L)
        assert list(deq) == list(orig)
        for k, t in orig.items():
            assert deq[k].shape == t.shape and deq[k].dtype == t.dtype
            if ".gate." in k or t.ndim < 2 or t.numel() < 4096:
                assert torch.equal(deq[k], t), k  # router / norms / small tensors stay exact
            else:
                rel = (deq[k] - t).norm() / t.norm()
                assert 0 < rel < tol, (k, float(rel))


def test_search_fitness_on_nf4_is_close(synth_dir, tmp_path):
    src = synth_dir("mixtral", hidden_size=64, intermediate_size=128, dtype="float32")
    ck = Checkpoint(src)
    recs = [{"prompt": f"{a}+{b}=", "answer": f"{a + b}\n"} for a in range(3) for b in range(3)]
    data = FitnessData.from_records(recs, load_tokenizer(src))
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, 4, "layer")
    cands = [space.random_onehot(np.random.default_rng(i)) for i in range(2)]
    fits = {}
    for mode in ("none", "nf4"):
        pe = PopulationEvaluator(ck, layer_weights(ck, mode, tmp_path / "q"), space, data, tmp_path / f"a-{mode}",
                                 device="cpu", dtype=torch.float32, top_k=2)
        fits[mode] = pe.evaluate(cands)
    for a, b in zip(fits["none"], fits["nf4"]):
        assert a.ll != b.ll and abs(a.ll - b.ll) < 0.05 * abs(a.ll)


def test_unknown_quant_mode(synth_dir, tmp_path):
    with pytest.raises(ConfigError, match="--quant"):
        layer_weights(Checkpoint(synth_dir("mixtral")), "fp3", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_dequantization_matches_cpu(synth_dir, tmp_path):
    src = synth_dir("mixtral", hidden_size=64, intermediate_size=128, dtype="float32")
    ck = Checkpoint(src)
    cpu = QuantizedWeights(ck, tmp_path / "q", "nf4", device="cpu")
    gpu = QuantizedWeights(ck, tmp_path / "q", "nf4", device="cuda")
    for k, t in cpu.layer(0).items():
        assert torch.allclose(gpu.layer(0)[k], t, atol=1e-6), k


def test_nf4_round_trip_is_checked_once_per_device_and_shape(monkeypatch):
    """The installed bitsandbytes round-trips NF4 as accurately as NF4 is, for the toy's shapes; one
    that does not (as 0.49-0.50's CPU path on 128x96) is refused with a one-line error naming
    --quant nf4, the shape and the version."""
    import bitsandbytes.functional as F

    from lowmoe.engine import quant

    monkeypatch.setattr(quant, "_nf4_checked", set())
    for shape in [(128, 96), (96, 128), (256, 96)]:
        quant.check_nf4("cpu", shape)
    assert ("cpu", (128, 96)) in quant._nf4_checked
    real = F.dequantize_4bit
    monkeypatch.setattr(quant, "_nf4_checked", set())
    monkeypatch.setattr(F, "dequantize_4bit", lambda q, st: real(q, st) * 1.5)  # a 50% scale error
    with pytest.raises(ConfigError, match=r"--quant nf4: bitsandbytes .* 64x64 matrix on cpu .*bitsandbytes<0\.49"):
        quant.check_nf4("cpu", (64, 64))
    assert not quant._nf4_checked


def test_cpu_nf4_cache_does_not_use_bitsandbytes_cpu_kernels(synth_dir, tmp_path, monkeypatch):
    """The EEP search's NF4 layer cache is quantized and read on the CPU by lowmoe's own steps of
    bitsandbytes' arithmetic: a bitsandbytes whose CPU NF4 is off (as 0.49-0.50's on some shapes,
    ``check_nf4``) changes nothing, and the cache round-trips as NF4 does."""
    import bitsandbytes.functional as F

    src = synth_dir("mixtral", hidden_size=64, intermediate_size=128, dtype="float32")
    good = layer_weights(Checkpoint(src), "nf4", tmp_path / "good")
    want = good.layer(0)
    for name in ("dequantize_4bit", "quantize_4bit"):
        monkeypatch.setattr(F, name, lambda *a, **k: pytest.fail("bitsandbytes' NF4 ran on the CPU"))
    again = layer_weights(Checkpoint(src), "nf4", tmp_path / "again")
    got = again.layer(0)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    orig = Checkpoint(src).read_layer(0)
    k = next(k for k in orig if k.endswith("w1.weight"))
    err = float((got[k] - orig[k]).abs().mean() / orig[k].abs().mean())
    assert 0 < err < 0.15, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("shape", [(64, 64), (300, 257), (3, 7, 4098), (1, (1 << 16) + 192)])
def test_cpu_dequantization_is_bitsandbytes_to_the_bit(mode, dtype, shape):
    """``dequantize_cpu`` (a step of values at a time through reused buffers) gives bitsandbytes' own CPU
    result bit for bit: whole and partial blocks, a matrix longer than one step, every dtype; and it
    writes into a given tensor without making another."""
    import bitsandbytes.functional as F

    from lowmoe.engine.quant import BLOCKSIZE, QTensor, dequantize_cpu, quantize_tensor

    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 3
    qt = quantize_tensor(x, mode)
    if mode == "nf4":
        st = F.QuantState(absmax=qt.absmax, shape=qt.shape, blocksize=BLOCKSIZE["nf4"], quant_type="nf4", dtype=dtype)
        ref = F.dequantize_4bit(qt.codes, st).reshape(shape).to(dtype)
    else:
        st = F.QuantState(absmax=qt.absmax, shape=qt.shape, code=qt.code, blocksize=BLOCKSIZE["int8"], dtype=dtype)
        ref = F.dequantize_blockwise(qt.codes, st).reshape(shape).to(dtype)
    got = dequantize_cpu(qt, dtype)
    assert got.dtype == dtype and got.shape == ref.shape and torch.equal(got, ref)
    assert torch.equal(QTensor(mode, qt.codes, qt.absmax, qt.shape, qt.code).dequantize(dtype), ref)
    out = torch.full(shape, float("nan"), dtype=dtype)
    assert dequantize_cpu(qt, dtype, out) is out and torch.equal(out, ref)
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_cpu(qt, dtype, torch.empty(shape + (2,), dtype=dtype)[..., 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("shape", [(64, 64), (300, 258), (3, 7, 4098), (1, (1 << 15) + 192)])
def test_cpu_quantization_is_bitsandbytes_to_the_bit(mode, dtype, shape):
    """``quantize_tensor`` on the CPU (a step of values at a time, ``quantize_cpu``) gives bitsandbytes'
    own codes and absmax bit for bit: whole and partial blocks, blocks of zeros, several steps, every
    dtype (int8 from float32: the same arithmetic, where bitsandbytes' own kernel would crash)."""
    import bitsandbytes.functional as F

    from lowmoe.engine.quant import BLOCKSIZE, quantize_tensor

    x = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 3).to(dtype)
    x.view(-1)[5] = 0.0
    x.view(-1)[512:1024] = 0.0  # whole blocks of zeros: scaled by 1/0, NaN
    qt = quantize_tensor(x, mode)
    if mode == "int8" and dtype == torch.float32:
        # bitsandbytes' float32 kernel (C++) crashes on a block of zeros: its 16-bit path's arithmetic, written out
        code = F.quantize_blockwise(torch.ones(256, dtype=torch.float16), blocksize=256)[1].code
        n, bs = x.numel(), BLOCKSIZE["int8"]
        blocks = torch.nn.functional.pad(x.reshape(-1), (0, -n % bs)).reshape(-1, bs)
        absmax = blocks.abs().max(dim=-1)[0]
        scaled = torch.clamp(blocks * (1 / absmax.view(-1, 1)), -1, 1).reshape(-1)[:n]
        q = torch.argmin(torch.abs(scaled.view(-1, 1) - code), dim=-1).to(torch.uint8).reshape(shape)
        assert torch.equal(qt.codes, q) and torch.equal(qt.absmax, absmax) and torch.equal(qt.code, code)
        return
    if mode == "nf4":
        q, st = F.quantize_4bit(x, quant_type="nf4", blocksize=BLOCKSIZE["nf4"])
    else:
        q, st = F.quantize_blockwise(x, blocksize=BLOCKSIZE["int8"])
        assert torch.equal(qt.code, st.code)
    assert qt.codes.dtype == q.dtype and qt.codes.shape == q.shape and torch.equal(qt.codes, q)
    assert torch.equal(qt.absmax, st.absmax.float())


def test_nearest_code_is_argmin_with_its_ties():
    """``nearest_code`` is bitsandbytes' ``argmin(|x - table|)``: the first index when rounded distances
    tie (in float32 x = 0.5 is 0.5 away from each of 0, 1e-9, 2e-9 and 1), values outside the table's
    range, and random values against both tables."""
    from lowmoe.engine.quant import _dynamic_map, _nf4_table, nearest_code

    def argmin(x, table):
        return torch.argmin(torch.abs(x.reshape(-1, 1) - table), dim=-1).to(torch.uint8)

    table = torch.tensor([0.0, 1e-9, 2e-9, 1.0])
    x = torch.tensor([0.5, -3.0, 3.0, 1.2e-9, 0.75, 0.25, float("nan")])
    assert nearest_code(x, table).tolist() == argmin(x, table).tolist() == [0, 0, 3, 1, 3, 0, 0]
    gen = torch.Generator().manual_seed(0)
    for table in (_nf4_table(), _dynamic_map()):
        x = torch.cat([torch.rand(100_000, generator=gen) * 2 - 1, table, (table[1:] + table[:-1]) / 2])
        assert torch.equal(nearest_code(x, table), argmin(x, table))


def test_bucket_lookup_is_searchsorted():
    """``quant._searchsorted`` (a lookup by a float32's top 16 bits) counts what ``torch.searchsorted``
    counts: at both ends of every one of the 65536 buckets (the values a bucket's count could be wrong
    at), at the tables' values and their neighbours, at infinities and random bit patterns (NaNs aside:
    their codes are set apart); a table with two values in one bucket keeps the binary search."""
    from lowmoe.engine.quant import _bucket_table, _dynamic_map, _nf4_table, _searchsorted

    top = torch.arange(1 << 16, dtype=torch.int64) - (1 << 15)
    ends = torch.cat([top << 16, (top << 16) | 0xFFFF]).to(torch.int32).view(torch.float32)
    rand = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=torch.Generator().manual_seed(3), dtype=torch.int64)
    for table in (_nf4_table().float(), _dynamic_map().float(), torch.tensor([0.0, 1e-9, 2e-9, 1.0])):
        up, down = torch.nextafter(table, torch.full_like(table, 2.0)), torch.nextafter(table, torch.full_like(table, -2.0))
        x = torch.cat([ends, table, up, down, -table, torch.tensor([float("inf"), -float("inf"), 0.0, -0.0]),
                       rand.to(torch.int32).view(torch.float32)])
        x = x[~torch.isnan(x)]
        assert _bucket_table(table) is not None
        assert torch.equal(_searchsorted(table, x), torch.searchsorted(table, x))
    close = torch.tensor([0.0, 1.0, 1.0001])  # 1.0 and 1.0001 share their top 16 bits
    assert _bucket_table(close) is None
    x = torch.tensor([1.00005, 1.0, 0.5, 2.0])
    assert _searchsorted(close, x).tolist() == torch.searchsorted(close, x).tolist() == [2, 1, 1, 3]


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_cached_rows_dequantize_as_the_whole_tensor(tmp_path, mode):
    """``CachedTensor.read_rows`` (a fused expert tensor's rows from the cache): rows of 111 values,
    which start inside quantization blocks (and, for NF4, inside a byte), read alone or several at a
    time, give the whole tensor's dequantized rows, reading only their blocks."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from lowmoe.engine.lazy import ShardFiles
    from lowmoe.engine.quant import CachedTensor, quantize_tensor

    x = torch.randn(40, 3, 37, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    qt = quantize_tensor(x, mode)
    tensors = {"w::q": qt.codes.contiguous(), "w::absmax": qt.absmax.contiguous()}
    save_file(tensors, str(tmp_path / "layer0000.safetensors"))
    weights = SimpleNamespace(mode=mode, bytes_read=0)
    files = ShardFiles(tmp_path)
    entry = CachedTensor(weights, files, "layer0000.safetensors", "w", {"shape": [40, 3, 37], "dtype": "torch.bfloat16"},
                         qt.code)
    whole = qt.dequantize(torch.bfloat16)
    assert torch.equal(entry.read(), whole)
    for row, count in [(0, 1), (1, 1), (3, 2), (39, 1), (30, 10), (0, 40)]:
        out = torch.full((count, 3, 37), float("nan"), dtype=torch.bfloat16)
        entry.read_rows(row, out)
        assert torch.equal(out, whole[row:row + count]), (row, count)
    weights.bytes_read = 0
    entry.read_rows(2, torch.empty(3, 37, dtype=torch.bfloat16))
    assert weights.bytes_read < sum(t.numel() * t.element_size() for t in tensors.values()) / 10
    files.close()
