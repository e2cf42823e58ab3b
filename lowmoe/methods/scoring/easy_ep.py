"""EASY-EP: expert importance from a few domain demonstrations (arXiv 2504.06792).

For MoE layer l, token t with input h_t (the hidden state entering the experts) and routed-experts
output r_t = Σ_{i∈top-k} g_{i,t} · E_i(h_t) (taken *before* any shared expert is added, the
paper's ``x_after_rmoe``):

    c_{i,t} = g_{i,t} · ‖E_i(h_t)‖₂                       expert output magnitude
    s_t     = max(0, 1 − cos(h_t, h_t + r_t))              token contribution (clamped at 0, as the code)
    I(E_i)  = Σ_t c_{i,t} · s_t                            summed over counted tokens

g is the gating weight the experts module applies (after top-k normalisation and any routed
scaling factor). Mixed domains: each domain's per-layer scores are normalised and added (see
``scoring.base``). E_i(h_t) comes from the same forward pass (``MoeCall.expert_outputs``).
"""

from __future__ import annotations

import torch

from .base import Scorer


class EasyEpScorer(Scorer):
    name = "easy-ep"
    needs_expert_outputs = True

    def accumulate(self, call, idx, weights, domain) -> None:
        h = call.moe_input.reshape(-1, call.moe_input.shape[-1]).float()  # (T, H)
        r = call.routed_output.reshape(-1, call.routed_output.shape[-1]).float()  # (T, H)
        s = (1.0 - torch.nn.functional.cosine_similarity(h, h + r, dim=-1, eps=1e-8)).clamp_min(0.0)  # (T,)
        norms = call.expert_outputs.float().norm(dim=-1)  # (T, k)
        c = weights.float() * norms  # (T, k)
        self.add(domain, idx, c.double() * s.double()[:, None])
