"""Per-layer quantized weight cache (NF4 / int8 via bitsandbytes) for repeated streamed passes.

The EEP search (``lowmoe.eep``) streams the whole model once per generation. Reading a layer's
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
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import Checkpoint
from .errors import ConfigError

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "nf4")
MIN_NUMEL = 4096
BLOCKSIZE = {"nf4": 64, "int8": 256}
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
        self.F = _bnb()
        self._build(progress)

    # ---- building ------------------------------------------------------------------------
    def _quantizable(self, layer_idx: int, key: str, t: torch.Tensor) -> bool:
        rel = key[len(self.ck.adapter.layer_prefix(layer_idx)):]
        return (t.ndim >= 2 and t.numel() >= MIN_NUMEL and t.is_floating_point()
                and not self.ck.adapter.is_router_key(rel))

    def _path(self, layer_idx: int) -> Path:
        return self.root / f"layer{layer_idx:04d}.safetensors"

    def _build(self, progress: bool) -> None:
        marker = self.root / "quant.json"
        want = {"mode": self.mode, "blocksize": self.blocksize, "layers": self.ck.num_layers,
                "index": hash_weight_map(self.ck)}
        if marker.is_file() and json.loads(marker.read_text()) == want:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        layers = range(self.ck.num_layers)
        if progress:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc=f"quantize ({self.mode})", unit="layer", leave=False, dynamic_ncols=True)
        for layer_idx in layers:
            out, meta = {}, {}
            for key, t in self.ck.read_layer(layer_idx).items():
                if not self._quantizable(layer_idx, key, t):
                    out[key] = t.contiguous()
                    continue
                x = t.contiguous()
                if self.mode == "nf4":
                    q, st = self.F.quantize_4bit(x, quant_type="nf4", blocksize=self.blocksize)
                else:
                    q, st = self.F.quantize_blockwise(x, blocksize=self.blocksize)
                    out["__code__"] = st.code.float().contiguous()  # the same dynamic map for every tensor
                out[key + "::q"] = q.contiguous()
                out[key + "::absmax"] = st.absmax.float().contiguous()
                meta[key] = {"shape": list(t.shape), "dtype": str(t.dtype)}
            tmp = self._path(layer_idx).with_suffix(".tmp")
            save_file(out, str(tmp), metadata={"lowmoe_quant": json.dumps(meta)})
            os.replace(tmp, self._path(layer_idx))
        marker.write_text(json.dumps(want))
        log.info("quantized %d layers (%s) into %s: %.1f MB (checkpoint layers: %.1f MB)", self.ck.num_layers, self.mode,
                 self.root, self.cache_bytes() / 1e6, sum(self.ck.layer_bytes(i) for i in range(self.ck.num_layers)) / 1e6)

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
            q, absmax = raw[key + "::q"], raw[key + "::absmax"]
            shape, dtype = torch.Size(m["shape"]), _DTYPES[m["dtype"]]
            if self.mode == "nf4":
                st = self.F.QuantState(absmax=absmax, shape=shape, blocksize=self.blocksize, quant_type="nf4", dtype=dtype)
                w = self.F.dequantize_4bit(q, st)
            else:
                st = self.F.QuantState(absmax=absmax, shape=shape, code=code, blocksize=self.blocksize, dtype=dtype)
                w = self.F.dequantize_blockwise(q, st)
            out[key] = w.reshape(shape).to(dtype)
        # the checkpoint's key order; on CPU, where apply_layer works (dequantized on the GPU by
        # bitsandbytes' CUDA kernels when the device is one)
        return {k: out[k].cpu() for k in self.ck.layer_keys(layer_idx)}


def hash_weight_map(ck: Checkpoint) -> str:
    import hashlib

    items = sorted((k, ck.tensor_info(k)[0], ck.tensor_info(k)[1]) for k in ck.weight_map)
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def layer_weights(ck: Checkpoint, mode: str, root: str | Path, device="cpu", progress: bool = False):
    """The weight source for ``--quant MODE``: the checkpoint itself, or a quantized cache under ``root``."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"--quant {mode!r}: choose one of {', '.join(QUANT_MODES)}")
    if mode == "none":
        return OriginalWeights(ck)
    return QuantizedWeights(ck, root, mode, device=device, progress=progress)
