"""What every expert-scoring method implements, and the two routing-statistics scorers.

A scorer sees every forward call of one layer's MoE block (``MoeCall``: router logits, the top-k
transformers chose, the experts' input and routed output, optionally each slot's unweighted expert
output) and accumulates, in float64 on the CPU, one score per expert: higher means more important
to keep. Scores for a layer are read with ``scores()`` once every calibration chunk has passed.

Only tokens that count (``MoeCall.token_mask``: not padding, and only answer tokens with
``--answer-only``) enter any statistic.

**Several domains.** Statistics are kept per calibration domain (``MoeCall.token_domain``). With
one domain ``scores()`` is the method's formula as published. With several, each domain's score
vector is normalised per layer to unit L1 mass and the vectors are summed, each weighted by its
domain's share of counted tokens (so ``--calib math.jsonl@3 --calib code.jsonl@1`` weighs math 3:1,
and equal shares give exactly EASY-EP's mixed-domain rule "normalise per domain, then add",
arXiv 2504.06792). Without normalisation a domain whose tokens have larger
norms or more tokens would decide alone.
"""

from __future__ import annotations

import torch

from ...engine.hf import MoeCall


def router_probs(call: MoeCall) -> torch.Tensor:
    """The router's real per-expert scores (T, E) float32: softmax over the logits, or the
    element-wise sigmoid for DeepSeek-V3's router (``adapter.router_scoring``)."""
    if call.router_scoring == "sigmoid":
        return torch.sigmoid(call.router_logits.float())
    return torch.softmax(call.router_logits.float(), dim=-1)


