"""Lazy, layer-at-a-time reading of a sharded safetensors checkpoint.

``Checkpoint`` parses ``config.json`` and ``model.safetensors.index.json`` (or a single
``model.safetensors``) and reads exactly the tensors asked for. Shard files are opened once with
``safe_open`` and kept open (re-opening re-parses the header); reads are grouped by shard and
ordered by file offset. The ``pread`` backend is used where safetensors has it, so tensors that
were read do not stay mapped into this process's memory.

Quantized checkpoints (FP8 block, MXFP4; ``formats.detect_format``) are seen through *logical*
keys: ``read``/``read_layer``/``layer_keys`` give each quantized weight dequantized to the compute
dtype (FP8 ``X.weight``; MXFP4 ``...experts.gate_up_proj`` in transformers' runtime layout), so the
rest of the engine computes on ordinary float tensors. ``read_stored`` gives the stored tensors of
logical keys unchanged (FP8 values + ``weight_scale_inv``; MXFP4 ``_blocks`` + ``_scales``), for
copying kept experts byte for byte.

Inputs that lie are refused with a line naming the file and what was expected: each shard's header
is checked before use (its length, its JSON, every tensor's ``data_offsets`` inside the file and
matching its dtype and shape: a truncated or corrupt shard), every tensor read is checked for
NaN/Inf (naming the layer and expert), and ``validate`` checks that config.json and the index agree
on the expert count.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from .adapters import Adapter, get_adapter
from .device import DTYPES, all_finite
from .formats import QuantFormat, detect_format
from ..errors import CheckpointError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")

# safetensors dtype codes -> torch dtypes (the stored element type): the one table the reader, the
# group reader (``lazy``) and the writer use.
ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_BYTES = {code: dtype.itemsize for code, dtype in ST_TORCH.items()}


def check_header(path: Path) -> None:
    """A safetensors shard's header against its file: CheckpointError naming the shard and tensor."""
    read_header(path)


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors shard's JSON header, checked against its file, and the file offset where its data
    starts: CheckpointError naming the shard and tensor when they do not agree."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors shard (8-byte header length "
                                      "expected); the file is truncated: re-download or re-copy it")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes); "
                                      "the shard is truncated or corrupt: re-download or re-copy it")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not a JSON object ({str(e)[:80]}); the shard is corrupt") from None
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(x) for x in info["shape"]]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry {key!r} lacks a valid dtype, shape or data_offsets; the shard is corrupt") from None
        if not 0 <= begin <= end:
            raise CheckpointError(f"{path}: tensor {key!r} has data_offsets [{begin}, {end}] (expected 0 <= begin <= end)")
        if end > data:
            raise CheckpointError(f"{path}: tensor {key!r} has data_offsets [{begin}, {end}] past the end of the shard's "
                                  f"data ({data} bytes); the shard is truncated or corrupt: re-download or re-copy it")
        numel = 1
        for d in shape:
            numel *= d
        if dtype in DTYPE_BYTES and end - begin != numel * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: tensor {key!r} spans {end - begin} bytes but its shape {shape} and dtype {dtype} "
                                  f"need {numel * DTYPE_BYTES[dtype]}; the shard is corrupt")
    return header, 8 + n


_FLOAT_CHECKED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")


def check_finite(path: Path, key: str, t: torch.Tensor, num_experts: int | None = None) -> None:
    """NaN/Inf in a weight: CheckpointError naming the shard, the tensor, its layer and expert."""
    if t.dtype not in _FLOAT_CHECKED or all_finite(t):
        return
    where = ""
    m = _LAYER_RE.match(key)
    if m:
        where = f" (layer {m.group(1)}"
        e = _EXPERT_RE.search(key)
        if e:
            where += f", expert {e.group(1)}"
        elif "expert" in key and "shared" not in key and t.dim() >= 2 and t.shape[0] == num_experts:
            bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist()  # fused (E, ...)
            where += f", expert{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:8]))}"
        where += ")"
    raise nonfinite_error(path, key, where, int((~torch.isfinite(t)).sum()))


