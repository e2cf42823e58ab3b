"""Neuron permutation alignment before a weight-space merge (option ``align`` of every merge method).

Two experts can compute the same function with their intermediate neurons in a different order;
averaging them then mixes unrelated neurons. Before merging a group, each member's neurons are
permuted to best match its leader's (weight matching, as in Git Re-Basin, Ainsworth et al. 2023,
and the Switch-only permutation step of M-SMoE / UNCURL): with neuron features
φ(n) = [gate row n | up row n | down column n] (3H), solve

    π* = argmax_π Σ_m <φ_leader(m), φ_member(π(m))>

by ``scipy.optimize.linear_sum_assignment`` on the (I, I) similarity matrix. Permuting an expert's
neurons does not change what it computes, so the alignment is applied to the *input* experts before
the merge (``PLAN_FIELDS.pre["align"]`` (``lowmoe.methods``)). The plan stores, per layer,
``"align": {"<expert id>": [π(0), ..., π(I-1)]}`` (identity permutations are left out), so
``--plan`` re-applies it. Works for per-expert and GPT-OSS fused layouts (canonical weights,
``stats.expert_weights``). Cost: one O(I³) assignment per merged member (≈0.5 s at I = 2048).
"""

from __future__ import annotations

import torch

from ...errors import PlanError
from .stats import expert_dtype, expert_weights, neuron_features, permute_neurons, set_expert_weights


def alignment(leader: dict[str, torch.Tensor], member: dict[str, torch.Tensor]) -> list[int]:
    """π with member neuron π(m) matched to leader neuron m (canonical weights, see stats.py)."""
    # imported here, not with the module: ``import lowmoe`` took 0.54 s with it and 0.11 s without, so
    # ``--help``, ``inspect`` and the checks that fail fast start sooner (a pass's transformers imports it anyway)
    from scipy.optimize import linear_sum_assignment

    sim = neuron_features(leader) @ neuron_features(member).T  # (I, I): <φ_leader(m), φ_member(n)>
    rows, cols = linear_sum_assignment(sim.double().numpy(), maximize=True)
    perm = [0] * len(rows)
    for r, c in zip(rows.tolist(), cols.tolist()):
        perm[r] = c
    return perm


def align_groups(adapter, layer_idx: int, tensors: dict[str, torch.Tensor], groups: list[list[int]],
                 freq: torch.Tensor | None = None) -> dict[str, list[int]]:
    """Permutations for every non-leader member of every group (``{"<expert>": perm}``), skipping
    identity permutations and members whose merge weight is zero (they do not enter the merge)."""
    out: dict[str, list[int]] = {}
    any_routed = freq is not None and float(freq.sum()) > 0
    for g in groups:
        if len(g) < 2:
            continue
        group_routed = any_routed and sum(float(freq[e]) for e in g) > 0
        lead = expert_weights(adapter, layer_idx, tensors, g[0])
        for e in g[1:]:
            if group_routed and float(freq[e]) == 0.0:
                continue
            perm = alignment(lead, expert_weights(adapter, layer_idx, tensors, e))
            if perm != list(range(len(perm))):
                out[str(e)] = perm
    return out


def apply_alignment(adapter, layer_idx: int, tensors: dict[str, torch.Tensor], value) -> dict[str, torch.Tensor]:
    """``PLAN_FIELDS.pre["align"]`` (``lowmoe.methods``): the layer's tensors with the plan's experts permuted.
    Returns a new dict; the input tensors are left untouched."""
    if not isinstance(value, dict):
        raise PlanError(f"layer {layer_idx} 'align': expected an object {{expert id: permutation}}")
    out = dict(tensors)
    cloned: set[str] = set()
    dtype = expert_dtype(adapter, layer_idx, tensors)
    for key, perm in sorted(value.items(), key=lambda kv: int(kv[0])):
        try:
            e = int(key)
            w = expert_weights(adapter, layer_idx, tensors, e)
        except (ValueError, KeyError, IndexError):
            raise PlanError(f"layer {layer_idx} 'align': {key!r} is not an expert of this layer") from None
        n = w["gate"].shape[0]
        if not isinstance(perm, list) or sorted(perm) != list(range(n)):
            raise PlanError(f"layer {layer_idx} 'align'[{key!r}]: expected a permutation of 0..{n - 1}")
        set_expert_weights(adapter, layer_idx, out, e, permute_neurons(w, torch.tensor(perm)), dtype, cloned)
    return out
