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

from dataclasses import dataclass
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
    # Other per-expert routing tensors, relative to the MoE block on disk (e.g. MiniMax-M2's
    # ``e_score_correction_bias`` beside the gate): sliced with the router, experts on the LAST dim.
    router_extra: tuple[str, ...] = ()
    expert_layout: str = "per_expert"  # or "fused"
    # per_expert: the (gate, up, down) projection names; fused: tensor names under experts.
    expert_projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    fused_tensors: tuple[str, ...] = ()
    # fused: the folder of fused_tensors inside the MoE block on disk ("" for GraniteMoE's input_linear).
    fused_dir: str = "experts."
    # Tensors renamed inside the MoE block between disk and runtime (disk name, runtime name), e.g.
    # ERNIE-4.5's moe_statics.e_score_correction_bias -> gate.moe_statics.e_score_correction_bias.
    moe_renames: tuple[tuple[str, str], ...] = ()
    # Runtime fused tensor names transformers builds from the per-expert tensors.
    runtime_gate_up: str = "gate_up_proj"
    runtime_down: str = "down_proj"
    top_k_key: str = "num_experts_per_tok"
    # Layer tensors outside the MoE block renamed between disk and runtime: (disk name, runtime name),
    # relative to the layer, e.g. MiMo-V2's self_attn.attention_sink_bias -> self_attn.sinks.
    layer_renames: tuple[tuple[str, str], ...] = ()
    # Layer tensors outside the MoE block that transformers concatenates on load: (disk names in order,
    # runtime name, dim), relative to the layer, e.g. Kimi-Linear's q/k/v_conv1d -> self_attn.conv1d
    # (dim 0; split back into equal parts, as its save_pretrained does).
    layer_concats: tuple[tuple[tuple[str, ...], str, int], ...] = ()
    # Callable(config) -> set of layer indices whose MLP is dense (no routed experts); None: the
    # layers without a router, as the checkpoint's index (or transformers' module tree) shows them.
    dense_layers: Callable[[dict], set[int]] | None = None
    # Config key naming how many layers past num_hidden_layers the published checkpoints carry (MTP).
    # Only for the report: the layers copied are those the index holds, whatever the config says.
    extra_layers_key: str = ""
    # Whether the router uses DeepSeek-style group-limited routing (n_group / topk_group).
    grouped_routing: bool = False
    # How the router turns logits into per-expert scores: "softmax" or "sigmoid" (DeepSeek-V3).
    router_scoring: str = "softmax"
    # Whether transformers' MoE block exposes the router -> experts(hidden, top_k_index, top_k_weights)
    # calls that hf.MoeProbe hooks (calibration scoring); False: only --plan runs are possible.
    probes: bool = True
    notes: str = ""

    # ---- key templates -------------------------------------------------------------------
    def layer_prefix(self, layer_idx: int) -> str:
        return f"model.layers.{layer_idx}."

    def router_keys(self, layer_idx: int) -> list[str]:
        """Every per-expert routing tensor of a layer (router rows first, then ``router_extra``)."""
        block = self.layer_prefix(layer_idx) + self.moe_prefix
        return [block + self.router + "." + t for t in self.router_tensors] + [block + t for t in self.router_extra]

    def expert_keys(self, layer_idx: int, expert_idx: int) -> list[str]:
        """On-disk keys of one expert (per_expert layout only), in (gate, up, down) order."""
        base = self.layer_prefix(layer_idx) + self.moe_prefix + f"experts.{expert_idx}."
        return [base + p + ".weight" for p in self.expert_projs]

    def fused_keys(self, layer_idx: int) -> list[str]:
        base = self.layer_prefix(layer_idx) + self.moe_prefix + self.fused_dir
        return [base + t for t in self.fused_tensors]

    def routed_expert_keys(self, layer_idx: int, num_experts: int) -> list[str]:
        """Every on-disk key of the layer's routed experts (per expert in order, or the fused tensors):
        what sizes, budgets and the index check count as "experts"; everything else is resident."""
        if self.expert_layout == "per_expert":
            return [k for e in range(num_experts) for k in self.expert_keys(layer_idx, e)]
        return self.fused_keys(layer_idx)

    def is_expert_key(self, key_in_layer: str) -> bool:
        if self.is_router_extra(key_in_layer):  # a routing tensor stored under experts. (Laguna's bias)
            return False
        if self.expert_layout == "fused" and not self.fused_dir:
            return key_in_layer in {self.moe_prefix + t for t in self.fused_tensors}
        return key_in_layer.startswith(self.moe_prefix + (self.fused_dir if self.expert_layout == "fused" else "experts."))

    def is_router_extra(self, key_in_layer: str) -> bool:
        return key_in_layer in {self.moe_prefix + t for t in self.router_extra}

    def is_router_key(self, key_in_layer: str) -> bool:
        return (key_in_layer.startswith(self.moe_prefix + self.router + ".")
                or key_in_layer in {self.moe_prefix + t for t in self.router_extra})

    # ---- config --------------------------------------------------------------------------
    def num_experts(self, cfg: dict) -> int:
        for k in self.expert_count_keys:
            if cfg.get(k) is not None:
                return int(cfg[k])
        raise KeyError(self.expert_count_keys[0])

    def top_k(self, cfg: dict) -> int:
        return int(cfg[self.top_k_key])

    def moe_layers(self, cfg: dict, present: Callable[[int], bool] | None = None) -> list[int]:
        """Decoder layers with routed experts: by the adapter's config rule, else those for which
        ``present(layer)`` (a router found in the index or module tree), else all."""
        n = int(cfg["num_hidden_layers"])
        if self.dense_layers is not None:
            dense = self.dense_layers(cfg)
            return [i for i in range(n) if i not in dense]
        return [i for i in range(n) if present is None or present(i)]

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
        concat_of = {piece: (i, runtime) for pieces, runtime, _ in self.layer_concats for i, piece in enumerate(pieces)}
        concats: dict[str, dict[int, torch.Tensor]] = {}
        for key, t in tensors.items():
            k = key[len(prefix):]
            if k in concat_of:
                i, runtime = concat_of[k]
                concats.setdefault(runtime, {})[i] = t
                continue
            if is_moe and k.startswith(self.moe_prefix):
                rest = k[len(self.moe_prefix):]
                if self.expert_layout == "per_expert" and rest.startswith("experts.") and self.is_expert_key(k):
                    _, e, proj, _w = rest.split(".")
                    {g: gates, u: ups, d: downs}[proj][int(e)] = t
                    continue
                renamed = dict(self.moe_renames).get(rest)
                if renamed is not None:
                    rest = renamed
                elif rest.startswith(self.router + "."):
                    rest = self.runtime_router + rest[len(self.router):]
                k = self.runtime_moe_prefix + rest
            elif k.startswith(self.moe_prefix) and self.moe_prefix != self.runtime_moe_prefix:
                k = self.runtime_moe_prefix + k[len(self.moe_prefix):]
            else:
                k = dict(self.layer_renames).get(k, k)
            out[k] = t
        for pieces, runtime, dim in self.layer_concats:
            if runtime in concats:
                out[runtime] = torch.cat([concats[runtime][i] for i in range(len(pieces))], dim)
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
        concat = {runtime: (pieces, dim) for pieces, runtime, dim in self.layer_concats}
        for k, t in runtime.items():
            if k in concat:
                pieces, dim = concat[k]
                out.update({prefix + p: c.clone() for p, c in zip(pieces, torch.chunk(t, len(pieces), dim))})
                continue
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
                back = {r: d for d, r in self.moe_renames}.get(rest)
                if back is not None:
                    rest = back
                elif rest.startswith(self.runtime_router + "."):
                    rest = self.router + rest[len(self.runtime_router):]
                out[prefix + self.moe_prefix + rest] = t
            elif k.startswith(self.runtime_moe_prefix) and self.moe_prefix != self.runtime_moe_prefix:
                out[prefix + self.moe_prefix + k[len(self.runtime_moe_prefix):]] = t
            else:
                out[prefix + {r: d for d, r in self.layer_renames}.get(k, k)] = t
        return out
