"""``lowmoe inspect``: what a checkpoint is and what pruning it will cost, from the index alone."""

from __future__ import annotations

from pathlib import Path

import torch

from . import methods
from .engine.budget import (SAFETY, MergeHold, parse_budget, plan_lazy_budget, plan_population, population_floors,
                            quant_build_bytes)
from .engine.checkpoint import Checkpoint
from .engine.device import DTYPES
from .engine.hf import resolve_experts_impl
from .engine.memory import fmt_bytes
from .engine.quant import QUANT_MODES
from .errors import ConfigError
from .pipeline import PruneConfig

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


def merge_for(ck: Checkpoint, method: str | None, keep, options: dict | None = None) -> MergeHold | None:
    """What ``--method`` with ``--keep`` (and its ``--method-option`` values, e.g. ``align``) holds
    beside a selection's (``budget.MergeHold``); None without a method. ConfigError naming the flag
    for an unknown method, a bad keep or an option the method does not take."""
    if method is None:
        return None
    if method not in methods.method_names():
        raise ConfigError(f"--method {method!r}: unknown; choose one of: {', '.join(methods.method_names())}")
    keep_n = PruneConfig(model=ck.path, out=Path("."), keep="half" if keep is None else keep).resolve_keep(ck.num_experts)
    if not 1 <= keep_n <= ck.num_experts:
        raise ConfigError(f"--keep {keep!r}: {keep_n} experts; expected 1 to {ck.num_experts}")
    return methods.merge_hold(method, ck.num_experts, keep_n, options)


def budget_info(ck: Checkpoint, *, max_ram=None, max_vram=None, device: str = "cpu", dtype: str = "float32",
                seq_len: int = 256, batch_size: int = 8, method: str | None = None, keep=None, quant: str = "none",
                n_samples: int = 64, method_options: dict | None = None) -> dict:
    """What a prune (experts read in groups, ``plan_lazy_budget``) needs and holds, from the index alone:
    the smallest --max-ram (and --max-vram on CUDA) that work and, under the given budgets, the group
    size and the planned host/device peaks term by term. ``method``/``keep``: a merging method's plan
    also holds its merged experts and one merge (``merge_for``); without them, a prune that drops.
    ConfigError (naming the flag) if they cannot hold."""
    dev, dt = torch.device(device), DTYPES[dtype]
    kw = dict(device=dev, dtype=dt, batch_size=batch_size, seq_len=seq_len,
              grouped=resolve_experts_impl("auto", dev) == "grouped",  # what a prune there computes with
              merge=merge_for(ck, method, keep, method_options))
    floor = plan_lazy_budget(ck, **kw)
    p = plan_lazy_budget(ck, max_ram=parse_budget(max_ram, "--max-ram"), max_vram=parse_budget(max_vram, "--max-vram"), **kw)
    groups = sorted({pl.group_size for pl in p.layers.values() if pl.group_size})
    eep = None if method != "eep" else eep_info(ck, p, keep=keep, batch_size=batch_size, seq_len=seq_len, quant=quant,
                                                 n_samples=n_samples)
    return {"eep": eep, "device": device, "compute_dtype": dtype, "batch_size": batch_size, "seq_len": seq_len, "method": method,
            "min_max_ram_bytes": floor.min_max_ram, "min_max_vram_bytes": floor.min_max_vram if dev.type == "cuda" else None,
            "max_ram_bytes": p.max_ram, "max_vram_bytes": p.max_vram, "group_size": groups[0] if groups else None,
            "num_experts": ck.num_experts, "prefetch_layers": p.prefetch_layers,
            "host_peak_bytes": p.host_peak_bytes, "host_terms": p.host_terms,
            "device_peak_bytes": p.device_peak_bytes, "device_terms": p.device_terms, "notes": p.notes}


