"""What every merging method shares: options, grouping helpers, and group -> LayerPlan.

A merging method turns one MoE layer's E experts into k groups. Each group has a *leader* (listed
first) whose slot it takes in the output; the group's experts are merged in weight space as

    θ'_j = Σ_{i ∈ group j} w_i θ_i,   w_i = f_i / Σ_{i' ∈ group j} f_i'      (f = usage frequency)

for every matrix of the expert (M-SMoE / HC-SMoE's frequency-weighted merge). This is written as
``LayerPlan(keep=leaders, merge=W_EM, router=W_RM)`` and ``apply.apply_layer`` performs it on the
on-disk tensors. Router row of group j (``router`` option):

* ``leader`` (default for most methods): the leader's row, so the merged expert is picked when
  the router would have picked the leader;
* ``mean``: the frequency-weighted average Σ w_i W_G[i] of the group's rows (and router biases).

If a group's experts were never routed (Σ f = 0) its members are averaged with equal weights.

**Protected experts** (super experts, ``methods.oneshot.guards``) always lead a group, and
no other expert is merged into them while enough unprotected leaders exist, so their weights stay
exactly as they were.

**Neuron alignment** (option ``align``, see ``align.py``) permutes each member's intermediate
neurons to match its leader's before the merge; the permutation travels in the plan's ``align``
field so ``--plan`` re-applies it.

Options reach a method as ``PruneConfig.method_options`` (``--method-option KEY=VALUE`` on the CLI);
an unknown key or a bad value raises ``ConfigError`` naming it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..base import LayerMethod
from ...engine.budget import MergeHold
from ...engine.plan import LayerPlan
from ..options import parse_options
from .align import align_groups
from .stats import LayerStats

log = logging.getLogger(__name__)

REPORT_MATRIX_MAX = 64  # E x E matrices go into the report only up to this many experts


def report_matrix(m: torch.Tensor) -> list | None:
    """An (E, E) matrix for the report, rounded; None past REPORT_MATRIX_MAX experts (size)."""
    if m.shape[0] > REPORT_MATRIX_MAX:
        return None
    return [[round(float(x), 6) for x in row] for row in m]


# ---- grouping helpers -------------------------------------------------------------------------


def pick_leaders(freq: torch.Tensor, k: int, protected: set[int]) -> list[int]:
    """The k most-used experts, protected ones first (ties -> lower id)."""
    order = sorted(range(freq.numel()), key=lambda e: (e not in protected, -float(freq[e]), e))
    return order[:k]


def assign_to_leaders(sim: torch.Tensor, leaders: list[int], protected: set[int]) -> list[list[int]]:
    """Groups (leader first, in ``leaders`` order): every other expert joins the leader it is most
    similar to (``sim`` (E, E), larger = more similar; ties -> the earlier leader). Protected leaders
    take no members while an unprotected leader exists."""
    open_leaders = [l for l in leaders if l not in protected] or list(leaders)
    groups = {l: [l] for l in leaders}
    for e in range(sim.shape[0]):
        if e in groups:
            continue
        best = max(open_leaders, key=lambda l: (float(sim[e, l]), -open_leaders.index(l)))
        groups[best].append(e)
    return [groups[l] for l in leaders]


def agglomerate(dist: torch.Tensor, k: int, linkage: str = "average", protected: set[int] = frozenset()) -> tuple[list[list[int]], list[dict]]:
    """Agglomerative clustering of E items into ``k`` clusters from a distance matrix (E, E).

    Linkage (Lance-Williams updates): ``average`` d(A∪B, C) = (|A| d(A,C) + |B| d(B,C)) / (|A|+|B|),
    ``single`` = min, ``complete`` = max. Ties go to the pair with the lowest ids (deterministic).
    Clusters holding a protected item merge with another such cluster only when nothing else is
    left. Returns the clusters (each sorted) and the merge history [{"a", "b", "distance"}]."""
    n = dist.shape[0]
    d = dist.double().numpy().copy()
    np.fill_diagonal(d, np.inf)
    members = {i: [i] for i in range(n)}
    prot = {i: i in protected for i in range(n)}
    history = []
    while len(members) > k:
        ids = sorted(members)
        best, best_key = None, None
        for ai, a in enumerate(ids):
            for b in ids[ai + 1:]:
                key = (prot[a] and prot[b], d[a, b], a, b)
                if best_key is None or key < best_key:
                    best, best_key = (a, b), key
        a, b = best
        na, nb = len(members[a]), len(members[b])
        for c in members:
            if c in (a, b):
                continue
            if linkage == "average":
                v = (na * d[a, c] + nb * d[b, c]) / (na + nb)
            elif linkage == "single":
                v = min(d[a, c], d[b, c])
            else:
                v = max(d[a, c], d[b, c])
            d[a, c] = d[c, a] = v
        history.append({"a": sorted(members[a]), "b": sorted(members[b]), "distance": float(best_key[1])})
        members[a] = sorted(members[a] + members[b])
        prot[a] = prot[a] or prot[b]
        del members[b]
        d[b, :] = d[:, b] = np.inf
    return [members[i] for i in sorted(members)], history


def lead_clusters(clusters: list[list[int]], freq: torch.Tensor, protected: set[int]) -> list[list[int]]:
    """Put each cluster's leader first: a protected member, else the most-used (ties -> lower id)."""
    out = []
    for c in clusters:
        leader = min(c, key=lambda e: (e not in protected, -float(freq[e]), e))
        out.append([leader] + [e for e in sorted(c) if e != leader])
    return out


