"""``dern``: drop experts, then recombine their neurons into the retained ones (DERN, EMNLP 2025,
arXiv 2509.10377). The retained experts keep their shape; routing is the kept experts' as is.

Per MoE layer:

1. **drop by router statistics**: keep the k experts with the largest usage u_e (``statistic``
   option: ``frequency`` = share of top-k assignments (default), or ``gate-mass`` = Σ routing
   weights / tokens); protected experts first; DeepSeek groups keep an equal count per group;
2. **segments**: neuron n of an expert is the segment φ(n) = [gate row n | up row n | down column n]
   (3H; GPT-OSS adds the gate/up biases of neuron n when merging, not when matching);
3. **assignment**: each segment of a dropped expert d goes to the retained expert r and neuron m
   with the highest cosine cos(φ_d(n), φ_r(m)) over every retained expert's neurons. This costs
   (E−k)·k·I²·3H multiply-adds per layer; ``match_dim=d`` (default 0: exact) compares seeded
   Gaussian projections of the segments to d dims instead (cosines kept approximately);
4. **merge, weighted by usage**: retained neuron m of r becomes
       φ'_r(m) = (u_r φ_r(m) + Σ_{(d,n) → (r,m)} u_d φ_d(n)) / (u_r + Σ u_d)
   (neurons that receive no segment are unchanged). Dropped experts that were never routed
   (u_d = 0) contribute nothing and are left out of the plan.

The plan stores, per layer, ``"neurons": {"slot_weights": [u_r per output slot], "sources":
{"<d>": {"weight": u_d, "slot": [r per neuron n], "neuron": [m per neuron n]}}}`` and
``PLAN_FIELDS.post["neurons"]`` (``lowmoe.methods``) performs step 4 on the on-disk tensors, so ``--plan``
re-applies it. The paper's router statistic, compatibility metric and merge weights are not public
(no code found): the choices above are lowmoe's. GPT-OSS's per-expert down-projection bias is not a
neuron quantity and stays the retained expert's.
"""

from __future__ import annotations

import torch

from ...errors import PlanError
from ..base import LayerMethod
from ...engine.budget import MergeHold
from ...engine.lazy import entry
from ...engine.plan import LayerPlan
from ...engine.writer import tensor_nbytes
from ..scoring import choose_keep
from .common import parse_options
from .stats import (LayerStats, expert_dtype, expert_weights, has_expert, hidden_size, neuron_features,
                    num_neurons, set_expert_weights)

ROWS = 4096  # segments matched per block: bounds the (rows, I) similarity buffer


def features(w: dict[str, torch.Tensor], proj: torch.Tensor | None) -> torch.Tensor:
    """Unit-norm neuron features (I, 3H), or (I, d) after a random projection (normed in place:
    one float32 copy of the expert besides ``w``)."""
    f = neuron_features(w)
    if proj is not None:
        f = f @ proj
    return f.div_(f.norm(dim=1, keepdim=True).clamp_min(1e-30))


class Matches:
    """The best retained (slot, neuron) so far for each neuron of a dropped expert, updated one block
    of slots at a time in slot order (``update``): the same answer as all slots at once, since each
    segment compares the slots in the same order with the same sums (ties stay with the earlier)."""

    def __init__(self, n: int):
        self.sim = torch.full((n,), -2.0)
        self.slot = torch.zeros(n, dtype=torch.long)
        self.neuron = torch.zeros(n, dtype=torch.long)

    def update(self, seg: torch.Tensor, retained: list[torch.Tensor], first_slot: int = 0) -> None:
        """``seg``: the dropped expert's ``features``; ``retained``: slots ``first_slot``... features."""
        for r0 in range(0, seg.shape[0], ROWS):
            block, rows = seg[r0:r0 + ROWS], slice(r0, r0 + ROWS)
            for slot, feats in enumerate(retained, first_slot):
                sim, neuron = (block @ feats.T).max(dim=1)  # (rows,): best neuron of this slot per segment
                better = sim > self.sim[rows]  # strict: ties stay with the earlier slot
                self.sim[rows] = torch.where(better, sim, self.sim[rows])
                self.slot[rows] = torch.where(better, slot, self.slot[rows])
                self.neuron[rows] = torch.where(better, neuron, self.neuron[rows])


