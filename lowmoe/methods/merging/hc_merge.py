"""``hc-merge``: HC-SMoE hierarchical clustering of experts by their outputs (Chen et al., ICML 2025,
arXiv 2410.08589), then a frequency-weighted merge.

Per MoE layer:

1. every expert's output f_e(x) is computed on **every** calibration token (not only the tokens
   routed to it, so the grouping does not depend on routing) and averaged: μ_e = mean_t f_e(x_t);
2. experts are clustered by agglomerative clustering (``linkage`` option, default ``average`` as in
   HC-SMoE's scripts) on the distance between their mean outputs (``distance`` option: ``cosine``
   (default) = 1 − cos(μ_i, μ_j), or ``euclidean`` ‖μ_i − μ_j‖) until k clusters remain;
3. each cluster merges frequency-weighted, θ' = Σ f_i θ_i / Σ f_i (``common.py``), into the slot of
   its most-used member, whose router row it keeps (``router=mean``: frequency-weighted average).

HC-SMoE ties the merged experts and keeps the full router; lowmoe writes k experts and k router
rows. ``max_tokens`` caps the tokens used for the mean outputs (cost is E/k × a normal pass).
"""

from __future__ import annotations

from .common import MergeMethod, agglomerate, lead_clusters, report_matrix
from .stats import gram_to_cosine


class HcMerge(MergeMethod):
    name = "hc-merge"
    OPTIONS = {"linkage": ("average", ("average", "single", "complete")),
               "distance": ("cosine", ("cosine", "euclidean"))}

    def stats_kwargs(self) -> dict:
        return {"outputs": "mean"}

    def distances(self):
        mu = self.stats.mean_outputs()  # (E, H)
        if self.opts["distance"] == "euclidean":
            return (mu[:, None, :] - mu[None, :, :]).norm(dim=-1)
        return 1 - gram_to_cosine(mu @ mu.T)

    def make_groups(self, layer_idx, keep_n, protected, tensors, adapter):
        dist = self.distances()
        clusters, history = agglomerate(dist, keep_n, self.opts["linkage"], protected)
        self.info = {"distance": report_matrix(dist), "merges": history}
        return lead_clusters(clusters, self.stats.frequency(), protected)
