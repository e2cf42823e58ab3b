"""``lowmoe inspect``: what a checkpoint is and what pruning it will cost, from the index alone."""

from __future__ import annotations

from pathlib import Path

from .engine.checkpoint import Checkpoint
from .engine.memory import fmt_bytes

# Bytes of Python, torch and transformers before any tensor is loaded, measured on CPU.
BASE_OVERHEAD = 600 * 10**6


def estimate_peak_bytes(ck: Checkpoint, *, seq_len: int = 256, batch_size: int = 8, compute_bytes: int = 4) -> dict:
    """Peak memory of a prune: the largest layer as stored, the same layer in the compute dtype,
    (its pruned copy when propagating), one activation chunk in and out, plus a constant."""
    largest = max(ck.layer_bytes(i) for i in range(ck.num_layers))
    stored = ck.tensor_info(ck.layer_keys(0)[0])[1]
    stored_bytes = {"F32": 4, "BF16": 2, "F16": 2}.get(stored, 2)
    compute_layer = largest * compute_bytes // stored_bytes
    hidden = int(ck.config["hidden_size"])
    chunk = batch_size * seq_len * hidden * compute_bytes
    # Expert intermediate activations of one chunk: tokens x top_k x intermediate (x3 for gate/up/act).
    inter = int(ck.config.get("moe_intermediate_size") or ck.config.get("intermediate_size") or hidden * 4)
    moe_tmp = batch_size * seq_len * ck.top_k * inter * compute_bytes * 3
    embed = ck.tensor_bytes("model.embed_tokens.weight") if "model.embed_tokens.weight" in ck.weight_map else 0
    peak = largest + 2 * compute_layer + 4 * chunk + moe_tmp + BASE_OVERHEAD
    peak = max(peak, embed * compute_bytes // stored_bytes + BASE_OVERHEAD)
    return {"largest_layer_bytes": largest, "activation_chunk_bytes": chunk, "estimated_peak_bytes": peak}


def inspect_model(path: str | Path, **kw) -> dict:
    ck = Checkpoint(path)
    ck.validate()
    moe = set(ck.moe_layers())
    layers = [{"layer": i, "moe": i in moe, "bytes": ck.layer_bytes(i)} for i in range(ck.num_layers)]
    total = ck.total_bytes()
    info = {
        "path": str(ck.path), "family": ck.adapter.family, "model_type": ck.config.get("model_type"),
        "num_layers": ck.num_layers, "moe_layers": len(moe), "dense_layers": sorted(set(range(ck.num_layers)) - moe),
        "extra_layers": ck.extra_layers(), "num_experts": ck.num_experts, "top_k": ck.top_k,
        "hidden_size": ck.config.get("hidden_size"), "shards": len(set(ck.weight_map.values())),
        "tensors": len(ck.weight_map), "total_bytes": total, "layers": layers,
        "expert_layout": ck.adapter.expert_layout, "notes": ck.adapter.notes,
        "quantization": None if ck.quant_format is None else {
            "method": ck.quant_format.method, "compute_dtype": str(ck.compute_dtype).replace("torch.", ""),
            "weight_block_size": list(ck.quant_format.block) if ck.quant_format.method == "fp8" else None},
        "group_routing": {"n_group": ck.config.get("n_group"), "topk_group": ck.config.get("topk_group")} if ck.adapter.grouped_routing else None,
    }
    info.update(estimate_peak_bytes(ck, **kw))
    info["whole_model_load_bytes"] = total
    return info


def format_inspection(info: dict) -> str:
    lines = [
        f"model        {info['path']}",
        f"family       {info['family']} ({info['expert_layout']} experts on disk)",
        f"layers       {info['num_layers']} ({info['moe_layers']} MoE; dense {info['dense_layers'] or 'none'}"
        + (f"; extra {info['extra_layers']}" if info["extra_layers"] else "") + ")",
        f"experts      {info['num_experts']} per MoE layer, top-{info['top_k']} per token",
        f"size         {fmt_bytes(info['total_bytes'])} in {info['shards']} shard(s), {info['tensors']} tensors",
        f"layer bytes  largest {fmt_bytes(info['largest_layer_bytes'])}",
    ]
    q = info.get("quantization")
    if q:
        block = f" {q['weight_block_size'][0]}x{q['weight_block_size'][1]} blocks" if q["weight_block_size"] else ""
        lines.append(f"weights      {q['method']}{block}: dequantized to {q['compute_dtype']} for compute, "
                     "kept experts copied as stored, merged ones re-quantized")
    if info.get("group_routing"):
        lines.append(f"routing      group-limited: n_group={info['group_routing']['n_group']} topk_group={info['group_routing']['topk_group']}")
    lines.append(f"prune peak   ~{fmt_bytes(info['estimated_peak_bytes'])} RAM (vs {fmt_bytes(info['whole_model_load_bytes'])} to load the whole model)")
    sizes = ", ".join(f"{d['layer']}:{fmt_bytes(d['bytes'])}" for d in info["layers"][:8])
    more = " ..." if len(info["layers"]) > 8 else ""
    lines.append(f"per layer    {sizes}{more}")
    if info["notes"]:
        lines.append(f"notes        {info['notes']}")
    return "\n".join(lines)
