"""Per-layer quantized weight cache (NF4 / int8 via bitsandbytes) for repeated streamed passes.

The EEP search (``lowmoe.methods.eep``) streams the whole model once per generation. Reading a layer's
bf16/fp32 tensors every generation is the dominant I/O cost, so before the search the layers are
quantized once into ``<root>/layer{L:04d}.safetensors`` and each generation reads those instead:

* ``nf4``: ``bitsandbytes.functional.quantize_4bit(quant_type="nf4", blocksize=64)`` -- 4-bit
  NormalFloat codes, two per byte, plus one fp32 absmax per 64 values (~0.56 byte/param, ~3.6x
  fewer bytes than bf16, ~7x fewer than fp32).
* ``int8``: ``quantize_blockwise`` with the dynamic 8-bit map, blocksize 256 (~1.02 byte/param).
* ``none``: no cache; layers are read from the checkpoint's shards.

Only the large matrices are quantized (attention and expert projections: 2-D/3-D tensors with at
least ``MIN_NUMEL`` values). Router weights, router biases and norms stay exact: the routing
decision is what the search changes, and it must see the model's real router.

``layer(L)`` returns the layer's tensors under their on-disk keys, dequantized to their stored
dtype (bitsandbytes' CPU path on CPU; its CUDA kernels when ``device`` is a GPU -- untested here,
no GPU was available), on the CPU where ``apply_layer`` works, so the rest of lowmoe
(``apply_layer``, ``to_runtime``) is unchanged. The final model is never written from this
cache -- the EEP runner writes from the original checkpoint.

The cache is built one tensor at a time: a layer's routed experts are read from the shards one tensor
at a time (``lazy.read_lazy_layer``; a fused layout's ``cache_rows`` experts at a time) and each
quantized tensor is streamed into the layer's file (``writer.OpenShard``), so building it never holds
a layer, nor a fused tensor decoded (its host peak: ``budget.quant_build_bytes``).
``lazy_layer(L, files)`` reads a layer's non-expert tensors and leaves its experts to an
``ExpertSource`` over ``CachedTensor`` entries, which reads and dequantizes one expert at a time (a per-expert layout's tensors, a fused
layout's rows): what the EEP population pass reads under a ``--max-ram`` too small for a layer
(``budget.plan_sourced_population``). On the CPU, quantizing and dequantizing are lowmoe's own steps
of bitsandbytes' arithmetic (``quantize_cpu``, ``dequantize_cpu``): the same bytes, without
bitsandbytes' tensors of every value against every code.

**Quantized compute** (``lowmoe score --quant``, ``lowmoe eval --streaming --quant``):
``build_quantized_layer`` builds one decoder layer whose linear weights are held on the compute
device in the same two formats (``QTensor``: bitsandbytes codes + per-block absmax), the rest
(router, norms, biases, gates) exact in the compute dtype:

* attention projections, shared experts and dense MLPs: ``QuantLinear`` (an ``nn.Linear`` whose
  weight is dequantized by bitsandbytes -- its CUDA kernels on a GPU, its CPU path otherwise -- in
  the compute dtype right before the matmul). For NF4 this is what ``bnb.nn.Linear4bit`` computes
  for inputs of more than one token (``bnb.matmul_4bit`` dequantizes, then multiplies);
* routed experts: ``QuantExperts``, each expert's matrices quantized on their own and dequantized
  one expert at a time, run through transformers' own experts code (as ``experts.ChunkedExperts``
  runs a group), so only one expert is ever held in full precision.

The numbers are those of the same layer with every quantized weight replaced by its dequantized
value (tested); the accuracy cost against fp32/bf16 is measured by ``scripts/bench_quant.py``
(``docs/gpu.md``, "Quantized compute").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import ConfigError
from .checkpoint import Checkpoint
from .device import dtype_bytes
from .experts import QuantExperts
from .hf import materialize, moe_modules, split_experts
from .lazy import ExpertSource, LazyLayer, ShardFiles, entry_rows, read_lazy_layer
from .memory import fmt_bytes
from .progress import progress as progress_bar
from .writer import OpenShard

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "nf4")
MIN_NUMEL = 4096
BLOCKSIZE = {"nf4": 64, "int8": 256}
CACHE_FORMAT = 2  # 2: written tensor by tensor (``writer.OpenShard``); a cache of another format is rebuilt
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


def _bnb():
    try:
        import bitsandbytes.functional as F
    except Exception as e:  # ImportError, or a broken native library
        raise ConfigError(f"--quant needs bitsandbytes ({type(e).__name__}: {str(e)[:100]}); "
                          "pip install bitsandbytes, or use --quant none") from None
    return F


class OriginalWeights:
    """Layer tensors straight from the checkpoint (``--quant none``)."""

    mode = "none"

    def __init__(self, ck: Checkpoint):
        self.ck = ck
        self.bytes_read = 0

    def layer(self, layer_idx: int) -> dict[str, torch.Tensor]:
        self.bytes_read += self.ck.layer_bytes(layer_idx)
        return self.ck.read_layer(layer_idx)


class QuantizedWeights:
    """A per-layer NF4/int8 copy of the checkpoint's layers on disk, built once."""

    def __init__(self, ck: Checkpoint, root: str | Path, mode: str, device: str | torch.device = "cpu",
                 progress: bool = False):
        if mode not in ("nf4", "int8"):
            raise ConfigError(f"--quant {mode!r}: choose one of {', '.join(QUANT_MODES)}")
        self.ck, self.mode = ck, mode
        self.root = Path(root)
        self.device = torch.device(device)
        self.blocksize = BLOCKSIZE[mode]
        self.bytes_read = 0
        _bnb()  # bitsandbytes importable (ConfigError otherwise) before any work
        self._build(progress)

    # ---- building ------------------------------------------------------------------------
    def _quantizable(self, layer_idx: int, key: str, shape, dtype: torch.dtype) -> bool:
        rel = key[len(self.ck.adapter.layer_prefix(layer_idx)):]
        return (len(shape) >= 2 and math.prod(shape) >= MIN_NUMEL and dtype.is_floating_point
                and not self.ck.adapter.is_router_key(rel))

    def _path(self, layer_idx: int) -> Path:
        return self.root / f"layer{layer_idx:04d}.safetensors"

    def _build(self, progress: bool) -> None:
        """Quantize every layer into its cache file, one tensor at a time: the layer's routed experts
        are read one tensor at a time from the shards (``lazy.read_lazy_layer``) and every tensor is
        streamed into the file as it is quantized (``writer.OpenShard``), so a layer is never held whole."""
        marker = self.root / "quant.json"
        want = {"mode": self.mode, "blocksize": self.blocksize, "layers": self.ck.num_layers,
                "index": hash_weight_map(self.ck), "format": CACHE_FORMAT}
        if marker.is_file() and json.loads(marker.read_text()) == want:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        layers = progress_bar(range(self.ck.num_layers), self.ck.num_layers, f"quantize ({self.mode})", progress)
        files = ShardFiles(self.ck.path)
        try:
            for layer_idx in layers:
                self._build_layer(layer_idx, read_lazy_layer(self.ck, files, layer_idx))
        finally:
            files.close()
        marker.write_text(json.dumps(want))

    def _build_layer(self, layer_idx: int, layer) -> None:
        meta: dict[str, dict] = {}
        tmp = self._path(layer_idx).with_suffix(".tmp")
        keys = self.ck.layer_keys(layer_idx)
        # room for the header: per key up to three entries (values or codes, absmax) of ~100 bytes of JSON
        # beside the name, and its shape and dtype in the metadata (a little over: the rest is padding)
        out = OpenShard(tmp, 8 * ((sum(3 * len(k) + 256 for k in keys) + 2048) // 8))
        code_written = False
        for key in keys:
            stored = layer.stored(key) if isinstance(layer, LazyLayer) else None
            shape, dtype = (stored.shape, stored.torch_dtype) if stored is not None else (layer[key].shape, layer[key].dtype)
            if not self._quantizable(layer_idx, key, shape, dtype):
                out.add(key, layer[key].contiguous())
                continue
            if self.mode == "int8" and not code_written:  # the same dynamic map for every tensor
                out.add("__code__", _dynamic_map().float().contiguous())
                code_written = True
            if stored is not None and len(shape) >= 3:  # a fused layout's experts: quantized a few rows at a time
                absmax = []
                out.add_parts(key + "::q", torch.uint8, _codes_shape(shape, self.mode), self._quantized_rows(stored, absmax))
                out.add(key + "::absmax", torch.cat(absmax))
            else:  # a routed expert's tensor is read (and decoded) now, alone
                qt = quantize_tensor(layer[key], self.mode)  # on the CPU, as read
                out.add(key + "::q", qt.codes.contiguous())
                out.add(key + "::absmax", qt.absmax.contiguous())
                del qt
            meta[key] = {"shape": list(shape), "dtype": str(dtype)}
        out.metadata["lowmoe_quant"] = json.dumps(meta)
        out.close()
        os.replace(tmp, self._path(layer_idx))
        log.info("quantized %d layers (%s) into %s: %.1f MB (checkpoint layers: %.1f MB)", self.ck.num_layers, self.mode,
                 self.root, self.cache_bytes() / 1e6, sum(self.ck.layer_bytes(i) for i in range(self.ck.num_layers)) / 1e6)

    def _quantized_rows(self, stored, absmax: list[torch.Tensor]):
        """A fused expert tensor (a stored entry, experts on dim 0) quantized ``cache_rows`` rows at a
        time, each step's rows read and decoded alone: the codes of each step in turn, its absmax appended
        to ``absmax``. Every step starts on a block's first value, so the codes and absmax are those of
        the whole tensor quantized at once (tested)."""
        rows = cache_rows(stored.shape, self.mode)
        for r in range(0, stored.shape[0], rows):
            qt = quantize_tensor(entry_rows(stored, list(range(r, min(stored.shape[0], r + rows)))), self.mode)
            absmax.append(qt.absmax)
            yield qt.codes

    def cache_bytes(self) -> int:
        return sum(self._path(i).stat().st_size for i in range(self.ck.num_layers) if self._path(i).is_file())

    # ---- reading -------------------------------------------------------------------------
    def layer(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """The layer's tensors (on-disk keys, stored dtypes), quantized ones dequantized."""
        path = self._path(layer_idx)
        self.bytes_read += path.stat().st_size
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        with safe_open(str(path), framework="pt", device=str(dev)) as f:
            meta = json.loads(f.metadata()["lowmoe_quant"])
            raw = {k: f.get_tensor(k) for k in f.keys()}
        code = raw.pop("__code__", None)
        out = {}
        for key, t in raw.items():
            if "::" in key:
                continue
            out[key] = t
        for key, m in meta.items():
            qt = QTensor(self.mode, raw[key + "::q"], raw[key + "::absmax"], torch.Size(m["shape"]), code)
            out[key] = qt.dequantize(_DTYPES[m["dtype"]])
        # the checkpoint's key order; on CPU, where apply_layer works (dequantized on the GPU by
        # bitsandbytes' CUDA kernels when the device is one)
        return {k: out[k].cpu() for k in self.ck.layer_keys(layer_idx)}

    def lazy_layer(self, layer_idx: int, files: ShardFiles) -> LazyLayer:
        """The layer with its routed experts not read (``files``: a ``ShardFiles`` over the cache
        directory): the other tensors read and dequantized, the experts a ``lazy.ExpertSource`` over
        ``CachedTensor`` entries, which reads and dequantizes one expert at a time: a per-expert
        layout's tensors, or a fused layout's rows (``CachedTensor.read_rows``)."""
        ad, shard = self.ck.adapter, self._path(layer_idx).name
        header, _ = files.header(shard)
        meta = json.loads(header.get("__metadata__", {}).get("lowmoe_quant", "{}"))
        code = files.stored("__code__", shard).read() if "__code__" in header else None
        prefix = ad.layer_prefix(layer_idx)
        keys = self.ck.layer_keys(layer_idx)

        def cached(key: str):
            return CachedTensor(self, files, shard, key, meta[key], code) if key in meta else files.stored(key, shard)

        expert = {k: cached(k) for k in keys if ad.is_expert_key(k[len(prefix):])}
        read = {}
        for k in keys:
            if k not in expert:
                entry = cached(k)
                read[k] = entry.read()
                if not isinstance(entry, CachedTensor):
                    self.bytes_read += entry.nbytes
        source = ExpertSource.from_layer(ad, layer_idx, expert, self.ck.num_experts)
        return LazyLayer(layer_idx, keys, read, {}, source)


class CachedTensor:
    """One quantized tensor of the cache seen as a stored entry (``lazy.StoredTensor``'s reading side:
    ``shape``, ``torch_dtype``, ``read``, ``read_into``), its values dequantized to the dtype it was
    read in (``QTensor.dequantize``, the values ``QuantizedWeights.layer`` gives): an ``ExpertSource``
    over such entries reads a per-expert layer's experts from the cache one at a time."""

    def __init__(self, weights: QuantizedWeights, files: ShardFiles, shard: str, key: str, meta: dict, code):
        self.weights, self.files, self.shard, self.key, self.code = weights, files, shard, key, code
        self.shape = tuple(meta["shape"])
        self.torch_dtype = _DTYPES[meta["dtype"]]

    def read(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.torch_dtype)
        self.read_rows(0, out)
        return out

    def read_into(self, out: torch.Tensor) -> None:
        """The whole tensor into ``out`` (its size), dequantized there when ``out`` allows it."""
        self.read_rows(0, out)

    def read_rows(self, row: int, out: torch.Tensor) -> None:
        """Rows ``row``, ``row + 1``, ... of dim 0 (a fused expert tensor's experts), as many as ``out``
        holds, dequantized into it (straight into a contiguous ``out`` of this entry's dtype, else through
        a copy): only those rows' codes and their blocks' absmax are read. A value's dequantization needs its code and its block's absmax alone,
        so a first row that starts inside a block reads from the block's start and keeps its own values."""
        bs = BLOCKSIZE[self.weights.mode]
        per = math.prod(self.shape[1:])
        start, n = row * per, out.numel()
        lead = start % bs  # values of the first block before the first row (even: NF4 packs two a byte)
        a = start - lead
        nvals = lead + n
        q = self.files.stored(self.key + "::q", self.shard)
        am = self.files.stored(self.key + "::absmax", self.shard)
        per_byte = 2 if self.weights.mode == "nf4" else 1  # codes a byte (the stored tensors' shapes aside)
        codes = torch.empty(-(-nvals // per_byte), dtype=torch.uint8)
        self.files.read_into(q.shard, q.offset + a // per_byte, codes)
        absmax = torch.empty(-(-nvals // bs), dtype=torch.float32)
        self.files.read_into(am.shard, am.offset + a // bs * 4, absmax)
        self.weights.bytes_read += codes.numel() * codes.element_size() + absmax.numel() * absmax.element_size()
        qt = QTensor(self.weights.mode, codes, absmax, torch.Size([nvals]), self.code)
        if not lead and out.dtype == self.torch_dtype and out.is_contiguous():
            qt.dequantize(self.torch_dtype, out)
            return
        out.copy_(qt.dequantize(self.torch_dtype)[lead:].view(out.shape))


def cache_rows(shape, mode: str) -> int:
    """Rows of dim 0 the cache build quantizes together in a fused expert tensor of ``shape``: the
    fewest whose values fill whole blocks (one expert, unless a row's values are not a multiple of
    the block)."""
    return BLOCKSIZE[mode] // math.gcd(math.prod(shape[1:]), BLOCKSIZE[mode])


def _codes_shape(shape, mode: str) -> list[int]:
    """The stored shape of a tensor's codes (``quantize_cpu``'s): NF4 packs two a byte in one column."""
    return [math.prod(shape) // 2, 1] if mode == "nf4" else list(shape)


def hash_weight_map(ck: Checkpoint) -> str:
    items = sorted((k, ck.tensor_info(k)[0], ck.tensor_info(k)[1]) for k in ck.weight_map)
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def layer_weights(ck: Checkpoint, mode: str, root: str | Path, device="cpu", progress: bool = False):
    """The weight source for ``--quant MODE``: the checkpoint itself, or a quantized cache under ``root``."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"--quant {mode!r}: choose one of {', '.join(QUANT_MODES)}")
    if mode == "none":
        return OriginalWeights(ck)
    return QuantizedWeights(ck, root, mode, device=device, progress=progress)


# ---- quantized compute ---------------------------------------------------------------------------

BYTES_PER_PARAM = {"nf4": 0.5 + 4 / BLOCKSIZE["nf4"], "int8": 1 + 4 / BLOCKSIZE["int8"]}  # codes + fp32 absmax


def check_quant_mode(mode: str) -> None:
    """``--quant`` is valid and, when it is not ``none``, bitsandbytes can be imported (ConfigError)."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"--quant {mode!r}: choose one of {', '.join(QUANT_MODES)}")
    if mode != "none":
        _bnb()


@dataclass
class QTensor:
    """One weight matrix as bitsandbytes codes (NF4: two per byte; int8: the dynamic 8-bit map)
    plus one fp32 absmax per block, on the device it is computed on."""

    mode: str
    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    code: torch.Tensor | None = None  # int8: the 256-value map

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax, self.code) if t is not None)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The matrix in ``dtype``, on the codes' device (bitsandbytes' CUDA kernels on a GPU; on the
        CPU ``dequantize_cpu``, bitsandbytes' arithmetic a chunk at a time). ``out``: a contiguous CPU
        tensor of ``dtype`` and the matrix's size to write it into (no new tensor)."""
        if self.codes.device.type == "cpu":
            return dequantize_cpu(self, dtype, out)
        F = _bnb()
        if self.mode == "nf4":
            st = F.QuantState(absmax=self.absmax, shape=self.shape, blocksize=BLOCKSIZE["nf4"], quant_type="nf4", dtype=dtype)
            w = F.dequantize_4bit(self.codes, st)
        else:
            st = F.QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=BLOCKSIZE["int8"], dtype=dtype)
            w = F.dequantize_blockwise(self.codes, st)
        return w.reshape(self.shape).to(dtype)


# Values dequantized per step on the CPU: the step's temporaries (int32 indices, the looked-up values,
# their float32 products: 12 bytes a value) stay in the CPU's cache and are reused, where
# bitsandbytes' CPU path makes three tensors of the matrix's size (fresh mappings under --max-ram's
# mmap threshold). A multiple of both block sizes.
DEQUANT_STEP = 1 << 16
_scratch = threading.local()  # per thread: (int32 indices, uint8 nibbles, values, float32 products)


def _nf4_table() -> torch.Tensor:
    """The 16 NF4 values as float32 (bitsandbytes' own table)."""
    return _bnb().get_4bit_type("nf4", device="cpu").float()


def dequantize_cpu(qt: "QTensor", dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``qt`` dequantized on the CPU into ``out`` (made if None): bitsandbytes' CPU arithmetic to the bit
    (its default ``dequantize_4bit`` and ``dequantize_blockwise``: each code's table value -- for NF4 the
    table cast to ``dtype`` first -- times its block's float32 absmax, in float32, cast to ``dtype``), one
    step of ``DEQUANT_STEP`` values at a time through reused scratch buffers (tested equal)."""
    n = math.prod(qt.shape)
    if out is None:
        out = torch.empty(qt.shape, dtype=dtype)
    if out.dtype != dtype or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"dequantize into a contiguous {dtype} tensor of {n} values, got {out.dtype} {tuple(out.shape)}")
    nf4 = qt.mode == "nf4"
    bs = BLOCKSIZE[qt.mode]
    table = (_nf4_table().to(dtype) if nf4 else qt.code.float()).contiguous()
    codes, absmax, flat = qt.codes.reshape(-1), qt.absmax.reshape(-1), out.reshape(-1)
    step = DEQUANT_STEP
    have = getattr(_scratch, "bufs", None)
    if have is None or have[2].dtype != table.dtype:
        have = (torch.empty(step, dtype=torch.int32), torch.empty(step // 2, dtype=torch.uint8),
                torch.empty(step, dtype=table.dtype), torch.empty(step, dtype=torch.float32))
        _scratch.bufs = have
    idx, nib, vals, prod = have
    for a in range(0, n, step):
        m = min(step, n - a)
        if nf4:  # two codes a byte, the high nibble first
            c = codes[a // 2:(a + m + 1) // 2]
            k = c.numel()
            torch.bitwise_right_shift(c, 4, out=nib[:k])
            idx[:2 * k:2].copy_(nib[:k])
            torch.bitwise_and(c, 0xF, out=nib[:k])
            idx[1:2 * k:2].copy_(nib[:k])
        else:
            idx[:m].copy_(codes[a:a + m])
        torch.index_select(table, 0, idx[:m], out=vals[:m])
        full = m // bs * bs  # whole blocks, then a last partial one (the matrix's end)
        if full:
            torch.mul(vals[:full].view(-1, bs), absmax[a // bs:(a + full) // bs].view(-1, 1), out=prod[:full].view(-1, bs))
        if m > full:
            torch.mul(vals[full:m], absmax[(a + full) // bs], out=prod[full:m])
        flat[a:a + m].copy_(prod[:m])
    return out


NF4_ROUND_TRIP_MAX = 0.1  # mean |error| of NF4 (blocks of 64) on N(0, 1) data is about 0.073
_nf4_checked: set[tuple] = set()


def check_nf4(device: str | torch.device, shape: tuple[int, ...]) -> None:
    """ConfigError unless bitsandbytes' NF4 round trip on ``device`` is as accurate as NF4 is for
    matrices of ``shape`` (checked once per device type and shape, on N(0, 1) data).

    bitsandbytes 0.49-0.50's CPU path gets some shapes wrong: a 128x96 matrix (row length not a
    multiple of the block) comes back with a mean error of 0.17 instead of 0.073 (0.48 and 96x128 give
    0.073); on the 96-wide toy, streaming-eval perplexity on reverse was 7.4 under NF4, 1.004 in fp32.
    lowmoe no longer runs bitsandbytes' NF4 on the CPU (``quantize_cpu``, ``dequantize_cpu``), so
    ``quantize_tensor`` checks the devices it does run it on."""
    kind, shape = torch.device(device).type, tuple(int(d) for d in shape)
    if (kind, shape) in _nf4_checked:
        return
    F = _bnb()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    q, st = F.quantize_4bit(x, quant_type="nf4", blocksize=BLOCKSIZE["nf4"])
    err = float((F.dequantize_4bit(q, st).reshape(x.shape).float() - x).abs().mean())
    if not err <= NF4_ROUND_TRIP_MAX:
        import bitsandbytes

        raise ConfigError(f"--quant nf4: bitsandbytes {bitsandbytes.__version__} round-trips a {'x'.join(map(str, shape))} "
                          f"matrix on {kind} with a mean error of {err:.3f} (NF4 gives about 0.073); "
                          "install bitsandbytes<0.49 or use --quant int8")
    _nf4_checked.add((kind, shape))


def quantize_tensor(t: torch.Tensor, mode: str, device: str | torch.device = "cpu") -> QTensor:
    """Quantize ``t`` on ``device`` (moved there first, so a GPU does the work) as the EEP cache does:
    NF4 with blocks of 64, or blockwise dynamic int8 with blocks of 256 (on the CPU ``quantize_cpu``:
    bitsandbytes' arithmetic a step at a time)."""
    F = _bnb()
    x = t.to(device).contiguous()
    if mode not in BLOCKSIZE:
        raise ConfigError(f"--quant {mode!r}: choose one of {', '.join(QUANT_MODES)}")
    if x.device.type == "cpu":
        return quantize_cpu(x, mode)  # not bitsandbytes' CPU kernels: nothing of theirs to check
    if mode == "nf4":
        check_nf4(x.device, x.shape)
        q, st = F.quantize_4bit(x, quant_type="nf4", blocksize=BLOCKSIZE["nf4"])
        return QTensor(mode, q, st.absmax.float(), x.shape)
    q, st = F.quantize_blockwise(x, blocksize=BLOCKSIZE["int8"])
    return QTensor(mode, q, st.absmax.float(), x.shape, st.code)


# Values quantized per step on the CPU (a multiple of both blocks): bitsandbytes' CPU path compares every
# value with every code at once -- a (values x 16) float32 tensor for NF4 (64 bytes a value), (values x
# 256) for int8 from a 16-bit dtype (1 KiB a value: 60 GB for one Mixtral-8x7B expert matrix) --; a step
# holds a few tensors of its own values, and finds each value's code between its two neighbouring codes
# (``nearest_code``, by a lookup on its float32 bits: ``_searchsorted``).
QUANT_STEP = 1 << 16


def nearest_code(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For each value of ``x``, the index (uint8) of ``table``'s value nearest to it: bitsandbytes'
    ``argmin(|x - table|)``, the first index on a tie, without its (values x table) tensor. ``table``
    ascends, so the nearest value is one of the two around x (``_searchsorted``); a rounded distance is
    monotone on each side of x, so the indices tying at the minimum are consecutive, and the first is
    found by stepping down from the lower one while the distance stays equal (rarely even once). A NaN
    (an all-zero block scaled by 1/0) is every distance's NaN, where argmin gives index 0."""
    k = table.numel()
    hi = _searchsorted(table, x).clamp_(1, k - 1)
    lo = hi - 1
    d_lo, d_hi = torch.abs(x - table[lo]), torch.abs(x - table[hi])
    best = torch.where(d_hi < d_lo, hi, lo).masked_fill_(torch.isnan(x), 0)
    dist = torch.minimum(d_lo, d_hi)
    while True:
        prev = (best - 1).clamp_(min=0)
        tie = (best > 0) & (torch.abs(x - table[prev]) == dist)
        if not bool(tie.any()):
            return best.to(torch.uint8)
        best = torch.where(tie, prev, best)


_BUCKET_SHIFT = 16  # a float32's sign, exponent and first 7 mantissa bits: 65536 buckets
_buckets: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}


def _searchsorted(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.searchsorted(table, x)`` (the count of ``table``'s values below each x), for float32 ``x``
    by a lookup: x's bucket (its bits' top 16) gives the count below the bucket and the one table value
    inside it, if any (``_bucket_table``), and x above that value adds one -- a gather and a comparison
    instead of a binary search (measured on one core: 7 ns a value instead of 40 against int8's 256
    codes, of 20 against NF4's 16). A NaN's count is not searchsorted's (the
    callers set its code apart). Other dtypes: ``torch.searchsorted``."""
    lut = _bucket_table(table) if x.dtype == torch.float32 and table.dtype == torch.float32 else None
    if lut is None:
        return torch.searchsorted(table, x)
    below, inside = lut
    b = (x.view(torch.int32) >> _BUCKET_SHIFT) + (1 << (31 - _BUCKET_SHIFT))  # 0 .. 65535, the sign's half first
    return below[b] + (x > inside[b])


def _bucket_table(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per bucket of float32 bit patterns (``_searchsorted``): how many of ``table``'s values lie below
    its smallest value, and the table value inside it (+inf where none); None when a bucket holds two
    (the binary search is kept). Built once per table."""
    key = tuple(table.tolist())
    if key not in _buckets:
        n = 1 << (32 - _BUCKET_SHIFT)
        top = torch.arange(n, dtype=torch.int64) - n // 2  # the buckets' top bits, as signed int32s
        first = (top << _BUCKET_SHIFT).to(torch.int32).view(torch.float32)
        last = ((top << _BUCKET_SHIFT) | ((1 << _BUCKET_SHIFT) - 1)).to(torch.int32).view(torch.float32)
        low = torch.where(top < 0, last, first)  # a negative bucket's values fall as its bits rise
        low = torch.where(torch.isnan(low), first, low)  # -inf's bucket: -inf, then NaNs
        tb = (table.view(torch.int32).to(torch.int64) >> _BUCKET_SHIFT) + n // 2
        if tb.unique().numel() < tb.numel():
            _buckets[key] = None
        else:
            inside = torch.full((n,), float("inf"))
            inside[tb] = table
            _buckets[key] = (torch.searchsorted(table, low), inside)
    return _buckets[key]


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map, the one ``quantize_blockwise`` uses by default."""
    F = _bnb()
    if "dynamic" not in F.name2qmap:
        F.name2qmap["dynamic"] = F.create_dynamic_map().to("cpu")
    return F.name2qmap["dynamic"].to("cpu")


def quantize_cpu(x: torch.Tensor, mode: str) -> QTensor:
    """``x`` (a CPU float tensor) quantized with bitsandbytes' CPU arithmetic to the bit (its default
    ``quantize_4bit``, and ``quantize_blockwise`` for a 16-bit dtype: each block's absmax, the values
    scaled by its float32 reciprocal and clamped to [-1, 1], the nearest code), ``QUANT_STEP`` values at
    a time (tested equal). int8 from float32 takes the same arithmetic: bitsandbytes runs a C++ kernel
    for it, which crashes the process (a segmentation fault, 0.48.2) on a block of zeros and whose
    codes differ from its own 16-bit path's."""
    bs, step = BLOCKSIZE[mode], QUANT_STEP
    flat = x.reshape(-1)
    n = flat.numel()
    full = n // bs * bs
    rem = n - full
    absmax = torch.zeros(n // bs + (1 if rem else 0), dtype=torch.float32)
    # bitsandbytes scales whole blocks in float32 (a 16-bit block times its float32 reciprocal) and a last
    # partial one in the tensor's dtype (times a 0-d tensor), then compares them in the former's dtype
    scaled_dtype = torch.promote_types(x.dtype, torch.float32) if full else x.dtype
    table = (_nf4_table() if mode == "nf4" else _dynamic_map()).to(scaled_dtype)
    out = torch.empty(n // 2 if mode == "nf4" else n, dtype=torch.uint8)

    def nearest(scaled: torch.Tensor, at: int) -> None:
        q = nearest_code(scaled.reshape(-1).to(scaled_dtype), table)
        if mode == "nf4":  # two codes a byte, the first in the high nibble
            out[at // 2:(at + q.numel()) // 2] = q[::2] << 4 | q[1::2]
        else:
            out[at:at + q.numel()] = q

    for a in range(0, full, step):
        z = min(full, a + step)
        blocks = flat[a:z].reshape(-1, bs)
        absmax[a // bs:z // bs] = torch.abs(blocks).max(dim=-1)[0]
        nearest(torch.clamp(blocks * (1 / absmax[a // bs:z // bs].view(-1, 1)), -1, 1), a)
    if rem:
        last = flat[full:]
        absmax[-1] = torch.abs(last).max()
        nearest(torch.clamp(last * (1 / absmax[-1]), -1, 1), full)
    if mode == "nf4":
        return QTensor(mode, out.view(-1, 1), absmax, x.shape)
    return QTensor(mode, out.view(x.shape), absmax, x.shape, _dynamic_map())


class QuantLinear(nn.Module):
    """``nn.Linear`` with its weight held as a ``QTensor``: y = x W^T + b, W dequantized per call.

    The codes are a plain attribute, not a buffer, so ``hf.materialize`` (``to_empty``) leaves
    them alone; the bias (if any) is an ordinary parameter filled from the layer's state."""

    def __init__(self, weight: QTensor, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.qweight = weight
        self.bias = linear.bias  # meta until materialized, or None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.qweight.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.qweight.dequantize(x.dtype), self.bias)


def _quantized_linear(name: str, lin: nn.Linear, router: str) -> bool:
    """Attention / MLP / shared-expert projections are quantized; gates stay exact: the router and
    scalar gates such as Qwen2-MoE's ``shared_expert_gate`` (one output)."""
    return name != router and lin.out_features > 1


def build_quantized_layer(skel, layer_idx: int, runtime_state: dict[str, torch.Tensor], device, dtype: torch.dtype,
                          mode: str, *, accountant=None) -> nn.Module:
    """Decoder layer ``layer_idx`` on ``device`` with its linear weights quantized (``mode`` nf4/int8)
    and everything else exact in ``dtype`` (same arguments as ``hf.materialize_layer``).

    Weights are quantized where they will be used (on a GPU, by bitsandbytes' CUDA kernels), one
    expert matrix at a time, so the full-precision copy on the device never exceeds one matrix."""
    device = torch.device(device)
    ad = skel.adapter
    module = skel.new_layer(layer_idx)  # meta
    exact = dict(runtime_state)
    qbytes = 0
    router = ad.runtime_moe_prefix + ad.runtime_router
    for name, lin in list(module.named_modules()):
        if isinstance(lin, nn.Linear) and _quantized_linear(name, lin, router):
            q = quantize_tensor(exact.pop(name + ".weight"), mode, device)
            module.set_submodule(name, QuantLinear(q, lin))
            qbytes += q.nbytes
    if layer_idx in skel.moe_layers:
        block = moe_modules(ad, module)[0]
        experts, exact = split_experts(ad, exact)
        quantized = {}
        for pname, p in block.experts.named_parameters(recurse=False):
            if p.ndim == 3:
                t = experts.pop(pname)  # (E, ...)
                quantized[pname] = [quantize_tensor(t[e], mode, device) for e in range(t.shape[0])]
        exact.update({ad.runtime_moe_prefix + "experts." + k: v for k, v in experts.items()})  # kept exact (biases)
        block.experts = QuantExperts(block.experts, quantized, dtype)
        qbytes += block.experts.nbytes
    built = materialize(module, exact, device, dtype)
    if accountant is not None:
        accountant.track(built, qbytes + sum(v.numel() for v in exact.values()) * dtype_bytes(dtype))
    return built


def check_quant_budget(plan, ck: Checkpoint, mode: str, dtype: torch.dtype) -> None:
    """With ``--quant``, every layer is built whole and quantized (no expert chunking): its codes, its
    exact tensors (router, norms, biases, gates) and the most it dequantizes at once (one expert's
    matrices, or the largest other matrix) must fit the planned weights budget
    (``budget.BudgetPlan.weights_budget``); ConfigError naming the flag otherwise. From the index."""
    if mode == "none" or plan is None or plan.weights_budget is None:
        return
    b = dtype_bytes(dtype)
    ad = ck.adapter
    moe = set(ck.moe_layers())
    flag = "--max-vram" if plan.max_vram is not None and plan.device_budget == plan.max_vram else "--max-ram"
    for L in range(ck.num_layers):
        prefix = ad.layer_prefix(L)
        expert_keys: set[str] = set()
        if L in moe:
            expert_keys = set(ad.routed_expert_keys(L, ck.num_experts))
        quantized = exact = largest = experts_q = 0
        for key in ck.layer_keys(L):
            shape = ck.tensor_info(key)[0]
            n, rel = math.prod(shape), key[len(prefix):]
            if len(shape) >= 2 and shape[0] > 1 and not rel.endswith("bias") and not ad.is_router_key(rel):
                quantized += n
                if key in expert_keys:
                    experts_q += n
                else:
                    largest = max(largest, n)
            else:
                exact += n
        one_expert = experts_q // ck.num_experts if L in moe else 0  # dequantized together (QuantExperts)
        need = int(quantized * BYTES_PER_PARAM[mode]) + (exact + max(largest, one_expert)) * b
        if need > plan.weights_budget:
            raise ConfigError(f"{flag} {fmt_bytes(plan.device_budget)}: layer {L} quantized ({mode}) needs "
                              f"{fmt_bytes(need)} for its weights next to {fmt_bytes(plan.activation_bytes)} of activations "
                              f"(--quant layers are not expert-chunked); raise {flag} or use --quant none")