def nonfinite_error(path: Path, key: str, where: str, n: int) -> CheckpointError:
    """The one-line error for ``n`` NaN/Inf values in tensor ``key`` of shard ``path`` (``where``: " (layer L, expert E)")."""
    return CheckpointError(f"{path}: tensor {key!r}{where} has {n} NaN/Inf value(s); expected finite weights "
                           "(the checkpoint is corrupt or was saved after a diverged step)")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # safetensors without the pread backend
        return safe_open(str(path), framework="pt")


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None


class Checkpoint:
    """A read-only view of a Hugging Face safetensors checkpoint directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a Hugging Face checkpoint folder)")
        self.config = read_json(self.path / "config.json", "config.json")
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.path / 'config.json'}: expected a JSON object, got {type(self.config).__name__}")
        self.adapter: Adapter = get_adapter(self.config, str(self.path / "config.json"))
        self._check_config()
        self.weight_map = self._load_weight_map()
        self._handles: dict[str, object] = {}
        # quantized formats: logical key -> its stored parts (one part: stored as is)
        self.quant_format: QuantFormat | None = detect_format(self.config, str(self.path / "config.json"))
        try:
            self.parts = (self.quant_format.group_keys(self.weight_map) if self.quant_format is not None
                          else {k: (k,) for k in self.weight_map})
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        if self.quant_format is None:
            scaled = next((k for k in self.weight_map if k.endswith(("weight_scale_inv", "_blocks", "_scales"))), None)
            if scaled is not None:
                raise CheckpointError(f"{self.path}: the index has {scaled!r} (a quantized weight's part) but config.json "
                                      "has no quantization_config; restore the config.json the checkpoint was published with")
        self.compute_dtype = _config_dtype(self.config) if self.quant_format is not None else None
        self._layer_keys: dict[int, list[str]] = defaultdict(list)
        self._other_keys: list[str] = []
        for key in self.parts:
            m = _LAYER_RE.match(key)
            if m:
                self._layer_keys[int(m.group(1))].append(key)
            else:
                self._other_keys.append(key)
        self._shapes: dict[str, tuple[tuple[int, ...], str]] | None = None

    # ---- index ---------------------------------------------------------------------------
    def _load_weight_map(self) -> dict[str, str]:
        idx = self.path / INDEX_NAME
        if idx.exists():
            data = read_json(idx, INDEX_NAME)
            wm = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{idx}: has no 'weight_map' object (expected a safetensors index)")
            for key, shard in wm.items():
                if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
                    raise CheckpointError(f"{idx}: weight_map[{key!r}] is {shard!r}; expected the file name of a "
                                          ".safetensors shard in the same folder")
            for shard in sorted(set(wm.values())):
                if not (self.path / shard).is_file():
                    raise CheckpointError(f"{self.path / shard}: shard named in {INDEX_NAME} is missing")
            return dict(wm)
        single = self.path / SINGLE_NAME
        if single.is_file():
            with self._open_checked(SINGLE_NAME) as f:
                return {k: SINGLE_NAME for k in f.keys()}
        raise CheckpointError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME} (only safetensors checkpoints are supported)")

    def _open_checked(self, shard: str):
        check_header(self.path / shard)
        try:
            return _open(self.path / shard)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{self.path / shard}: cannot read safetensors shard ({e}); re-download or re-copy it") from None

    def _handle(self, shard: str):
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = self._open_checked(shard)
        return h

    def close(self) -> None:
        self._handles.clear()

    # ---- structure -----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def num_experts(self) -> int:
        return self.adapter.num_experts(self.config)

    @property
    def top_k(self) -> int:
        return self.adapter.top_k(self.config)

    def moe_layers(self) -> list[int]:
        return self.adapter.moe_layers(self.config, present=lambda i: self.adapter.router_keys(i)[0] in self.parts)

    def extra_layers(self) -> list[int]:
        """Layers the index holds past ``num_hidden_layers`` (e.g. DeepSeek-V3's MTP layer): copied
        unchanged. Taken from the index alone: transformers' ``save_pretrained`` writes no MTP layer
        even where config.json declares one (``num_nextn_predict_layers``)."""
        return sorted(i for i in self._layer_keys if i >= self.num_layers)

    def missing_extra_layers(self) -> list[int]:
        """Layers config.json declares past ``num_hidden_layers`` (the adapter's ``extra_layers_key``)
        that the index does not hold: skipped, with a note in the report."""
        key = self.adapter.extra_layers_key
        declared = int(self.config.get(key) or 0) if key else 0
        return [i for i in range(self.num_layers, self.num_layers + declared) if i not in self._layer_keys]

    def layer_keys(self, layer_idx: int) -> list[str]:
        return list(self._layer_keys.get(layer_idx, []))

    def other_keys(self) -> list[str]:
        """Keys outside any decoder layer: embeddings, final norm, lm_head."""
        return list(self._other_keys)

    def is_quantized(self, key: str) -> bool:
        """Whether logical ``key`` is stored quantized (values + scales)."""
        return len(self.parts.get(key, ())) > 1

    def tensor_info(self, key: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype string) without reading data; a logical MXFP4 weight gives its
        dequantized shape and the compute dtype."""
        if self._shapes is None:
            self._shapes = {}
        if key not in self.weight_map and self.is_quantized(key):
            info = {p: self.tensor_info(p)[0] for p in self.parts[key]}
            return self.quant_format.logical_shape(info, key), _ST_NAMES[self.compute_dtype]
        if key not in self._shapes:
            shard = self.weight_map[key]
            try:
                sl = self._handle(shard).get_slice(key)
            except CheckpointError:
                raise
            except Exception:
                raise CheckpointError(f"{self.path / shard}: index names tensor {key!r} but the shard does not contain it") from None
            self._shapes[key] = (tuple(sl.get_shape()), sl.get_dtype())
        return self._shapes[key]

    def tensor_bytes(self, key: str) -> int:
        """Stored bytes of ``key`` (a logical quantized weight: of all its parts)."""
        if key not in self.weight_map or self.is_quantized(key):
            return sum(self._stored_bytes(p) for p in self.parts[key])
        return self._stored_bytes(key)

    def _stored_bytes(self, key: str) -> int:
        shape, dtype = self.tensor_info(key)
        n = 1
        for s in shape:
            n *= s
        return n * DTYPE_BYTES.get(dtype, 4)

    def layer_bytes(self, layer_idx: int) -> int:
        """Bytes of the layer on disk."""
        return sum(self.tensor_bytes(k) for k in self.layer_keys(layer_idx))

    def layer_read_bytes(self, layer_idx: int) -> int:
        """Bytes of the layer in memory as ``read_layer`` returns it: quantized weights dequantized
        to the compute dtype (2x an FP8 layer's bytes in bf16, ~4x an MXFP4 one's)."""
        return sum(self.read_bytes(k) for k in self.layer_keys(layer_idx))

    def read_bytes(self, key: str) -> int:
        """Bytes of tensor ``key`` as ``read`` returns it (a quantized weight: dequantized to the compute dtype)."""
        if self.quant_format is None or not self.is_quantized(key):
            return self.tensor_bytes(key)
        n = 1
        for s in self.tensor_info(key)[0]:
            n *= s
        return n * torch.tensor([], dtype=self.compute_dtype).element_size()

    def total_bytes(self) -> int:
        return sum(self._stored_bytes(k) for k in self.weight_map)

    def validate(self) -> None:
        """Fail fast, from config.json and the index alone, if an expected tensor is missing or the
        index holds more experts than config.json says."""
        ad, cfg = self.adapter, self.config
        self._check_expert_count()
        for k in ad.expert_count_keys[:1]:
            if cfg.get(k) is None and not any(cfg.get(x) is not None for x in ad.expert_count_keys):
                raise CheckpointError(f"{self.path / 'config.json'}: missing {k!r} (the routed-expert count)")
        if cfg.get(ad.top_k_key) is None:
            raise CheckpointError(f"{self.path / 'config.json'}: missing {ad.top_k_key!r} (experts per token)")
        missing = []
        for layer in range(self.num_layers):
            if not self._layer_keys.get(layer):
                missing.append(f"model.layers.{layer}.*")
                continue
        moe = set(self.moe_layers())
        for layer in range(self.num_layers):  # experts without a router: the router is what is missing
            if layer not in moe and any(ad.is_expert_key(k[len(ad.layer_prefix(layer)):]) for k in self._layer_keys.get(layer, [])):
                missing += ad.router_keys(layer)[:1]
        for layer in self.moe_layers():
            want = ad.router_keys(layer) + ad.routed_expert_keys(layer, self.num_experts)
            missing += [k for k in want if k not in self.parts]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(
                f"{self.path}: the index has no tensor {', '.join(missing[:3])}{more} "
                f"(expected by the {ad.family} layout); the checkpoint is incomplete or not a {ad.family} model"
            )

    def _check_config(self) -> None:
        """The config.json values lowmoe reads: positive integers where counts are expected."""
        cfg, ad, where = self.config, self.adapter, self.path / "config.json"

        def count(key: str, required: bool = True, minimum: int = 1, maximum: int = 1 << 20) -> None:
            v = cfg.get(key)
            if v is None and not required:
                return
            if not isinstance(v, int) or isinstance(v, bool) or not minimum <= v <= maximum:
                raise CheckpointError(f"{where}: {key!r} is {v!r}; expected an integer from {minimum} to {maximum}")

        count("num_hidden_layers", maximum=4096)
        count("hidden_size")
        key = next((k for k in ad.expert_count_keys if cfg.get(k) is not None), None)
        if key is None:
            raise CheckpointError(f"{where}: missing {ad.expert_count_keys[0]!r} (the routed-expert count)")
        count(key)
        count(ad.top_k_key)
        if cfg[ad.top_k_key] > cfg[key]:
            raise CheckpointError(f"{where}: {ad.top_k_key!r} is {cfg[ad.top_k_key]} but the model has only {cfg[key]} experts "
                                  f"({key!r})")
        for k in ("first_k_dense_replace", "decoder_sparse_step", "num_nextn_predict_layers", "n_shared_experts"):
            count(k, required=False, minimum=0)
        for k in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "n_group", "topk_group"):
            count(k, required=False, maximum=1 << 31)
        only = cfg.get("mlp_only_layers")
        if only is not None and (not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only)):
            raise CheckpointError(f"{where}: 'mlp_only_layers' is {only!r}; expected a list of layer indices")
        try:
            layers = self.adapter.moe_layers(cfg)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise CheckpointError(f"{where}: cannot tell which layers are MoE layers ({type(e).__name__}: {e})") from None
        if not layers:
            raise CheckpointError(f"{where}: no layer has routed experts (num_hidden_layers {cfg['num_hidden_layers']}); "
                                  "nothing to prune")

    def _check_expert_count(self) -> None:
        ad, E = self.adapter, self.num_experts
        key = next((k for k in ad.expert_count_keys if self.config.get(k) is not None), ad.expert_count_keys[0])
        cfg_path = self.path / "config.json"
        if not isinstance(E, int) or isinstance(E, bool) or E < 1:
            raise CheckpointError(f"{cfg_path}: {key!r} is {self.config.get(key)!r}; expected a positive expert count")
        for layer in self.moe_layers():
            if ad.expert_layout == "per_expert":
                ids = {int(m.group(1)) for k in self._layer_keys.get(layer, []) for m in [_EXPERT_RE.search(k)] if m}
                if ids and max(ids) >= E:
                    raise CheckpointError(f"{cfg_path}: {key!r} is {E} but the index has expert {max(ids)} in layer {layer} "
                                          f"({len(ids)} experts); config.json and {INDEX_NAME} must agree")
            else:
                for k in ad.fused_keys(layer):
                    if k in self.weight_map and "expert" in k and "shared" not in k:
                        shape, _ = self.tensor_info(k)
                        if shape and shape[0] != E:
                            raise CheckpointError(f"{cfg_path}: {key!r} is {E} but {k} in the index holds {shape[0]} experts "
                                                  f"(shape {list(shape)}); config.json and the checkpoint must agree")

    # ---- reading -------------------------------------------------------------------------
    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read logical ``keys`` (grouped by shard, in file order): stored dtype preserved, quantized
        weights dequantized to the compute dtype (``config.json``'s dtype), one tensor at a time."""
        if self.quant_format is None:
            return self._read_raw(keys)
        raw = self.read_stored(keys)
        out = {}
        for k in keys:
            ps = self.parts[k]
            if len(ps) == 1:
                out[k] = raw.pop(ps[0])
                if out[k].dtype in _FP8_DTYPES:
                    raise CheckpointError(f"{self.path}: tensor {k!r} is {out[k].dtype} but has no {k}_scale_inv "
                                          "to dequantize it with")
            else:
                try:
                    out[k] = self.quant_format.dequantize(raw, k, self.compute_dtype)
                except CheckpointError as e:
                    raise CheckpointError(f"{self.path}: {e}") from None
                for p in ps:  # the stored parts are not kept once dequantized
                    del raw[p]
        return out

    def _read_raw(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read stored ``keys`` (grouped by shard, in file order), dtype preserved."""
        by_shard: dict[str, list[str]] = defaultdict(list)
        for k in keys:
            if k not in self.weight_map:
                raise CheckpointError(f"{self.path}: tensor {k!r} is not in the checkpoint index")
            by_shard[self.weight_map[k]].append(k)
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(by_shard):
            h = self._handle(shard)
            wanted = set(by_shard[shard])
            try:
                order = [k for k in h.offset_keys() if k in wanted]
            except AttributeError:
                order = sorted(wanted)
            missing = wanted - set(order)
            if missing:
                raise CheckpointError(
                    f"{self.path / shard}: index names tensor {sorted(missing)[0]!r} but the shard does not contain it"
                )
            for k in order:
                try:
                    out[k] = h.get_tensor(k)
                except Exception as e:
                    raise CheckpointError(f"{self.path / shard}: cannot read tensor {k!r} ({e}); the shard may be truncated") from None
                check_finite(self.path / shard, k, out[k], self.num_experts)
        return {k: out[k] for k in keys}

    def read_layer(self, layer_idx: int) -> dict[str, torch.Tensor]:
        keys = self.layer_keys(layer_idx)
        if not keys:
            raise CheckpointError(f"{self.path}: no tensors for layer {layer_idx} in the index")
        return self.read(keys)

    def read_stored(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The stored tensors of logical ``keys``, unchanged (quantized weights: values and scales)."""
        for k in keys:
            if k not in self.parts:
                raise CheckpointError(f"{self.path}: tensor {k!r} is not in the checkpoint index")
        return self._read_raw([p for k in keys for p in self.parts[k]])

    def read_layer_stored(self, layer_idx: int) -> dict[str, torch.Tensor]:
        keys = self.layer_keys(layer_idx)
        if not keys:
            raise CheckpointError(f"{self.path}: no tensors for layer {layer_idx} in the index")
        return self.read_stored(keys)

    def dequantize(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored tensors (stored keys, e.g. an output layer about to be written) -> logical keys,
        quantized weights dequantized to the compute dtype; unchanged for an unquantized checkpoint."""
        fmt = self.quant_format
        if fmt is None:
            return stored
        return {k: stored[ps[0]] if len(ps) == 1 else fmt.dequantize(stored, k, self.compute_dtype)
                for k, ps in fmt.group_keys(stored).items()}

    def extra_files(self) -> list[Path]:
        """Non-weight files to copy to the output (tokenizer, generation config, ...)."""
        skip = {"config.json", INDEX_NAME}
        out = []
        for p in sorted(self.path.iterdir()):
            if p.is_file() and p.name not in skip and not p.name.endswith(".safetensors") and not p.name.startswith("lowmoe_"):
                out.append(p)
        return out


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _config_dtype(cfg: dict) -> torch.dtype:
    """The dtype quantized weights are dequantized to: config.json's ``dtype``/``torch_dtype`` (as
    transformers does when it dequantizes on load), bfloat16 when absent."""
    return DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"), torch.bfloat16)


def dir_size(path: Path) -> int:
    return sum(os.path.getsize(p) for p in Path(path).rglob("*") if p.is_file())
