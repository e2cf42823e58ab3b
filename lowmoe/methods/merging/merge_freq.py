"""``merge-freq``: M-SMoE-style frequency-weighted merging (Li et al., ICLR 2024, arXiv 2310.01334).

Per MoE layer, from the calibration pass:

1. usage frequency f_e = share of top-k assignments; the k most-used experts lead the k groups
   (protected experts first);
2. every other expert joins the leader it is most similar to. ``similarity`` option:
   ``router-logits`` (default, M-SMoE's): (cos + 1) / 2 of the two experts' router-logit columns
   over the calibration tokens; ``weight``: cosine of the flattened expert weights (all
   projections); ``output``: token-wise cosine of the experts' outputs on every calibration token;
3. each group merges as θ' = Σ f_i θ_i / Σ f_i over all the expert's matrices (``common.py``),
   with the leader's router row (``router=mean``: the frequency-weighted average of the rows).

Choices where M-SMoE leaves details open: the group count is the same in every layer (stock
loaders need it; M-SMoE pools frequencies across layers and gets uneven counts); M-SMoE keeps the
tied experts and the full router, lowmoe writes a compact model with k experts and k router rows.
"""

from __future__ import annotations

from .common import MergeMethod, assign_to_leaders, pick_leaders, report_matrix
from .stats import gram_to_cosine, weight_gram


class MergeFreq(MergeMethod):
    name = "merge-freq"
    OPTIONS = {"similarity": ("router-logits", ("router-logits", "weight", "output"))}

    def stats_kwargs(self) -> dict:
        sim = self.opts["similarity"]
        return {"router_gram": sim == "router-logits", "outputs": "gram" if sim == "output" else None}

    def similarity(self, layer_idx, tensors, adapter):
        sim = self.opts["similarity"]
        if sim == "router-logits":
            return self.stats.router_similarity()
        if sim == "output":
            return self.stats.output_similarity()
        return gram_to_cosine(weight_gram(adapter, layer_idx, tensors, self.num_experts))

    def make_groups(self, layer_idx, keep_n, protected, tensors, adapter):
        freq = self.stats.frequency()
        leaders = pick_leaders(freq, keep_n, protected)
        sim = self.similarity(layer_idx, tensors, adapter)
        self.info = {"similarity": report_matrix(sim)}
        return assign_to_leaders(sim, leaders, protected)
