"""Neuron permutation alignment before a weight-space merge (option ``align`` of every merge method).

Two experts can compute the same function with their intermediate neurons in a different order;
averaging them then mixes unrelated neurons. Before merging a group, each member's neurons are
permuted to best match its leader's (weight matching, as in Git Re-Basin, Ainsworth et al. 2023,
and the Switch-only permutation step of M-SMoE / UNCURL): with neuron features
φ(n) = [gate row n | up row n | down column n] (3H), solve

    π* = argmax_π Σ_m <φ_leader(m), φ_member(π(m))>

by ``scipy.optimize.linear_sum_assignment`` on the (I, I) similarity matrix (host memory:
``budget.alignment_bytes``; the features are built one stored tensor at a time,
``stats.expert_features``). Permuting an expert's neurons does not change what it computes, so the
alignment is applied to the *input* experts before the merge (``PLAN_FIELDS.pre["align"]``
(``lowmoe.methods``)). The plan stores, per layer, ``"align": {"<expert id>": [π(0), ..., π(I-1)]}``
(identity permutations are left out), so ``--plan`` re-applies it. Works for per-expert and GPT-OSS fused layouts (canonical weights,
``stats.expert_weights``). Cost: one O(I³) assignment per merged member (≈0.5 s at I = 2048).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ...engine.lazy import decoded, entry, entry_dtype, entry_rows
from ...errors import PlanError
from .stats import (NEURON_DIM, PROJS, expert_dtype, expert_features, expert_weights, fused_base, has_expert,
                    num_neurons, permute_neurons, set_expert_weights)


def alignment(leader: torch.Tensor, member: torch.Tensor) -> list[int]:
    """π with member neuron π(m) matched to leader neuron m, from their neuron features (I, 3H)
    float32 (``stats.expert_features``): ``assignment`` of their similarities."""
    return assignment(leader @ member.T)


def assignment(sim: torch.Tensor) -> list[int]:
    """π maximizing Σ_m sim[m, π(m)] (``sim``: (I, I) float32 similarities, <φ_leader(m), φ_member(n)>).
    The similarities go to float64 and are negated in place for scipy's minimization (its ``maximize``
    would negate a copy: the same values, one (I, I) float64 less)."""
    # imported here, not with the module: ``import lowmoe`` took 0.54 s with it and 0.11 s without, so
    # ``--help``, ``inspect`` and the checks that fail fast start sooner (a pass's transformers imports it anyway)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(sim.double().neg_().numpy())
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
        lead = expert_features(adapter, layer_idx, tensors, g[0])
        for e in g[1:]:
            if group_routed and float(freq[e]) == 0.0:
                continue
            member = expert_features(adapter, layer_idx, tensors, e)
            sim = lead @ member.T
            del member  # before the similarities' float64 copy (``budget.alignment_bytes``)
            perm = assignment(sim)
            del sim
            if perm != list(range(len(perm))):
                out[str(e)] = perm
    return out


def _permutations(adapter, layer_idx: int, tensors, value) -> list[tuple[int, torch.Tensor]]:
    """The plan's ``align`` value checked against the layer (nothing read): (expert, permutation) by
    expert id."""
    if not isinstance(value, dict):
        raise PlanError(f"layer {layer_idx} 'align': expected an object {{expert id: permutation}}")
    n = num_neurons(adapter, layer_idx, tensors)
    out = []
    for key, perm in value.items():
        try:
            e = int(key)
        except (TypeError, ValueError):
            e = -1
        if not has_expert(adapter, layer_idx, tensors, e):
            raise PlanError(f"layer {layer_idx} 'align': {key!r} is not an expert of this layer")
        if not isinstance(perm, list) or sorted(perm) != list(range(n)):
            raise PlanError(f"layer {layer_idx} 'align'[{key!r}]: expected a permutation of 0..{n - 1}")
        out.append((e, torch.tensor(perm)))
    return sorted(out, key=lambda ep: ep[0])


def apply_alignment(adapter, layer_idx: int, tensors: dict[str, torch.Tensor], value) -> dict[str, torch.Tensor]:
    """``PLAN_FIELDS.pre["align"]`` (``lowmoe.methods``): the layer's tensors with the plan's experts permuted.
    Returns a new dict; the input tensors are left untouched."""
    perms = _permutations(adapter, layer_idx, tensors, value)
    out = dict(tensors)
    cloned: set[str] = set()
    dtype = expert_dtype(adapter, layer_idx, tensors)
    for e, perm in perms:
        set_expert_weights(adapter, layer_idx, out, e, permute_neurons(expert_weights(adapter, layer_idx, tensors, e), perm),
                           dtype, cloned)
    return out


class AlignedLayer(Mapping):
    """``PLAN_FIELDS.view["align"]`` (``lowmoe.methods``): ``apply_alignment``'s result computed on
    access. Per-expert layout: an expert tensor the plan permutes is read when asked for and its
    neurons permuted then (a permutation of the stored values: the same bits as ``apply_alignment``);
    every other tensor is the layer's own, a stored entry staying one (``stored``), so a lazily read
    layer (``lazy.LazyLayer``) is never decoded whole. Fused layout (GPT-OSS's ``gate_up_proj``, gate
    and up interleaved on the last dim, ``down_proj``, their biases): a fused tensor the plan permutes
    is an ``AlignedRows`` entry (``stored``) whose rows are permuted as they are read, so a merge that
    reads its sources' rows (``apply.apply_layer_fused_rows``) never decodes the layer either."""

    def __init__(self, adapter, layer_idx: int, tensors, value):
        self._tensors = tensors
        self._perm: dict[str, tuple[int, torch.Tensor]] = {}  # per-expert key -> (neuron dim, permutation)
        self._rows: dict[str, AlignedRows] = {}  # fused key -> its rows, permuted when read
        perms = _permutations(adapter, layer_idx, tensors, value)
        if adapter.expert_layout == "per_expert":
            for e, perm in perms:
                for key, name in zip(adapter.expert_keys(layer_idx, e), PROJS):
                    self._perm[key] = (NEURON_DIM[name], perm)
            return
        if not perms:
            return
        base = fused_base(adapter, layer_idx)
        pairs = {e: torch.stack([2 * perm, 2 * perm + 1], dim=-1).flatten() for e, perm in perms}  # gate, up of a neuron
        for name, dim, index in (("gate_up_proj", -1, pairs), ("gate_up_proj_bias", -1, pairs), ("down_proj", 0, dict(perms))):
            if base + name in tensors:
                self._rows[base + name] = AlignedRows(entry(tensors, base + name), dim, index)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._rows:
            return self._rows[key].read()
        t = decoded(self._tensors[key])
        if key not in self._perm:
            return t
        dim, perm = self._perm[key]
        return t.index_select(dim, perm)

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def stored(self, key: str):
        """The stored entry of a tensor left as it is (None for a permuted expert tensor: it must be
        computed; a permuted fused tensor's ``AlignedRows``)."""
        if key in self._rows:
            return self._rows[key]
        if key in self._perm or not hasattr(self._tensors, "stored"):
            return None
        return self._tensors.stored(key)


