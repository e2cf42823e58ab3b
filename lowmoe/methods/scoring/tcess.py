"""PreMoe TCESS: task-conditioned expected selection score (arXiv 2505.17639).

As PreMoe's released code computes it: per token keep the router logits of its top-k experts
(the experts the router actually chose when ``k`` is the model's top-k, else the k largest logits),
optionally only those whose softmax over the kept k logits is >= ``threshold`` r; every other
logit is set to 0. TCESS is the per-expert mean of these masked logits over counted tokens:

    TCESS_e = (1 / T) · Σ_t  z_{t,e} · 1[e ∈ top-k(t), softmax_k(z_t)_e >= r]

Logits are raw (pre-softmax / pre-sigmoid, router bias included). PreMoe's code scores only the
first MoE layer (k=1) and rank-matches the others to it; lowmoe scores every layer on its own.
"""

from __future__ import annotations

import torch

from .base import Scorer


class TcessScorer(Scorer):
    name = "tcess"

    OPTIONS = {"k": (None, int), "threshold": (0.0, float)}

    def __init__(self, num_experts: int, top_k: int, k: int | None = None, threshold: float = 0.0, **options):
        super().__init__(num_experts, top_k, **options)
        self.k = int(k or top_k)
        self.threshold = float(threshold)

    def accumulate(self, call, idx, weights, domain) -> None:
        logits = call.router_logits.float()  # (T, E)
        if self.k == self.top_k:
            chosen = idx.to(logits.device)
        else:
            chosen = logits.topk(self.k, dim=-1).indices
        z = logits.gather(1, chosen)  # (T, k)
        if self.threshold > 0:
            z = z * (torch.softmax(z, dim=-1) >= self.threshold)
        self.add(domain, chosen, z.double())

    def domain_scores(self, d: int) -> torch.Tensor:
        return self._sums[d] / max(1.0, float(self._tokens[d]))
