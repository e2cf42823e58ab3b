"""NAEE-style reconstruction search: per layer, the kept set whose MoE output best matches the
full layer's (Lu et al., "Not All Experts are Equal", ACL 2024, arXiv 2402.14800).

For a kept set K, the pruned layer routes every token among K only (the dropped experts' router
rows are gone, so their logits are -inf: softmax/top-k renormalise over K, exactly what the
written checkpoint does). With Z_t the full layer's routed output and Z_t^K the pruned one,

    L(K) = Σ_t ‖Z_t − Z_t^K‖²₂            over counted calibration tokens t
    K*   = argmin_{|K| = keep} L(K)

(NAEE sums the unsquared Frobenius norm per batch; with one batch the argmin is the same.)
A shared expert is untouched by pruning, so it cancels and is left out.

**Making every candidate cheap.** Z_t − Z_t^K = Σ_i c_{t,i} f_{S_{t,i}}(x_t) with S_t the token's
old and new top-k experts (2k slots) and c_t = (w_t, −w_t^K). So
L(K) = Σ_t c_tᵀ G_t[S_t, S_t] c_t with G_t = F_t F_tᵀ, the (E, E) Gram matrix of all experts'
outputs on token t. G is computed once per layer on a uniform sample of counted tokens (bottom-k
sampling with a seeded generator; ``max_tokens``, capped so G fits ``gram_bytes``); after that a
candidate costs one routing of the sample's router logits plus a (2k × 2k) quadratic form per
token -- no expert is run again. Computing G costs E expert evaluations per sampled token.

**Search.** Exhaustive over every kept set when there are at most ``exhaustive_limit`` candidates
(C(8, 4) = 70 for Mixtral); otherwise beam search that drops one expert at a time, keeping the
``beam`` best partial drop sets (greedy with ``beam=1``; default 4 up to 64 experts, else 1), so
64-256 experts take (E - keep)·beam·E candidate evaluations. Protected (super) experts are never
dropped; with DeepSeek group-limited routing the same number is kept in every group.

The router is simulated from its logits (softmax top-k with or without renormalisation,
GPT-OSS's top-k-then-softmax, DeepSeek-V2's grouped softmax and DeepSeek-V3's grouped sigmoid
with ``e_score_correction_bias``) and checked against the routing transformers actually did on
the first calibration chunk; a router it cannot reproduce (Phi-MoE's sparsemixer) is an error.
Per-expert ``scores`` for the report are the loss of dropping that expert alone.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch

from ..errors import ConfigError
from ..engine.hf import MoeCall, expert_output
from .base import LayerMethod
from ..engine.plan import LayerPlan
from .options import parse_options

log = logging.getLogger(__name__)

NEG = float("-inf")


# ---- the router, simulated from its logits --------------------------------------------------


class RouterSim:
    """Routing of a pruned layer from the full layer's router logits and a keep mask."""

    def __init__(self, router, scoring: str, top_k: int):
        self.top_k = int(getattr(router, "top_k", top_k))
        self.scale = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)
        self.n_group = int(getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1)
        self.topk_group = int(getattr(router, "topk_group", 1) or 1)
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            self.kind = "sigmoid-grouped"
            self.bias = bias.detach().float().cpu()
            self.norm = bool(getattr(router, "norm_topk_prob", True))
        elif hasattr(router, "topk_method"):
            self.kind = "softmax-grouped" if router.topk_method == "group_limited_greedy" else "softmax"
            self.norm = False
        elif isinstance(getattr(router, "bias", None), torch.nn.Parameter):
            self.kind = "topk-softmax"  # GPT-OSS: top-k of the logits, softmax over those k
            self.norm = True
        else:
            self.kind = "softmax"
            self.norm = bool(getattr(router, "norm_topk_prob", True))  # Mixtral's router always renormalises
        if scoring == "sigmoid" and self.kind != "sigmoid-grouped":
            self.kind, self.bias, self.norm = "sigmoid-grouped", torch.zeros(0), True

    def route(self, logits: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (N, E) float32, keep (C, E) bool -> (index (C, N, k), weights (C, N, k))."""
        z = logits.unsqueeze(0).masked_fill(~keep.unsqueeze(1), NEG)  # (C, N, E)
        k = self.top_k
        if self.kind == "topk-softmax":
            val, idx = z.topk(k, dim=-1)
            return idx, torch.softmax(val, dim=-1)
        if self.kind == "sigmoid-grouped":
            scores = torch.sigmoid(z)  # dropped -> 0
            choice = scores + (self.bias if self.bias.numel() else 0.0)
            choice = choice.masked_fill(~keep.unsqueeze(1), NEG)
            choice = self._group_mask(choice, lambda g: g.topk(2, dim=-1).values.sum(-1), NEG)
            idx = choice.topk(k, dim=-1).indices
            w = scores.gather(-1, idx)
            if self.norm:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            return idx, w * self.scale
        probs = torch.softmax(z, dim=-1)
        if self.kind == "softmax-grouped":  # DeepSeek-V2: groups by max prob; other groups' probs -> 0
            probs = self._group_mask(probs, lambda g: g.max(dim=-1).values, 0.0)
        idx = probs.topk(k, dim=-1).indices
        w = probs.gather(-1, idx)
        if self.norm:
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
        return idx, w * self.scale  # routed_scaling_factor (DeepSeek); 1 elsewhere

    def _group_mask(self, choice: torch.Tensor, group_score, fill: float) -> torch.Tensor:
        if self.n_group <= 1:
            return choice
        c, n, e = choice.shape
        g = group_score(choice.view(c, n, self.n_group, e // self.n_group))  # (C, N, n_group)
        top = g.topk(self.topk_group, dim=-1).indices
        gmask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True)
        return choice.masked_fill(~gmask.repeat_interleave(e // self.n_group, dim=-1), fill)


# ---- the layer method ------------------------------------------------------------------------


class ReconstructionMethod(LayerMethod):
    name = "reconstruction"
    needs_expert_outputs = False

    OPTIONS = {"max_tokens": (4096, int), "gram_bytes": (512 * 2**20, int), "exhaustive_limit": (20000, int),
               "beam": (None, int)}

    def __init__(self, num_experts: int, top_k: int, seed: int = 0, **options):
        super().__init__(num_experts, top_k, **options)
        opts = parse_options(self.name, options, self.OPTIONS)
        max_tokens, gram_bytes, exhaustive_limit, beam = (opts[k] for k in ("max_tokens", "gram_bytes", "exhaustive_limit", "beam"))
        e = num_experts
        self.max_tokens = max(1, min(int(max_tokens), int(gram_bytes) // (4 * e * e)))
        self.exhaustive_limit = int(exhaustive_limit)
        self.beam = int(beam) if beam else (4 if e <= 64 else 1)
        self.gen = torch.Generator().manual_seed(int(seed))
        # The sample: bottom-k of uniform keys over all counted tokens = a uniform sample without
        # replacement, maintained incrementally per call.
        self._keys = torch.zeros(0)
        self._x: torch.Tensor | None = None  # (N, H) experts' input
        self._logits = torch.zeros(0, e)  # (N, E) float32
        self._idx = torch.zeros(0, top_k, dtype=torch.long)  # (N, k) original routing
        self._w = torch.zeros(0, top_k)  # (N, k)
        self._experts = None
        self._compute: tuple[torch.device, torch.dtype] | None = None
        self._sim: RouterSim | None = None
        self._checked = False
        self._gram: torch.Tensor | None = None  # (N, E, E)
        self._single: torch.Tensor | None = None
        self._state: dict = {}

    def observe(self, call: MoeCall) -> None:
        sel = slice(None) if call.token_mask is None else call.token_mask.to(call.top_k_index.device)
        x = call.moe_input.reshape(-1, call.moe_input.shape[-1])[sel].detach()
        logits, idx, w = call.router_logits[sel].float().cpu(), call.top_k_index[sel].cpu(), call.top_k_weights[sel].float().cpu()
        if self._sim is None:
            self._sim = RouterSim(call.router, call.router_scoring, self.top_k)
        if not self._checked and logits.shape[0]:
            self._check_router(logits, idx, w)
            self._checked = True
        self._experts = call.experts  # kept until decide(): G needs the experts' weights
        # where and in what dtype the experts run: taken from their input, because an expert-chunked
        # (or quantized) experts module holds no ordinary parameters to ask
        self._compute = (call.moe_input.device, call.moe_input.dtype)
        keys = torch.rand(x.shape[0], generator=self.gen)
        x = x.to("cpu")
        self._x = x if self._x is None else torch.cat([self._x, x])
        self._keys = torch.cat([self._keys, keys])
        self._logits, self._idx, self._w = torch.cat([self._logits, logits]), torch.cat([self._idx, idx]), torch.cat([self._w, w])
        if self._keys.numel() > self.max_tokens:
            keep = self._keys.topk(self.max_tokens, largest=False).indices.sort().values
            self._keys, self._x = self._keys[keep], self._x[keep]
            self._logits, self._idx, self._w = self._logits[keep], self._idx[keep], self._w[keep]
        self._gram = None

    def _check_router(self, logits, idx, w) -> None:
        n = min(256, logits.shape[0])
        if n == 0:
            return
        full = torch.ones(1, self.num_experts, dtype=torch.bool)
        i2, w2 = self._sim.route(logits[:n], full)
        a = torch.zeros(n, self.num_experts).scatter_(1, idx[:n], w[:n])
        b = torch.zeros(n, self.num_experts).scatter_(1, i2[0], w2[0])
        ok = (a - b).abs().amax(-1) <= 1e-2 * a.abs().amax(-1).clamp_min(1e-6)  # bf16 routers round weights
        if float(ok.float().mean()) < 0.99:
            raise ConfigError(f"--method reconstruction: cannot reproduce this model's router ({self._sim.kind} simulation "
                              f"matches {float(ok.float().mean()):.0%} of tokens); use another --method")

    # ---- G and the loss ------------------------------------------------------------------
    @torch.no_grad()
    def _build_gram(self) -> None:
        if self._gram is not None or self._x is None:
            return
        experts, x = self._experts, self._x
        n, h = x.shape
        e = self.num_experts
        dev, dtype = self._compute
        block = max(1, (256 * 2**20) // (4 * e * h))  # tokens per block: all experts' outputs <= 256 MB
        gram = torch.empty(n, e, e)
        for s in range(0, n, block):
            xb = x[s:s + block].to(dev, dtype)
            f = torch.stack([expert_output(experts, xb, j).float() for j in range(e)], dim=1)  # (b, E, H)
            gram[s:s + block] = torch.bmm(f, f.transpose(1, 2)).cpu()
        self._gram = gram

    def losses(self, keep: torch.Tensor) -> torch.Tensor:
        """Reconstruction loss Σ_t ‖Z_t − Z_t^K‖² for each keep mask in ``keep`` (C, E) -> (C,) float64."""
        self._build_gram()
        n, e, k = self._idx.shape[0], self.num_experts, self.top_k
        out = torch.empty(keep.shape[0], dtype=torch.float64)
        chunk = max(1, (2**24) // max(1, n * e))
        gflat = self._gram.view(n, e * e)
        for s in range(0, keep.shape[0], chunk):
            kc = keep[s:s + chunk]
            idx2, w2 = self._sim.route(self._logits, kc)  # (C, N, k)
            c = kc.shape[0]
            slots = torch.cat([self._idx.expand(c, n, k), idx2], dim=-1)  # (C, N, 2k)
            coef = torch.cat([self._w.expand(c, n, k), -w2], dim=-1)  # (C, N, 2k)
            lin = (slots.unsqueeze(-1) * e + slots.unsqueeze(-2)).reshape(c, n, -1)  # (C, N, 4k²)
            gs = gflat.unsqueeze(0).expand(c, n, e * e).gather(2, lin).view(c, n, 2 * k, 2 * k)
            err = torch.einsum("cni,cnij,cnj->cn", coef, gs, coef)
            out[s:s + chunk] = err.double().clamp_min(0).sum(-1)
        return out

    # ---- search ----------------------------------------------------------------------------
    def decide(self, layer_idx, keep_n, *, protected, groups, tensors, adapter) -> LayerPlan:
        if self._x is None:
            raise ConfigError(f"layer {layer_idx}: no calibration token reached the MoE block; cannot search")
        e = self.num_experts
        groups = max(1, groups)
        per, k_per = e // groups, keep_n // groups
        prot = set(protected)
        free = [[j for j in range(g * per, (g + 1) * per) if j not in prot] for g in range(groups)]
        need = [k_per - sum(1 for j in range(g * per, (g + 1) * per) if j in prot) for g in range(groups)]
        if any(nd < 0 for nd in need):  # more protected experts than slots: keep the first ones
            log.warning("layer %d: more protected experts than kept slots in a group; keeping the lowest ids", layer_idx)
            return LayerPlan(sorted(sorted(prot)[:keep_n]))
        n_cand = math.prod(math.comb(len(f), nd) for f, nd in zip(free, need))
        base = torch.zeros(e, dtype=torch.bool)
        base[list(prot)] = True
        if n_cand <= self.exhaustive_limit:
            masks = []
            for combo in itertools.product(*[itertools.combinations(f, nd) for f, nd in zip(free, need)]):
                m = base.clone()
                m[[j for part in combo for j in part]] = True
                masks.append(m)
            keep_masks = torch.stack(masks)
            loss = self.losses(keep_masks)
            best = int(torch.argmin(loss))
            keep, best_loss, search = keep_masks[best], float(loss[best]), "exhaustive"
        else:
            keep, best_loss = self._beam(e, groups, per, k_per, prot)
            search = f"beam({self.beam})"
        total = float(self._total_energy())
        self._state = {"search": search, "candidates": n_cand if search == "exhaustive" else None,
                       "sample_tokens": int(self._idx.shape[0]), "loss": best_loss,
                       "relative_error": best_loss / total if total > 0 else None}
        plan = LayerPlan(sorted(int(j) for j in torch.nonzero(keep).reshape(-1)))
        self.scores()  # single-drop losses for the report, while G is still here
        self.release()
        return plan

    def _beam(self, e, groups, per, k_per, prot) -> tuple[torch.Tensor, float]:
        beams = [torch.ones(e, dtype=torch.bool)]
        loss = 0.0
        for _ in range(e - k_per * groups):
            cands, seen = [], set()
            for b in beams:
                kept_per_group = b.view(groups, per).sum(-1)
                for j in range(e):
                    if not b[j] or j in prot or kept_per_group[j // per] <= k_per:
                        continue
                    m = b.clone()
                    m[j] = False
                    key = m.numpy().tobytes()
                    if key not in seen:
                        seen.add(key)
                        cands.append(m)
            masks = torch.stack(cands)
            losses = self.losses(masks)
            order = torch.argsort(losses)[:self.beam]
            beams = [masks[i] for i in order]
            loss = float(losses[order[0]])
        return beams[0], loss

    def _total_energy(self) -> torch.Tensor:
        """Σ_t ‖Z_t‖²: the scale the loss is relative to."""
        n, e, k = self._idx.shape[0], self.num_experts, self.top_k
        lin = (self._idx.unsqueeze(-1) * e + self._idx.unsqueeze(-2)).reshape(n, -1)
        gs = self._gram.view(n, e * e).gather(1, lin).view(n, k, k)
        return torch.einsum("ni,nij,nj->n", self._w, gs, self._w).double().sum()

    def release(self) -> None:
        """Drop the token sample, G and the reference to the layer's experts (its weights)."""
        self._x, self._gram, self._experts = None, None, None
        self._logits = self._idx = self._w = self._keys = None

    def scores(self) -> torch.Tensor | None:
        """Loss of dropping each expert alone (higher = more important)."""
        if self._single is None and self._x is not None:
            masks = ~torch.eye(self.num_experts, dtype=torch.bool)
            self._single = self.losses(masks)
        return self._single

    def state(self) -> dict:
        return dict(self._state)

