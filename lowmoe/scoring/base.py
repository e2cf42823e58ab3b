"""What every expert-scoring method implements.

A scorer sees every forward call of one layer's MoE block (``MoeCall``: router logits, the top-k
transformers chose, the experts' input and routed output) and accumulates, in float64, one score
per expert: higher means more important to keep. Scores for a layer are read with ``scores()``
once every calibration chunk has passed.
"""

from __future__ import annotations

import torch

from ..layer import MoeCall


class Scorer:
    name: str = "base"
    # Whether observe() needs each routed expert's own output f_e(x) (costs one expert pass).
    needs_expert_outputs: bool = False

    def __init__(self, num_experts: int, top_k: int, **options):
        self.num_experts = num_experts
        self.top_k = top_k
        self.options = options
        self.sums = torch.zeros(num_experts, dtype=torch.float64)
        self.counts = torch.zeros(num_experts, dtype=torch.float64)
        self.tokens = 0

    @staticmethod
    def counted(call: MoeCall):
        """(index, weights, token selector) restricted to tokens that count."""
        if call.token_mask is None:
            return call.top_k_index, call.top_k_weights, slice(None)
        m = call.token_mask.to(call.top_k_index.device)
        return call.top_k_index[m], call.top_k_weights[m], m

    def observe(self, call: MoeCall) -> None:
        raise NotImplementedError

    def scores(self) -> torch.Tensor:
        return self.sums.clone()

    def state(self) -> dict:
        """Statistics worth reporting for this layer (beyond the scores)."""
        return {"routed_tokens": self.counts.tolist(), "tokens": self.tokens}


class FrequencyScorer(Scorer):
    """Share of top-k assignments: f_e = #{(t, j): top_k_index[t, j] = e} / (T·k) (SEER-MoE)."""

    name = "frequency"

    def observe(self, call: MoeCall) -> None:
        idx, _, _ = self.counted(call)
        c = torch.bincount(idx.reshape(-1).cpu(), minlength=self.num_experts).double()
        self.counts += c
        self.sums += c
        self.tokens += idx.shape[0]

    def scores(self) -> torch.Tensor:
        return self.sums / max(1, self.tokens * self.top_k)


class GateMassScorer(Scorer):
    """Summed routing weight ("soft activation", SEER-MoE): Σ_t g_e(t) over tokens routed to e,
    normalised by the number of counted tokens."""

    name = "gate-mass"

    def observe(self, call: MoeCall) -> None:
        idx, w, _ = self.counted(call)
        self.sums.index_add_(0, idx.reshape(-1).cpu(), w.reshape(-1).double().cpu())
        self.counts += torch.bincount(idx.reshape(-1).cpu(), minlength=self.num_experts).double()
        self.tokens += idx.shape[0]

    def scores(self) -> torch.Tensor:
        return self.sums / max(1, self.tokens)


def choose_keep(scores: torch.Tensor, k: int, protected: set[int] | None = None,
                groups: int = 1) -> list[int]:
    """The ``k`` highest-scoring experts (protected experts first; ties -> lower expert id),
    returned sorted by original id. With ``groups`` > 1 (DeepSeek group-limited routing) the same
    number is kept from each contiguous group of E/groups experts."""
    protected = set(protected or ())
    n = scores.numel()
    if groups > 1:
        per, k_per = n // groups, k // groups
        keep: list[int] = []
        for g in range(groups):
            sub = scores[g * per:(g + 1) * per]
            prot = {e - g * per for e in protected if g * per <= e < (g + 1) * per}
            keep += [g * per + e for e in choose_keep(sub, k_per, prot)]
        return sorted(keep)
    order = sorted(range(n), key=lambda e: (e not in protected, -float(scores[e]), e))
    return sorted(order[:k])
