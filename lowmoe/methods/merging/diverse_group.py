"""``diverse-group``: keep complementary experts, merge the rest into them with their router rows
("Diversifying the Expert Knowledge for Task-Agnostic Pruning in Sparse Mixture-of-Experts",
Zhang et al., ACL Findings 2025, arXiv 2407.09590).

Per MoE layer:

1. a disparity matrix D (E, E) between experts, ``representation`` option:
   ``weight`` (model-centric, default): D_ij = 1 − cos(θ_i, θ_j) of the flattened expert weights;
   ``output`` (data-centric): D_ij = 1 − Σ_t<f_i(x_t), f_j(x_t)> / sqrt(Σ_t‖f_i‖² Σ_t‖f_j‖²), the
   token-wise output cosine over every calibration token;
2. k complementary experts are kept by farthest-point selection on D: start from the most-used
   expert (protected ones first), then repeatedly add the expert whose smallest disparity to the
   kept set is largest (ties -> more used, then lower id);
3. every other expert joins the kept expert it is least disparate from, and each group merges
   frequency-weighted (θ' = Σ f_i θ_i / Σ f_i) **together with its router rows** (default
   ``router=mean``: the group's rows averaged with the same weights; ``router=leader`` keeps the
   kept expert's row).

The paper's exact graph-grouping rule and merge weights are not public (no code found); step 2's
farthest-point rule is lowmoe's choice: it keeps experts that are far from each other, so the
knowledge that survives is diverse, and usage only breaks ties and picks the start.
"""

from __future__ import annotations

import torch

from .common import MergeMethod, assign_to_leaders, report_matrix
from .stats import gram_to_cosine, weight_gram


def farthest_point(dist: torch.Tensor, k: int, freq: torch.Tensor, protected: set[int]) -> list[int]:
    """k items, greedily maximising the minimum distance to those already chosen (see docstring)."""
    n = dist.shape[0]
    first = sorted(range(n), key=lambda e: (e not in protected, -float(freq[e]), e))
    chosen = [e for e in first if e in protected][:k] or [first[0]]
    while len(chosen) < k:
        rest = [e for e in range(n) if e not in chosen]
        chosen.append(max(rest, key=lambda e: (float(dist[e, chosen].min()), float(freq[e]), -e)))
    return chosen


class DiverseGroup(MergeMethod):
    name = "diverse-group"
    OPTIONS = {"representation": ("weight", ("weight", "output")), "router": ("mean", ("leader", "mean"))}

    def stats_kwargs(self) -> dict:
        return {"outputs": "gram" if self.opts["representation"] == "output" else None}

    def disparity(self, layer_idx, tensors, adapter) -> torch.Tensor:
        if self.opts["representation"] == "output":
            return 1 - self.stats.output_similarity()
        return 1 - gram_to_cosine(weight_gram(adapter, layer_idx, tensors, self.num_experts))

    def make_groups(self, layer_idx, keep_n, protected, tensors, adapter):
        freq = self.stats.frequency()
        dist = self.disparity(layer_idx, tensors, adapter)
        kept = farthest_point(dist, keep_n, freq, protected)
        self.info = {"disparity": report_matrix(dist), "kept_order": kept}
        return assign_to_leaders(-dist, kept, protected)