def merge_weights(group: list[int], freq: torch.Tensor) -> list[float]:
    """w_i = f_i / Σ f over the group (equal weights if the group was never routed)."""
    f = [float(freq[e]) for e in group]
    s = sum(f)
    return [x / s for x in f] if s > 0 else [1.0 / len(group)] * len(group)


def groups_to_plan(groups: list[list[int]], freq: torch.Tensor, num_experts: int, router: str = "leader",
                   align: dict | None = None) -> LayerPlan:
    """A LayerPlan merging each group into its leader's slot; slots ordered by leader id."""
    groups = sorted(groups, key=lambda g: g[0])
    merge, rows = [], []
    for g in groups:
        w = merge_weights(g, freq)
        row = [0.0] * num_experts
        for e, x in zip(g, w):
            row[e] = x
        merge.append(row)
        if router == "mean":
            rows.append(list(row))
        else:
            one = [0.0] * num_experts
            one[g[0]] = 1.0
            rows.append(one)
    extra = {"align": align} if align else {}
    return LayerPlan([g[0] for g in groups], merge, rows, extra)


# ---- the base class -----------------------------------------------------------------------------

COMMON_OPTIONS = {
    "router": ("leader", ("leader", "mean")),
    "align": (False, bool),
    "max_tokens": (None, int),
}


class MergeMethod(LayerMethod):
    """A per-layer merging method: collect ``LayerStats``, form groups, emit a merge plan.

    Subclasses set ``name``, ``OPTIONS`` (merged with ``COMMON_OPTIONS``), ``stats_kwargs()`` and
    ``make_groups(...) -> list of groups, leader first``."""

    OPTIONS: dict = {}

    @classmethod
    def option_spec(cls) -> dict:
        return {**COMMON_OPTIONS, **cls.OPTIONS}
    needs_expert_outputs = False  # all-token outputs are computed by LayerStats itself

    def __init__(self, num_experts: int, top_k: int, **options):
        super().__init__(num_experts, top_k, **options)
        self.opts = parse_options(self.name, options, self.option_spec())
        self.stats = LayerStats(num_experts, top_k, max_tokens=self.opts["max_tokens"], **self.stats_kwargs())
        self.groups: list[list[int]] | None = None
        self.info: dict = {}

    def stats_kwargs(self) -> dict:
        return {}

    @classmethod
    def merge_hold(cls, num_experts: int, keep_n: int, options: dict | None = None) -> MergeHold:
        # k groups of E experts: at most E - k of them have more than one member (are merged)
        return MergeHold(max(0, min(keep_n, num_experts - keep_n)), keep_n,
                         align=bool(parse_options(cls.name, dict(options or {}), cls.option_spec())["align"]))

    def observe(self, call) -> None:
        self.stats.observe(call)

    def make_groups(self, layer_idx: int, keep_n: int, protected: set[int], tensors, adapter) -> list[list[int]]:
        raise NotImplementedError

    def decide(self, layer_idx, keep_n, *, protected, groups, tensors, adapter) -> LayerPlan:
        freq = self.stats.frequency()
        self.groups = self.make_groups(layer_idx, keep_n, set(protected), tensors, adapter)
        align = None
        if self.opts["align"]:
            align = align_groups(adapter, layer_idx, tensors, self.groups, freq)
        return groups_to_plan(self.groups, freq, self.num_experts, self.opts["router"], align)

    def scores(self) -> torch.Tensor:
        return self.stats.frequency()

    def state(self) -> dict:
        return {"tokens": self.stats.tokens, "routed_tokens": self.stats.counts.tolist(),
                "groups": self.groups, **self.info}
