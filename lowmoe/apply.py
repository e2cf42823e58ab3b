"""Apply a plan to one layer's on-disk tensors, and patch config.json to match.

``apply_layer`` works on the checkpoint's own key names and layout, so its output is written to
the new shards as is. Experts are renumbered 0..E'-1; router rows and every per-expert router
tensor (router bias, ``e_score_correction_bias``) are sliced or mapped in step; every other tensor
of the layer is passed through untouched (same storage, so a keep-everything plan is bit-exact).

Merges (``LayerPlan.merge``) are computed in float32 and cast back to the stored dtype. For the
router mapping of a real-valued W_RM, router weight rows (and a router bias) are mapped linearly
(row_j = Σ_i W_RM[j,i]·W_G[i]); ``e_score_correction_bias`` is a routing offset, not a linear
quantity, so output slot j takes the bias of its dominant source expert (largest |W_RM[j, i]|).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .adapters import ALL_EXPERT_COUNT_KEYS, Adapter
from .plan import LayerPlan, Plan

log = logging.getLogger(__name__)

# Extension point for per-layer plan fields beyond keep/merge/router (e.g. DERN's "neurons"):
# name -> fn(adapter, layer_idx, experts_out: dict[key, tensor], originals: dict[key, tensor], value) -> experts_out
LAYER_EXTENSIONS: dict[str, Callable] = {}
# Fields applied to the layer's *input* tensors before keep/merge (e.g. "align": neuron permutations
# that leave each expert's function unchanged): name -> fn(adapter, layer_idx, tensors, value) -> tensors
LAYER_PRE_EXTENSIONS: dict[str, Callable] = {}


def _matrix(m, n_out: int, n_in: int) -> torch.Tensor:
    t = torch.tensor(m, dtype=torch.float32)
    assert t.shape == (n_out, n_in)
    return t


def combine_into(acc: torch.Tensor, tensors, coeffs: list[float]) -> torch.Tensor:
    """``acc`` (float32) = Σ_i coeffs[i] · tensors[i], accumulated in expert order, zero terms
    skipped; returns ``acc``. The one merge loop: the writer (``_combine``) and the EEP evaluator's
    reused buffers both run it, so their merged experts are bit-identical."""
    acc.zero_()
    for c, t in zip(coeffs, tensors):
        if c != 0.0:
            acc.add_(t.float(), alpha=c)
    return acc


def _combine(tensors: list[torch.Tensor], coeffs: torch.Tensor) -> torch.Tensor:
    """Σ_i coeffs[i] · tensors[i] in float32, returned in the tensors' dtype."""
    acc = torch.empty(tensors[0].shape, dtype=torch.float32)
    return combine_into(acc, tensors, coeffs.tolist()).to(tensors[0].dtype)


def map_rows(t: torch.Tensor, keep: list[int], mat: torch.Tensor | None) -> torch.Tensor:
    """Rows (dim 0) of a per-expert tensor: select ``keep`` or map with ``mat`` (E' x E)."""
    if mat is None:
        return t[keep].clone()
    flat = t.float().reshape(t.shape[0], -1)
    return (mat @ flat).reshape((mat.shape[0],) + tuple(t.shape[1:])).to(t.dtype)


def apply_layer(adapter: Adapter, layer_idx: int, tensors: dict[str, torch.Tensor], lp: LayerPlan,
                num_experts: int) -> dict[str, torch.Tensor]:
    """Return the layer's output tensors (on-disk keys) with ``lp`` applied."""
    for name, value in lp.extra.items():
        pre = LAYER_PRE_EXTENSIONS.get(name)
        if pre is not None:
            tensors = pre(adapter, layer_idx, tensors, value)
    prefix = adapter.layer_prefix(layer_idx)
    n_out = len(lp.keep)
    merge = _matrix(lp.merge, n_out, num_experts) if lp.merge is not None else None
    router = _matrix(lp.router, n_out, num_experts) if lp.router is not None else merge
    router_keys = set(adapter.router_keys(layer_idx))
    out: dict[str, torch.Tensor] = {}
    experts_out: dict[str, torch.Tensor] = {}
    originals: dict[str, torch.Tensor] = {}
    per_expert: dict[str, list[torch.Tensor | None]] = {}  # projection suffix -> per-expert tensors
    for key, t in tensors.items():
        rel = key[len(prefix):]
        if key in router_keys:
            if key.endswith("e_score_correction_bias") and router is not None:
                dom = router.abs().argmax(dim=1).tolist()
                out[key] = t[dom].clone()
            else:
                out[key] = map_rows(t, lp.keep, router)
        elif adapter.is_expert_key(rel):
            originals[key] = t
            if adapter.expert_layout == "fused":
                experts_out[key] = map_rows(t, lp.keep, merge)
            else:
                _, e, suffix = rel[len(adapter.moe_prefix):].split(".", 2)
                per_expert.setdefault(suffix, [None] * num_experts)[int(e)] = t
        else:
            out[key] = t
    base = prefix + adapter.moe_prefix + "experts."
    for suffix, ts in per_expert.items():
        for j in range(n_out):
            key = f"{base}{j}.{suffix}"
            experts_out[key] = ts[lp.keep[j]] if merge is None else _combine(ts, merge[j])
    for name, value in lp.extra.items():
        fn = LAYER_EXTENSIONS.get(name)
        if fn is not None:
            experts_out = fn(adapter, layer_idx, experts_out, originals, value)
    out.update(experts_out)
    return out


# ---- config.json -----------------------------------------------------------------------------


def group_sizes_ok(keep: list[int], num_experts: int, n_group: int) -> bool:
    per = num_experts // n_group
    counts = [0] * n_group
    for e in keep:
        counts[e // per] += 1
    return len(set(counts)) == 1


def patch_config(raw: dict, adapter: Adapter, plan: Plan, num_experts: int) -> tuple[dict, list[str]]:
    """config.json for the output model, and notes for the report (e.g. grouping disabled)."""
    cfg = dict(raw)
    notes: list[str] = []
    k = plan.num_kept
    for key in set(ALL_EXPERT_COUNT_KEYS) | set(adapter.expert_count_keys):
        if key in cfg or key == adapter.expert_count_keys[0]:
            cfg[key] = k
    cfg[adapter.top_k_key] = plan.num_experts_per_tok
    if adapter.grouped_routing and int(cfg.get("n_group") or 1) > 1:
        n_group, topk_group = int(cfg["n_group"]), int(cfg.get("topk_group") or 1)
        selection = all(lp.merge is None for lp in plan.layers.values())
        valid = (k % n_group == 0 and k // n_group >= 2 and topk_group <= n_group
                 and plan.num_experts_per_tok <= topk_group * (k // n_group)
                 and selection and all(group_sizes_ok(lp.keep, num_experts, n_group) for lp in plan.layers.values()))
        if not valid:
            cfg["n_group"], cfg["topk_group"] = 1, 1
            if cfg.get("topk_method") == "group_limited_greedy":
                cfg["topk_method"] = "greedy"
            notes.append(f"group-limited routing disabled (n_group {n_group} -> 1): {k} kept experts cannot form "
                         f"{n_group} equal groups of >= 2 that still hold every token's top-{plan.num_experts_per_tok}")
            log.warning(notes[-1])
    return cfg, notes