def eep_info(ck: Checkpoint, plan, *, keep, batch_size: int, seq_len: int, quant: str = "none",
             n_samples: int = 64) -> dict:
    """The EEP search's --max-ram floors (``budget.population_floors``) beside its seed passes' (a
    prune's, ``plan``) and, under the given budget, how its population pass holds a layer (``quant``:
    the search's --quant cache; ``n_samples``: its fitness examples, for the waves of a candidate
    built a group at a time)."""
    if quant not in QUANT_MODES:
        raise ConfigError(f"--quant {quant!r}: choose one of {', '.join(QUANT_MODES)}")
    keep_n = PruneConfig(model=ck.path, out=Path("."), keep="half" if keep is None else keep).resolve_keep(ck.num_experts)
    floors = population_floors(ck, plan, num_experts=keep_n, batch_size=batch_size, seq_len=seq_len, quant=quant)
    pop_floor = min((f for f in floors.values() if f is not None), default=None)
    build = quant_build_bytes(ck, quant)[0] if quant != "none" else None  # the cache, built before the search
    build_floor = int(build / (1 - SAFETY)) + 1 if build else 0
    out = {"keep": keep_n, "quant": quant, "population_floor_bytes": floors, "quant_build_bytes": build,
           "min_max_ram_bytes": None if pop_floor is None else max(plan.min_max_ram or 0, pop_floor, build_floor),
           "population": None}
    if plan.max_ram is not None or plan.max_vram is not None:
        pop = plan_population(ck, plan, num_experts=keep_n, batch_size=batch_size, seq_len=seq_len, quant=quant,
                              num_chunks=-(-int(n_samples) // batch_size))
        out["population"] = pop.to_json()
    return out


def inspect_model(path: str | Path, *, max_ram=None, max_vram=None, device: str = "cpu", dtype: str = "float32",
                  method: str | None = None, keep=None, quant: str = "none", n_samples: int = 64,
                  method_options: dict | None = None, **kw) -> dict:
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
    info["budget"] = budget_info(ck, max_ram=max_ram, max_vram=max_vram, device=device, dtype=dtype, method=method,
                                 keep=keep, quant=quant, n_samples=n_samples, method_options=method_options, **kw)
    info["estimated_peak_bytes"] = info["budget"]["host_peak_bytes"]  # experts are read in groups
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
    b = info.get("budget")
    lines.append(f"prune peak   ~{fmt_bytes(info['estimated_peak_bytes'])} RAM (vs {fmt_bytes(info['whole_model_load_bytes'])} to load the whole model)")
    if b:
        lines.append(f"smallest     --max-ram {fmt_bytes(b['min_max_ram_bytes'])}"
                     + (f", --max-vram {fmt_bytes(b['min_max_vram_bytes'])}" if b.get("min_max_vram_bytes") else "")
                     + f" ({b['device']}, {b['compute_dtype']}, --batch-size {b['batch_size']} x --seq-len {b['seq_len']}"
                     + (f", --method {b['method']}" if b.get("method") else "") + ")")
        given = ", ".join(f"{flag} {fmt_bytes(b[k])}" for flag, k in (("--max-ram", "max_ram_bytes"), ("--max-vram", "max_vram_bytes")) if b.get(k))
        label = "under" if given else "no budget"
        lines.append(f"{label:<13s}{given + ': ' if given else ''}experts in groups of "
                     f"{b['group_size']} (of {b['num_experts']}), layer prefetch {'on' if b['prefetch_layers'] else 'off'}")
        lines.append("  host       " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in b["host_terms"].items() if v)
                     + f" = {fmt_bytes(b['host_peak_bytes'])}")
        lines.append("  device     " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in b["device_terms"].items() if v)
                     + f" = {fmt_bytes(b['device_peak_bytes'])}")
        e = b.get("eep")
        if e:
            f = e["population_floor_bytes"]
            lines.append(f"EEP search   smallest --max-ram "
                         f"{fmt_bytes(e['min_max_ram_bytes']) if e['min_max_ram_bytes'] else 'none found'} (keep {e['keep']}"
                         f"{'' if e['quant'] == 'none' else ', --quant ' + e['quant']}): seed passes "
                         f"{fmt_bytes(b['min_max_ram_bytes'])}, population with a layer held "
                         f"{fmt_bytes(f['layer_held']) if f['layer_held'] else 'never'}, reading experts from the shards "
                         + (f"{fmt_bytes(f['sourced'])} (a candidate's built a group at a time: "
                            f"{fmt_bytes(f['sourced_groups'])})" if f['sourced'] else 'not for this checkpoint')
                         + (f"; building the --quant cache {fmt_bytes(e['quant_build_bytes'])}"
                            if e.get("quant_build_bytes") else ""))
            pop = e.get("population")
            if pop:
                sizes = sorted({pl["group_size"] for pl in pop["layers"].values()})
                how = (f"each candidate's experts built from the shards a group at a time (groups of "
                       f"{'-'.join(map(str, sizes)) or pop['num_experts']}, {pop['wave_chunks']} activation chunk(s) a wave)"
                       if pop.get("candidate_groups")
                       else "each candidate's experts read from the shards" if pop["sourced"] else
                       "layers held in host memory" + (", experts in groups" if pop["chunked_layers"] else ""))
                lines.append(f"  population {how}: host peak {fmt_bytes(pop['host_peak_bytes'])}"
                             + (" (" + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in pop["host_terms"].items() if v) + ")"
                                if pop.get("host_terms") else ""))
    sizes = ", ".join(f"{d['layer']}:{fmt_bytes(d['bytes'])}" for d in info["layers"][:8])
    more = " ..." if len(info["layers"]) > 8 else ""
    lines.append(f"per layer    {sizes}{more}")
    if info["notes"]:
        lines.append(f"notes        {info['notes']}")
    return "\n".join(lines)
