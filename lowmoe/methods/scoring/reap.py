"""REAP: router-weighted expert activation pruning (Cerebras, arXiv 2510.13999).

For expert j and the set X_j of counted tokens whose top-k includes j:

    S_j = (1 / |X_j|) · Σ_{t ∈ X_j} g_j(t) · ‖f_j(x_t)‖₂

g_j is the router's probability for j -- softmax over all logits, or the sigmoid score for
DeepSeek-V3's router -- and f_j(x_t) the expert's output before gate weighting. With
``renormalize=True`` (default, as REAP's code since 2026-03: ``renormalize_router_weights``) g is
divided by the sum of the token's top-k probabilities, so it equals the applied weight of a
Mixtral-style router. Experts never routed to score 0. f_j(x_t) comes from the same forward pass
(``MoeCall.expert_outputs``, (T, k, H)), so scoring costs no extra expert compute.
"""

from __future__ import annotations

import torch

from .base import Scorer, router_probs


class ReapScorer(Scorer):
    name = "reap"
    needs_expert_outputs = True

    OPTIONS = {"renormalize": (True, bool)}

    def __init__(self, num_experts: int, top_k: int, renormalize: bool = True, **options):
        super().__init__(num_experts, top_k, **options)
        self.renormalize = bool(renormalize)

    def accumulate(self, call, idx, weights, domain) -> None:
        probs = router_probs(call)  # (T, E)
        g = probs.gather(1, idx.to(probs.device))  # (T, k): probability of each chosen expert
        if self.renormalize:
            g = g / g.sum(-1, keepdim=True).clamp_min(1e-20)
        norms = call.expert_outputs.float().norm(dim=-1)  # (T, k) ‖f_e(x_t)‖₂
        self.add(domain, idx, g.double() * norms.double())

    def domain_scores(self, d: int) -> torch.Tensor:
        return self._sums[d] / self._counts[d].clamp_min(1.0)  # mean over routed tokens