@dataclass(frozen=True, eq=False)
class AlignedRows:
    """A fused expert tensor (a tensor or a stored entry, experts on dim 0) with some experts' neurons
    permuted, as an entry that reads rows (``lazy.entry_rows``): rows ``keep`` are read from ``base``
    and each permuted expert's row has its values moved along its neuron dim ``dim`` (``index``:
    expert -> the row's index along it), the stored values in the stored dtype, so the same bits as
    ``apply_alignment``'s float32 round trip. ``keep``: the rows this entry is (None: all)."""

    base: object
    dim: int
    index: dict[int, torch.Tensor]
    keep: tuple[int, ...] | None = None

    @property
    def _ids(self) -> list[int]:
        return list(range(self.base.shape[0])) if self.keep is None else list(self.keep)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._ids), *tuple(self.base.shape[1:]))

    @property
    def torch_dtype(self) -> torch.dtype:
        return entry_dtype(self.base)

    def rows(self, keep) -> "AlignedRows":
        ids = self._ids
        return AlignedRows(self.base, self.dim, self.index, tuple(ids[int(j)] for j in keep))

    def read(self) -> torch.Tensor:
        ids = self._ids
        t = entry_rows(self.base, ids)  # a new tensor (an indexed copy, or the rows read)
        for j, e in enumerate(ids):
            if e in self.index:
                t[j] = t[j].index_select(self.dim, self.index[e])
        return t