class Scorer:
    name: str = "base"
    OPTIONS: dict = {}  # --method-option name -> (default, kind) (``methods.options.parse_options``)
    # Whether observe() needs each routed expert's own output f_e(x) (MoeCall.expert_outputs).
    needs_expert_outputs: bool = False

    def __init__(self, num_experts: int, top_k: int, **options):
        self.num_experts = num_experts
        self.top_k = top_k
        self.options = options
        # Per domain d: _sums[d] (E,) the method's accumulator, _counts[d] (E,) routed assignments,
        # _tokens[d] counted tokens. Rows are added as new domains appear.
        self._sums = torch.zeros(0, num_experts, dtype=torch.float64)
        self._counts = torch.zeros(0, num_experts, dtype=torch.float64)
        self._tokens = torch.zeros(0, dtype=torch.float64)

    # ---- totals over domains (what single-domain code reads) -------------------------------
    @property
    def sums(self) -> torch.Tensor:
        return self._sums.sum(0) if len(self._sums) else torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def counts(self) -> torch.Tensor:
        return self._counts.sum(0) if len(self._counts) else torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def tokens(self) -> int:
        return int(self._tokens.sum())

    @property
    def num_domains(self) -> int:
        return int((self._tokens > 0).sum())

    # ---- accumulation ------------------------------------------------------------------------
    @staticmethod
    def counted(call: MoeCall):
        """(index, weights, token selector) restricted to tokens that count."""
        if call.token_mask is None:
            return call.top_k_index, call.top_k_weights, slice(None)
        m = call.token_mask.to(call.top_k_index.device)
        return call.top_k_index[m], call.top_k_weights[m], m

    def _grow(self, n_domains: int) -> None:
        if n_domains > len(self._tokens):
            extra = n_domains - len(self._tokens)
            self._sums = torch.cat([self._sums, self._sums.new_zeros(extra, self.num_experts)])
            self._counts = torch.cat([self._counts, self._counts.new_zeros(extra, self.num_experts)])
            self._tokens = torch.cat([self._tokens, self._tokens.new_zeros(extra)])

    def add(self, domain: torch.Tensor, expert_idx: torch.Tensor, values: torch.Tensor) -> None:
        """_sums[domain[t], expert_idx[t, j]] += values[t, j] for every counted token t and slot j.
        domain (n,), expert_idx (n, m), values (n, m)."""
        if domain.numel() == 0:
            return
        d = domain.cpu()
        self._grow(int(d.max()) + 1)
        flat = (d[:, None] * self.num_experts + expert_idx.cpu()).reshape(-1)
        self._sums.view(-1).index_add_(0, flat, values.reshape(-1).to("cpu", torch.float64))

    def observe(self, call: MoeCall) -> None:
        idx, w, sel = self.counted(call)
        n = idx.shape[0]
        dom = (call.token_domain[sel] if call.token_domain is not None
               else torch.zeros(n, dtype=torch.long, device=idx.device)).cpu()
        if n:
            self._grow(int(dom.max()) + 1)
            flat = (dom[:, None] * self.num_experts + idx.cpu()).reshape(-1)
            self._counts.view(-1).index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64))
            self._tokens.index_add_(0, dom, torch.ones(n, dtype=torch.float64))
        self.accumulate(call, sel, idx, w, dom)

    def accumulate(self, call: MoeCall, sel, idx: torch.Tensor, weights: torch.Tensor, domain: torch.Tensor) -> None:
        """Add this call's contribution: ``sel`` selects counted tokens of the call's (T, ...)
        tensors; ``idx``/``weights`` (n, k) and ``domain`` (n,) are already restricted to them."""
        raise NotImplementedError

    # ---- reading -----------------------------------------------------------------------------
    def domain_scores(self, d: int) -> torch.Tensor:
        """The method's formula on domain ``d``'s tokens alone, (E,) float64."""
        return self._sums[d].clone()

    def scores(self) -> torch.Tensor:
        present = [d for d in range(len(self._tokens)) if self._tokens[d] > 0]
        if len(present) <= 1:
            return self.domain_scores(present[0]) if present else torch.zeros(self.num_experts, dtype=torch.float64)
        total = float(self._tokens.sum())
        out = torch.zeros(self.num_experts, dtype=torch.float64)
        for d in present:
            s = self.domain_scores(d)
            mass = float(s.abs().sum())
            if mass > 0:
                out += (float(self._tokens[d]) / total) * s / mass
        return out

    def usage(self, d: int | None = None) -> torch.Tensor:
        """Share of top-k assignments per expert (E,), for domain ``d`` or all tokens."""
        c = self.counts if d is None else self._counts[d]
        t = self.tokens if d is None else float(self._tokens[d])
        return c / max(1.0, t * self.top_k)

    def state(self) -> dict:
        """Statistics worth reporting for this layer (beyond the scores)."""
        st = {"routed_tokens": self.counts.tolist(), "tokens": self.tokens}
        if self.num_domains > 1:
            st["domains"] = {str(d): {"tokens": int(self._tokens[d]), "usage": self.usage(d).tolist(),
                                      "scores": self.domain_scores(d).tolist()}
                             for d in range(len(self._tokens)) if self._tokens[d] > 0}
        return st


class FrequencyScorer(Scorer):
    """Share of top-k assignments: f_e = #{(t, j): top_k_index[t, j] = e} / (T·k)
    (SEER-MoE, Muzio et al. 2024, arXiv 2404.05089)."""

    name = "frequency"

    def accumulate(self, call, sel, idx, weights, domain) -> None:
        pass  # the routing counts the base class keeps are the statistic

    def domain_scores(self, d: int) -> torch.Tensor:
        return self.usage(d)


class GateMassScorer(Scorer):
    """Summed routing weight ("soft activation", SEER-MoE): Σ_t g_e(t) over tokens routed to e,
    normalised by the number of counted tokens; g = the weights the experts module applies."""

    name = "gate-mass"

    def accumulate(self, call, sel, idx, weights, domain) -> None:
        self.add(domain, idx, weights)

    def domain_scores(self, d: int) -> torch.Tensor:
        return self._sums[d] / max(1.0, float(self._tokens[d]))


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