def block_size(adapter, layer_idx: int, tensors, per_slot: int, scratch_bytes: int | None) -> int:
    """Slots per block when each takes ``per_slot`` float32 bytes: ``scratch_bytes`` (the budget's,
    ``BudgetPlan.merge_scratch_bytes``) or, without one, the layer's experts as stored -- so a
    layer's DERN holds about one layer whatever the keep (at least one slot a block)."""
    if scratch_bytes is None:
        prefix = adapter.layer_prefix(layer_idx)
        scratch_bytes = sum(tensor_nbytes(entry(tensors, k)) for k in tensors if adapter.is_expert_key(k[len(prefix):]))
    return max(1, int(scratch_bytes) // max(1, per_slot))


class Dern(LayerMethod):
    name = "dern"
    OPTIONS = {"statistic": ("frequency", ("frequency", "gate-mass")), "match_dim": (0, int)}

    def __init__(self, num_experts: int, top_k: int, **options):
        super().__init__(num_experts, top_k, **options)
        self.opts = parse_options(self.name, options, self.OPTIONS)
        self.stats = LayerStats(num_experts, top_k)
        self.info: dict = {}

    @classmethod
    def merge_hold(cls, num_experts: int, keep_n: int, options: dict | None = None) -> MergeHold:
        # every slot may be fed; float32 experts in blocks (retained features, slot sums)
        return MergeHold(keep_n, keep_n, blocks=True, match_rows=ROWS)

    def observe(self, call) -> None:
        self.stats.observe(call)

    def usage(self) -> torch.Tensor:
        if self.opts["statistic"] == "gate-mass":
            return self.stats.gate_mass / max(1, self.stats.tokens)
        return self.stats.frequency()

    def decide(self, layer_idx, keep_n, *, protected, groups, tensors, adapter) -> LayerPlan:
        u = self.usage()
        keep = choose_keep(u, keep_n, set(protected), groups)
        proj = None
        if self.opts["match_dim"]:
            # Matching costs (E-k)·k·I²·3H multiply-adds per layer; a seeded Gaussian projection to
            # match_dim dims keeps cosines approximately (Johnson-Lindenstrauss) at d/3H of the cost.
            h3 = hidden_size(adapter, layer_idx, tensors) * 3
            g = torch.Generator().manual_seed(int(self.options.get("seed", 0)) * 1_000_003 + layer_idx)
            proj = torch.randn(h3, self.opts["match_dim"], generator=g) / self.opts["match_dim"] ** 0.5
        dropped = [d for d in range(self.num_experts) if d not in keep and float(u[d]) > 0.0]
        n, h = num_neurons(adapter, layer_idx, tensors), hidden_size(adapter, layer_idx, tensors)
        # the retained experts' features a block at a time (``block_size``), each dropped expert read
        # once per block: without a budget, one block of every slot for a layer like Mixtral's at half
        per_slot = 4 * n * (3 * h if proj is None else proj.shape[1])
        size = block_size(adapter, layer_idx, tensors, per_slot, self.scratch_bytes)
        matches = {d: Matches(n) for d in dropped}
        for b0 in range(0, len(keep), size):
            retained = [features(expert_weights(adapter, layer_idx, tensors, e), proj) for e in keep[b0:b0 + size]]
            for d in dropped:
                matches[d].update(features(expert_weights(adapter, layer_idx, tensors, d), proj), retained, b0)
            del retained
        sources = {str(d): {"weight": float(u[d]), "slot": matches[d].slot.tolist(), "neuron": matches[d].neuron.tolist()}
                   for d in dropped}
        self.info = {"kept": keep, "segments_per_slot": [sum(s["slot"].count(j) for s in sources.values())
                                                         for j in range(len(keep))]}
        return LayerPlan(keep, extra={"neurons": {"slot_weights": [float(u[e]) for e in keep], "sources": sources}})

    def scores(self) -> torch.Tensor:
        return self.usage()

    def state(self) -> dict:
        return {"tokens": self.stats.tokens, "routed_tokens": self.stats.counts.tolist(), **self.info}


def _slot_blocks(adapter, layer_idx: int, originals, slots: list[int], scratch_bytes: int | None) -> list[list[int]]:
    """``slots`` in blocks whose float32 sums (one expert each) together take at most ``scratch_bytes``
    (``block_size``)."""
    n, h = num_neurons(adapter, layer_idx, originals), hidden_size(adapter, layer_idx, originals)
    size = block_size(adapter, layer_idx, originals, 4 * 3 * n * h, scratch_bytes)
    return [slots[i:i + size] for i in range(0, len(slots), size)]


def apply_neurons(adapter, layer_idx: int, experts_out: dict[str, torch.Tensor], originals: dict[str, torch.Tensor],
                  value, scratch_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """``PLAN_FIELDS.post["neurons"]`` (``lowmoe.methods``): step 4 of the module docstring on the output experts.

    ``experts_out`` (the kept experts, renumbered) and ``originals`` (the layer's experts) may hold
    stored entries or be a ``lazy.LazyLayer``: an expert is read when it is used. The slots that
    receive segments are merged a block at a time (``_slot_blocks``: float32 sums of at most
    ``scratch_bytes``, the budget's, or the layer's stored bytes), each source expert read once per
    block that it feeds, one at a time, so the layer is never decoded whole; a slot's sums are the same in any blocking (each source adds in the
    same order), so the same bits. Slots that receive nothing are returned as given (stored entries
    stay entries: copied as bytes)."""
    where = f"layer {layer_idx} 'neurons'"
    if not isinstance(value, dict) or not isinstance(value.get("slot_weights"), list) or not isinstance(value.get("sources"), dict):
        raise PlanError(f"{where}: expected {{'slot_weights': [...], 'sources': {{expert: {{weight, slot, neuron}}}}}}")
    slot_w = [float(x) for x in value["slot_weights"]]
    n = num_neurons(adapter, layer_idx, originals)
    sources = []  # (expert, slot per neuron, neuron per neuron, weight, the slots it feeds), by expert id
    for key, src in value["sources"].items():
        try:
            d = int(key)
        except (TypeError, ValueError):
            d = -1
        if not has_expert(adapter, layer_idx, originals, d):
            raise PlanError(f"{where}: source {key!r} is not an expert of this layer")
        slot, neuron = (src.get("slot"), src.get("neuron")) if isinstance(src, dict) else (None, None)
        if not (isinstance(slot, list) and isinstance(neuron, list) and len(slot) == n == len(neuron)
                and all(isinstance(s, int) and 0 <= s < len(slot_w) for s in slot)
                and all(isinstance(m, int) and 0 <= m < n for m in neuron)):
            raise PlanError(f"{where}: source {key!r} needs 'slot' and 'neuron' lists of {n} valid indices")
        sources.append((d, torch.tensor(slot), torch.tensor(neuron), float(src.get("weight", 0.0)), set(slot)))
    sources.sort(key=lambda s: s[0])
    out = dict(experts_out)
    dtype = expert_dtype(adapter, layer_idx, originals)
    touched = sorted(set().union(*(feeds for *_, feeds in sources)))
    cloned: set[str] = set()
    for block in _slot_blocks(adapter, layer_idx, originals, touched, scratch_bytes):
        sums = {j: {k: v * slot_w[j] for k, v in expert_weights(adapter, layer_idx, experts_out, j).items()} for j in block}
        dens = {j: torch.full((n,), slot_w[j]) for j in block}
        for d, slot_t, neuron_t, w, feeds in sources:
            fed = [j for j in block if j in feeds]
            if not fed:
                continue
            seg = expert_weights(adapter, layer_idx, originals, d)
            for j in fed:
                sel = (slot_t == j).nonzero(as_tuple=True)[0]  # this source's neurons going to slot j
                dst = neuron_t[sel]
                for name, t in seg.items():
                    if name == "down_bias":
                        continue
                    if name == "down":  # (H, I): neurons are columns
                        sums[j][name].index_add_(1, dst, t[:, sel] * w)
                    else:  # (I, H) or (I,): neurons are rows
                        sums[j][name].index_add_(0, dst, t[sel] * w)
                dens[j].index_add_(0, dst, torch.full((len(sel),), w))
            del seg
        for j in block:
            own = expert_weights(adapter, layer_idx, experts_out, j)
            ok = dens[j] > 0  # (I,): neurons with some merge weight; the rest (u_r = 0, no segment) stay as they were
            den = dens[j].clamp_min(1e-30)
            merged = {}
            for name, t in sums.pop(j).items():
                if name == "down_bias":  # per expert, not per neuron: the retained expert's own
                    merged[name] = own[name]
                elif name == "down":  # (H, I)
                    merged[name] = torch.where(ok[None, :], t / den[None, :], own[name])
                elif t.dim() == 2:  # (I, H)
                    merged[name] = torch.where(ok[:, None], t / den[:, None], own[name])
                else:  # (I,)
                    merged[name] = torch.where(ok, t / den, own[name])
            set_expert_weights(adapter, layer_idx, out, j, merged, dtype, cloned)
            del own, merged
    return out
