"""What every expert-scoring method implements, and the two routing-statistics scorers.

A scorer sees every forward call of one layer's MoE block (``MoeCall``: router logits, the top-k
transformers chose, the experts' input and routed output, optionally each slot's unweighted expert
output) and accumulates, in float64 on the calls' device, one score per expert: higher means more
important to keep. Scores for a layer are read with ``scores()`` once every calibration chunk has passed.

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
    """Accumulates one layer's statistics per calibration domain over every ``observe(call)``.

    The accumulators live on the device the calls come from and ``observe`` never waits for it: no
    ``.item()``, no copy to the host, no boolean-mask indexing (its row count is data the host would
    have to read). Tokens that do not count go to a discard row past the last domain instead of
    being selected out, and the sums are scattered with ``index_put_(accumulate=True)``, which adds
    each bin's values in token order on the CPU and sorts them first on CUDA, so the scores do not
    depend on the order of atomic adds. The totals reach the host once, when they are first read
    (``scores()``, ``state()``, ``tokens``...), after the layer's last call."""

    name: str = "base"
    OPTIONS: dict = {}  # --method-option name -> (default, kind) (``methods.options.parse_options``)
    # Whether observe() needs each routed expert's own output f_e(x) (MoeCall.expert_outputs).
    needs_expert_outputs: bool = False

    def __init__(self, num_experts: int, top_k: int, **options):
        self.num_experts = num_experts
        self.top_k = top_k
        self.options = options
        # Rows 0..D-1: domain d's _sums[d] (E,) the method's accumulator, _counts[d] (E,) routed
        # assignments, _tokens[d] counted tokens; row D takes the tokens that do not count. Kept on
        # the calls' device while observing (``_acc``), on the host once read (``_host``).
        self._domains = 0
        self._acc: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ---- the totals on the host (reading them waits for the device once) --------------------
    def _settled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._host is None:
            if self._acc is None:
                e = self.num_experts
                self._host = (torch.zeros(0, e, dtype=torch.float64), torch.zeros(0, e, dtype=torch.float64),
                              torch.zeros(0, dtype=torch.float64))
            else:
                d = self._domains
                self._host = tuple(a[:d].cpu() for a in self._acc)
        return self._host

    @property
    def _sums(self) -> torch.Tensor:
        return self._settled()[0]

    @property
    def _counts(self) -> torch.Tensor:
        return self._settled()[1]

    @property
    def _tokens(self) -> torch.Tensor:
        return self._settled()[2]

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
    def _rows(self, n_domains: int, device: torch.device) -> None:
        """Accumulators on ``device`` with a row for each of ``n_domains`` domains and the discard row."""
        if self._acc is not None and n_domains <= self._domains and self._acc[0].device == device:
            return
        n = max(n_domains, self._domains)
        e = self.num_experts
        fresh = (torch.zeros(n + 1, e, dtype=torch.float64, device=device),
                 torch.zeros(n + 1, e, dtype=torch.float64, device=device),
                 torch.zeros(n + 1, dtype=torch.float64, device=device))
        if self._acc is not None:
            for new, old in zip(fresh, self._acc):
                new[:self._domains] = old[:self._domains].to(device)
        self._acc, self._domains = fresh, n

    def _token_rows(self, call: MoeCall) -> torch.Tensor:
        """(T,) long on the call's device: each token's domain, or the discard row if it does not count."""
        idx = call.top_k_index
        if call.token_domain is None:
            dom = torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device)
            n = 1
        else:
            dom = call.token_domain.to(idx.device)
            # the stream says how many domains there are; a bare MoeCall costs one wait to find out
            n = call.num_domains if call.num_domains is not None else (int(dom.max()) + 1 if dom.numel() else 1)
        self._rows(n, idx.device)
        if call.token_mask is not None:
            dom = torch.where(call.token_mask.to(idx.device), dom, self._domains)
        return dom

    def add(self, domain: torch.Tensor, expert_idx: torch.Tensor, values: torch.Tensor) -> None:
        """_sums[domain[t], expert_idx[t, j]] += values[t, j] for every token t and slot j.
        domain (T,) as ``observe`` passes it (uncounted tokens in the discard row), expert_idx (T, m),
        values (T, m)."""
        flat = (domain[:, None] * self.num_experts + expert_idx.to(domain.device)).reshape(-1)
        self._acc[0].view(-1).index_put_((flat,), values.reshape(-1).to(domain.device, torch.float64), accumulate=True)

    def observe(self, call: MoeCall) -> None:
        idx, w = call.top_k_index, call.top_k_weights
        if idx.shape[0] == 0:
            return
        dom = self._token_rows(call)
        self._host = None
        _, counts, tokens = self._acc
        flat = (dom[:, None] * self.num_experts + idx).reshape(-1)
        counts.view(-1).index_put_((flat,), torch.ones(flat.numel(), dtype=torch.float64, device=flat.device),
                                   accumulate=True)
        tokens.index_put_((dom,), torch.ones(dom.numel(), dtype=torch.float64, device=dom.device), accumulate=True)
        self.accumulate(call, idx, w, dom)

    def accumulate(self, call: MoeCall, idx: torch.Tensor, weights: torch.Tensor, domain: torch.Tensor) -> None:
        """Add this call's contribution with ``add``: ``idx``/``weights`` (T, k) are the call's routing
        and ``domain`` (T,) each token's row, over every token of the call: a token that does not count
        has the discard row, so what ``add`` adds for it, NaN included, is never read."""
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

    def accumulate(self, call, idx, weights, domain) -> None:
        pass  # the routing counts the base class keeps are the statistic

    def domain_scores(self, d: int) -> torch.Tensor:
        return self.usage(d)


class GateMassScorer(Scorer):
    """Summed routing weight ("soft activation", SEER-MoE): Σ_t g_e(t) over tokens routed to e,
    normalised by the number of counted tokens; g = the weights the experts module applies."""

    name = "gate-mass"

    def accumulate(self, call, idx, weights, domain) -> None:
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
