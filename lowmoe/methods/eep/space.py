"""The EEP search space: per layer group, a router-mapping W_RM and an expert-merging W_EM.

EEP (Liu et al., "Efficient Expert Pruning for Sparse Mixture-of-Experts Language Models:
Enhancing Performance and Reducing Inference Costs", arXiv 2407.00945, §4.2) gives every SMoE
block l two E'xE matrices:

* W_EM^l merges expert weights: output expert j is θ'_j = Σ_i W_EM[j, i] θ_i, the same scalar for
  every matrix (w1, w2, w3) of expert i (paper Eq. 6).
* W_RM^l maps the router. lowmoe writes a checkpoint that stock transformers loads, so the mapping
  is expressed as new router weights: router row j = Σ_i W_RM[j, i] W_G[i] (plus the same map of a
  router bias; ``apply.apply_layer``). EEP itself maps the softmax probabilities (G' = W_RM ·
  softmax(Z W_G), Eq. 5); with one-hot rows the two are identical (Mixtral-style renormalisation
  cancels the softmax denominator), with real rows lowmoe's search optimises the router it
  actually writes, and fitness is always measured with exactly that router.

Layers are grouped (paper App. A.1: 4 groups of consecutive layers for most tasks, one per layer
for some); a group shares one (W_EM, W_RM) pair.

Two phases (paper §4.3): **pruning** -- every row one-hot and W_RM = W_EM (which E' experts survive);
**merging** -- real-valued rows, W_EM and W_RM decoupled. With E' = E (only fewer *active* experts,
``--top-k``) the start is the identity and only merging runs.

Candidates are kept canonical: output experts are a set, so jointly permuting the rows of W_EM
and W_RM changes nothing. Rows are sorted, which makes duplicate detection and prefix sharing
(``population``) see through permutations.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError
from ...engine.plan import LayerPlan, Plan


@dataclass
class Candidate:
    """One individual: W_EM and W_RM for every layer group, each (G, E', E) float64."""

    em: np.ndarray
    rm: np.ndarray

    def canonical(self) -> "Candidate":
        """Rows of every group sorted jointly (on the concatenated [W_EM row, W_RM row])."""
        # float32 values: exactly what the plan (JSON) and apply_layer (float32 merge) will use
        em = self.em.astype(np.float32).astype(np.float64)
        rm = self.rm.astype(np.float32).astype(np.float64)
        for g in range(em.shape[0]):
            rows = np.concatenate([em[g], rm[g]], axis=1)  # (E', 2E)
            # one-hot rows sort by their expert id (largest first -> descending); use a stable
            # lexicographic order on the negated values so [1,0,..] (expert 0) comes first.
            order = np.lexsort((-rows).T[::-1])
            em[g], rm[g] = em[g][order], rm[g][order]
        return Candidate(em, rm)

    def group_bytes(self, g: int) -> bytes:
        return np.ascontiguousarray(self.em[g], dtype=np.float32).tobytes() + np.ascontiguousarray(self.rm[g], dtype=np.float32).tobytes()

    def key(self) -> str:
        h = hashlib.sha1()
        for g in range(self.em.shape[0]):
            h.update(self.group_bytes(g))
        return h.hexdigest()[:20]

    def is_onehot(self) -> bool:
        return bool(np.array_equal(self.em, self.rm) and np.all((self.em == 0) | (self.em == 1))
                    and np.all(self.em.sum(-1) == 1))

    def keep_sets(self) -> list[list[int]]:
        """Per group, the expert each W_EM row takes most of (a pruning-phase candidate's keep-set;
        the inverse of ``SearchSpace.onehot``)."""
        return [self.em[g].argmax(1).tolist() for g in range(self.em.shape[0])]

    def to_json(self) -> dict:
        return {"em": self.em.tolist(), "rm": self.rm.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "Candidate":
        return cls(np.asarray(d["em"], dtype=np.float64), np.asarray(d["rm"], dtype=np.float64))


@dataclass(frozen=True)
class SearchSpace:
    moe_layers: tuple[int, ...]
    num_experts: int  # E
    keep: int  # E'
    groups: tuple[tuple[int, ...], ...]  # consecutive MoE layers sharing one (W_EM, W_RM)

    @classmethod
    def build(cls, moe_layers: list[int], num_experts: int, keep: int, layer_groups: int | str | None = None) -> "SearchSpace":
        """``layer_groups``: a number of groups of consecutive MoE layers, or "layer" (one per layer).
        Default 4, EEP's setting for most tasks (paper App. A.1)."""
        layers = tuple(sorted(moe_layers))
        n = len(layers)
        if layer_groups is None:
            n_groups = min(4, n)
        elif str(layer_groups).lower() in ("layer", "layers", "per-layer", "0"):
            n_groups = n
        else:
            try:
                n_groups = int(layer_groups)
            except (TypeError, ValueError):
                raise ConfigError(f"--layer-groups {layer_groups!r}: expected a number of groups or 'layer'") from None
            if not 1 <= n_groups <= n:
                raise ConfigError(f"--layer-groups {layer_groups}: must be between 1 and the {n} MoE layers (or 'layer')")
        if not 1 <= keep <= num_experts:
            raise ConfigError(f"--keep {keep}: must be between 1 and the model's {num_experts} experts")
        bounds = np.linspace(0, n, n_groups + 1).round().astype(int)
        groups = tuple(layers[bounds[g]:bounds[g + 1]] for g in range(n_groups))
        return cls(layers, num_experts, keep, groups)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def prunes(self) -> bool:
        """Whether there is a pruning phase (E' < E); with E' = E only merging runs."""
        return self.keep < self.num_experts

    def group_of(self, layer_idx: int) -> int:
        for g, layers in enumerate(self.groups):
            if layer_idx in layers:
                return g
        raise KeyError(layer_idx)

    # ---- constructing candidates -----------------------------------------------------------
    def onehot(self, keep_by_group: list[list[int]]) -> Candidate:
        em = np.zeros((self.num_groups, self.keep, self.num_experts))
        for g, keep in enumerate(keep_by_group):
            em[g, np.arange(self.keep), np.asarray(keep)] = 1.0
        return Candidate(em, em.copy()).canonical()

    def identity(self) -> Candidate:
        """Every group keeps experts 0..E'-1 (the identity when E' = E)."""
        return self.onehot([list(range(self.keep))] * self.num_groups)

    def random_onehot(self, rng: np.random.Generator) -> Candidate:
        """EEP's random init: per group a random subset of E' experts (``get_init``)."""
        return self.onehot([sorted(rng.choice(self.num_experts, self.keep, replace=False).tolist())
                            for _ in range(self.num_groups)])

    def from_keep(self, keep_by_layer: dict[int, list[int]]) -> Candidate:
        """Seed from a one-shot plan: each group keeps the experts its layers keep most often
        (ties -> lower id); with one layer per group that is the plan exactly."""
        keeps = []
        for layers in self.groups:
            votes = np.zeros(self.num_experts)
            for L in layers:
                votes[list(keep_by_layer[L])] += 1
            order = sorted(range(self.num_experts), key=lambda e: (-votes[e], e))
            keeps.append(sorted(order[:self.keep]))
        return self.onehot(keeps)

    # ---- to a plan ---------------------------------------------------------------------------
    def layer_plan(self, cand: Candidate, layer_idx: int) -> LayerPlan:
        """The LayerPlan the apply path writes: a plain keep-list for a pruning-phase group
        (one-hot, W_RM = W_EM: bit-identical to merging with those matrices), otherwise
        keep = each row's dominant expert with merge = W_EM and router = W_RM."""
        g = self.group_of(layer_idx)
        em, rm = cand.em[g], cand.rm[g]
        dominant = np.abs(em).argmax(axis=1).tolist()
        onehot = np.array_equal(em, rm) and np.all((em == 0) | (em == 1)) and np.all(em.sum(-1) == 1)
        if onehot and len(set(dominant)) == len(dominant):
            return LayerPlan([int(e) for e in dominant])
        return LayerPlan([int(e) for e in dominant], merge=em.astype(np.float32).astype(float).tolist(),
                         router=rm.astype(np.float32).astype(float).tolist())

    def plan(self, cand: Candidate, top_k: int, meta: dict | None = None) -> Plan:
        return Plan({L: self.layer_plan(cand, L) for L in self.moe_layers}, top_k, meta or {})

    def describe(self) -> dict:
        return {"num_experts": self.num_experts, "keep": self.keep,
                "groups": [list(g) for g in self.groups]}
