"""What an adapter says about one model family's checkpoint, as data.

An adapter names tensors exactly as the family's safetensors shards do, relative to one decoder
layer (``model.layers.{layer}.``), and the config keys that count experts. The rest of lowmoe
(reader, layer compute, writer) is written once against this description.

Two expert layouts exist on disk:

* ``per_expert``: one tensor per expert and projection, e.g.
  ``block_sparse_moe.experts.{expert}.w1.weight`` (Mixtral) -- transformers fuses them on load.
* ``fused``: one 3-D tensor per projection with experts on dim 0, e.g. GPT-OSS's
  ``mlp.experts.gate_up_proj`` (E, H, 2I).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    # Config keys that hold the routed-expert count; every one present in config.json is rewritten.
    expert_count_keys: tuple[str, ...]
    # Prefix of the MoE block inside a layer, on disk and inside transformers' module tree.
    moe_prefix: str = "mlp."
    runtime_moe_prefix: str = "mlp."
    # Router, relative to the MoE block, on disk and at runtime; and its per-expert tensors.
    router: str = "gate"
    runtime_router: str = "gate"
    router_tensors: tuple[str, ...] = ("weight",)
    expert_layout: str = "per_expert"  # or "fused"
    # per_expert: the (gate, up, down) projection names; fused: tensor names under experts.
    expert_projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    fused_tensors: tuple[str, ...] = ()
    # Runtime fused tensor names transformers builds from the per-expert tensors.
    runtime_gate_up: str = "gate_up_proj"
    runtime_down: str = "down_proj"
    top_k_key: str = "num_experts_per_tok"
    # Other layer-level tensors renamed between disk and runtime (disk suffix -> runtime suffix).
    # Callable(config) -> set of layer indices whose MLP is dense (no routed experts).
    dense_layers: Callable[[dict], set[int]] = field(default=lambda cfg: set())
    # Callable(config) -> list of extra layer indices (>= num_hidden_layers) copied unchanged.
    extra_layers: Callable[[dict], list[int]] = field(default=lambda cfg: [])
    # Whether the router uses DeepSeek-style group-limited routing (n_group / topk_group).
    grouped_routing: bool = False
    # How the router turns logits into per-expert scores: "softmax" or "sigmoid" (DeepSeek-V3).
    router_scoring: str = "softmax"
    notes: str = ""

    # ---- key templates -------------------------------------------------------------------
    def layer_prefix(self, layer_idx: int) -> str:
        return f"model.layers.{layer_idx}."

    def router_keys(self, layer_idx: int) -> list[str]:
        base = self.layer_prefix(layer_idx) + self.moe_prefix + self.router + "."
        return [base + t for t in self.router_tensors]

    def expert_keys(self, layer_idx: int, expert_idx: int) -> list[str]:
        """On-disk keys of one expert (per_expert layout only), in (gate, up, down) order."""
        base = self.layer_prefix(layer_idx) + self.moe_prefix + f"experts.{expert_idx}."
        return [base + p + ".weight" for p in self.expert_projs]

    def fused_keys(self, layer_idx: int) -> list[str]:
        base = self.layer_prefix(layer_idx) + self.moe_prefix + "experts."
        return [base + t for t in self.fused_tensors]

    def routed_expert_keys(self, layer_idx: int, num_experts: int) -> list[str]:
        """Every on-disk key of the layer's routed experts (per expert in order, or the fused tensors):
        what sizes, budgets and the index check count as "experts"; everything else is resident."""
        if self.expert_layout == "per_expert":
            return [k for e in range(num_experts) for k in self.expert_keys(layer_idx, e)]
        return self.fused_keys(layer_idx)

    def is_expert_key(self, key_in_layer: str) -> bool:
        return key_in_layer.startswith(self.moe_prefix + "experts.")

    def is_router_key(self, key_in_layer: str) -> bool:
        return key_in_layer.startswith(self.moe_prefix + self.router + ".")

    # ---- config --------------------------------------------------------------------------
    def num_experts(self, cfg: dict) -> int:
        for k in self.expert_count_keys:
            if cfg.get(k) is not None:
                return int(cfg[k])
        raise KeyError(self.expert_count_keys[0])

    def top_k(self, cfg: dict) -> int:
        return int(cfg[self.top_k_key])

    def moe_layers(self, cfg: dict) -> list[int]:
        dense = self.dense_layers(cfg)
        return [i for i in range(int(cfg["num_hidden_layers"])) if i not in dense]

    # ---- disk <-> runtime ----------------------------------------------------------------
    def to_runtime(self, layer_idx: int, tensors: dict[str, torch.Tensor], is_moe: bool) -> dict[str, torch.Tensor]:
        """Turn one layer's on-disk tensors (full keys) into the state dict of transformers'
        decoder-layer module: strip the layer prefix, rename the MoE block and router, and fuse
        per-expert projections into ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I)."""
        prefix = self.layer_prefix(layer_idx)
        out: dict[str, torch.Tensor] = {}
        gates: dict[int, torch.Tensor] = {}
        ups: dict[int, torch.Tensor] = {}
        downs: dict[int, torch.Tensor] = {}
        g, u, d = self.expert_projs
        for key, t in tensors.items():
            k = key[len(prefix):]
            if is_moe and k.startswith(self.moe_prefix):
                rest = k[len(self.moe_prefix):]
                if self.expert_layout == "per_expert" and rest.startswith("experts."):
                    _, e, proj, _w = rest.split(".")
                    {g: gates, u: ups, d: downs}[proj][int(e)] = t
                    continue
                if rest.startswith(self.router + "."):
                    rest = self.runtime_router + rest[len(self.router):]
                k = self.runtime_moe_prefix + rest
            elif k.startswith(self.moe_prefix) and self.moe_prefix != self.runtime_moe_prefix:
                k = self.runtime_moe_prefix + k[len(self.moe_prefix):]
            out[k] = t
        if gates:
            n = len(gates)
            exp = self.runtime_moe_prefix + "experts."
            out[exp + self.runtime_gate_up] = torch.stack([torch.cat([gates[e], ups[e]], 0) for e in range(n)])
            out[exp + self.runtime_down] = torch.stack([downs[e] for e in range(n)])
        return out

    def to_disk(self, layer_idx: int, runtime: dict[str, torch.Tensor], is_moe: bool) -> dict[str, torch.Tensor]:
        """Inverse of ``to_runtime``: a decoder layer's state dict -> on-disk keys and layout."""
        prefix = self.layer_prefix(layer_idx)
        out: dict[str, torch.Tensor] = {}
        exp = self.runtime_moe_prefix + "experts."
        g, u, d = self.expert_projs
        for k, t in runtime.items():
            if is_moe and k.startswith(self.runtime_moe_prefix):
                rest = k[len(self.runtime_moe_prefix):]
                if self.expert_layout == "per_expert" and k == exp + self.runtime_gate_up:
                    inter = t.shape[1] // 2
                    for e in range(t.shape[0]):
                        base = prefix + self.moe_prefix + f"experts.{e}."
                        out[base + g + ".weight"] = t[e, :inter].clone()
                        out[base + u + ".weight"] = t[e, inter:].clone()
                    continue
                if self.expert_layout == "per_expert" and k == exp + self.runtime_down:
                    for e in range(t.shape[0]):
                        out[prefix + self.moe_prefix + f"experts.{e}.{d}.weight"] = t[e].clone()
                    continue
                if rest.startswith(self.runtime_router + "."):
                    rest = self.router + rest[len(self.runtime_router):]
                out[prefix + self.moe_prefix + rest] = t
            elif k.startswith(self.runtime_moe_prefix) and self.moe_prefix != self.runtime_moe_prefix:
                out[prefix + self.moe_prefix + k[len(self.runtime_moe_prefix):]] = t
            else:
                out[prefix + k] = t
        return out
