"""Helpers shared by the FP8 and MXFP4 end-to-end tests: load a checkpoint in transformers (which
dequantizes FP8 and MXFP4 on CPU), the same model with a plan's experts removed in memory, and the
raw stored tensors of a checkpoint (bytes as on disk)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

IDS = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))


def load(path, dtype=torch.float32):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info.get("mismatched_keys")
    return model.eval()


def stored(path: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor of a checkpoint, as on disk (no dequantization)."""
    wm = json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(wm.values())):
        with safe_open(str(Path(path) / shard), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def reference_pruned(model, num_experts: int, plan: dict):
    """``model`` (loaded by transformers, dequantized) with the plan's experts removed in memory:
    the runtime expert tensors and router rows sliced, loaded into a model of the pruned config."""
    new = {}
    for k, v in model.state_dict().items():
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        keep = plan["layers"].get(str(layer), {}).get("keep") if layer is not None else None
        per_expert = keep is not None and (".experts." in k or k.endswith(
            ("gate.weight", "router.weight", "router.bias", "e_score_correction_bias")))
        new[k] = v[keep].clone() if per_expert and v.shape[0] == num_experts else v
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    n = len(next(iter(plan["layers"].values()))["keep"])
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if hasattr(cfg, key):
            setattr(cfg, key, n)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    ref = AutoModelForCausalLM.from_config(cfg, dtype=next(iter(new.values())).dtype).eval()
    ref.load_state_dict(new, strict=True)
    return ref
