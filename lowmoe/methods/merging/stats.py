"""Per-layer statistics the merging methods need, and access to one layer's expert weights.

Sits between the streamed pass and a merging method's ``decide``: ``LayerStats`` observes every
MoE forward call of one layer on the calibration tokens (``MoeCall``) and keeps only small
accumulators (float64, on the calls' device until read), so memory does not grow with the
calibration size:

* routing counts and gate mass per expert -> usage frequency f_e = #assignments / (T·k);
* the Gram matrix of router-logit columns G = Σ_t l_t l_tᵀ (E, E) -> the cosine of two experts'
  logit columns over tokens (M-SMoE's default similarity, Li et al. 2024, arXiv 2310.01334);
* every expert's output on **all** counted tokens, not only the ones routed to it (HC-SMoE, Chen
  et al. 2025, arXiv 2410.08589): their sum (E, H) -> mean output per expert, and optionally their
  token-wise Gram Σ_t <f_i(x_t), f_j(x_t)> (E, E) -> output cosine / distance between experts;
* optionally the REAP-style saliency Σ_{t routed to e} g_e(t)·‖f_e(x_t)‖ / T.

All-token expert outputs cost E/k times the layer's normal expert compute; ``max_tokens`` caps the
tokens they use per layer. Domains are pooled (merging methods take no per-domain decisions).

Weights are read in one canonical float32 form per expert, whatever the on-disk layout:
gate (I, H), up (I, H), down (H, I), plus GPT-OSS's biases gate_bias (I), up_bias (I),
down_bias (H). GPT-OSS stores experts fused: gate_up_proj (E, H, 2I) with gate and up interleaved
on the last dim (gate = [..., ::2], up = [..., 1::2]), down_proj (E, I, H).
"""

from __future__ import annotations

import torch

from ...engine.hf import MoeCall
from ...engine.lazy import decoded, entry, entry_dtype, entry_rows

PROJS = ("gate", "up", "down")
# Canonical name -> (which dim of the canonical tensor indexes intermediate neurons).
NEURON_DIM = {"gate": 0, "up": 0, "down": 1, "gate_bias": 0, "up_bias": 0}
# Bytes of float32 work buffers (token blocks of all-expert outputs, column chunks of weights).
BLOCK_BYTES = 256 * 2**20


# ---- weights -----------------------------------------------------------------------------------


def fused_base(adapter, layer_idx: int) -> str:
    """The key prefix of a fused layout's expert tensors (``...mlp.experts.``)."""
    return adapter.layer_prefix(layer_idx) + adapter.moe_prefix + "experts."


# ``tensors`` below is a layer's on-disk tensors: a dict of tensors or stored entries, or a
# ``lazy.LazyLayer`` (``lazy.entry``...): the accessors read one expert, or one row of a fused tensor.


def _row(value, e: int) -> torch.Tensor:
    """Expert ``e`` of a fused tensor or of its stored entry (only its bytes read)."""
    return entry_rows(value, [e])[0]


def expert_weights(adapter, layer_idx: int, tensors: dict[str, torch.Tensor], e: int) -> dict[str, torch.Tensor]:
    """Expert ``e`` of layer ``layer_idx`` in canonical float32 form (see module docstring)."""
    if adapter.expert_layout == "per_expert":
        g, u, d = (decoded(entry(tensors, k)).float() for k in adapter.expert_keys(layer_idx, e))
        return {"gate": g, "up": u, "down": d}
    base = fused_base(adapter, layer_idx)
    if not has_expert(adapter, layer_idx, tensors, e):
        raise IndexError(f"expert {e} is not one of layer {layer_idx}'s")
    gu = _row(entry(tensors, base + "gate_up_proj"), e).float()  # (H, 2I)
    out = {"gate": gu[:, ::2].T, "up": gu[:, 1::2].T, "down": _row(entry(tensors, base + "down_proj"), e).float().T}
    if base + "gate_up_proj_bias" in tensors:
        b = _row(entry(tensors, base + "gate_up_proj_bias"), e).float()  # (2I,)
        out["gate_bias"], out["up_bias"] = b[::2], b[1::2]
    if base + "down_proj_bias" in tensors:
        out["down_bias"] = _row(entry(tensors, base + "down_proj_bias"), e).float()
    return out


def has_expert(adapter, layer_idx: int, tensors, e: int) -> bool:
    """Whether expert ``e`` is one of the layer's (nothing read)."""
    if adapter.expert_layout == "per_expert":
        return e >= 0 and all(k in tensors for k in adapter.expert_keys(layer_idx, e))
    return 0 <= e < entry(tensors, fused_base(adapter, layer_idx) + "gate_up_proj").shape[0]


def hidden_size(adapter, layer_idx: int, tensors) -> int:
    """The experts' hidden size H, from a stored shape (nothing read)."""
    if adapter.expert_layout == "per_expert":
        return entry(tensors, adapter.expert_keys(layer_idx, 0)[0]).shape[1]  # gate (I, H)
    return entry(tensors, fused_base(adapter, layer_idx) + "gate_up_proj").shape[1]  # (E, H, 2I)


def num_neurons(adapter, layer_idx: int, tensors) -> int:
    """The experts' intermediate size I, from a stored shape (nothing read)."""
    if adapter.expert_layout == "per_expert":
        return entry(tensors, adapter.expert_keys(layer_idx, 0)[0]).shape[0]  # gate (I, H)
    return entry(tensors, fused_base(adapter, layer_idx) + "gate_up_proj").shape[-1] // 2  # (E, H, 2I)


def set_expert_weights(adapter, layer_idx: int, tensors: dict[str, torch.Tensor], slot: int,
                       w: dict[str, torch.Tensor], dtype: torch.dtype, cloned: set[str]) -> None:
    """Store canonical weights ``w`` as expert ``slot`` of ``tensors`` (on-disk keys; the dict is
    updated in place). Per-expert tensors are replaced by new ones. A fused tensor is cloned the
    first time it is written (its key is then added to ``cloned``): ``tensors`` may share storage
    with the input checkpoint's tensors, which must never change."""
    if adapter.expert_layout == "per_expert":
        for key, name in zip(adapter.expert_keys(layer_idx, slot), PROJS):
            tensors[key] = w[name].to(dtype).contiguous()
        return
    base = fused_base(adapter, layer_idx)

    def own(key):
        if key not in cloned:
            v = tensors[key]  # a tensor (maybe the input's storage: cloned) or a stored entry (read)
            tensors[key] = v.clone() if isinstance(v, torch.Tensor) else v.read()
            cloned.add(key)
        return tensors[key]

    gu = own(base + "gate_up_proj")
    gu[slot, :, ::2] = w["gate"].T.to(gu.dtype)
    gu[slot, :, 1::2] = w["up"].T.to(gu.dtype)
    dn = own(base + "down_proj")
    dn[slot] = w["down"].T.to(dn.dtype)
    if "gate_bias" in w:
        b = own(base + "gate_up_proj_bias")
        b[slot, ::2] = w["gate_bias"].to(b.dtype)
        b[slot, 1::2] = w["up_bias"].to(b.dtype)
    if "down_bias" in w:
        b = own(base + "down_proj_bias")
        b[slot] = w["down_bias"].to(b.dtype)


def expert_dtype(adapter, layer_idx: int, tensors: dict[str, torch.Tensor]) -> torch.dtype:
    key = adapter.expert_keys(layer_idx, 0)[0] if adapter.expert_layout == "per_expert" else fused_base(adapter, layer_idx) + "gate_up_proj"
    return entry_dtype(entry(tensors, key))


def permute_neurons(w: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same expert with intermediate neuron ``perm[m]`` moved to position m (function unchanged)."""
    return {k: (t.index_select(NEURON_DIM[k], perm) if k in NEURON_DIM else t) for k, t in w.items()}


def neuron_features(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """One row per intermediate neuron: [gate row | up row | down column] (I, 3H) float32."""
    return torch.cat([w["gate"], w["up"], w["down"].T], dim=1)


def expert_features(adapter, layer_idx: int, tensors, e: int) -> torch.Tensor:
    """``neuron_features(expert_weights(...))`` of expert ``e`` (the same values), filled one stored
    tensor (a fused layout's: one row) at a time: no float32 copy of the expert besides the result."""
    if adapter.expert_layout == "per_expert":
        g, u, d = (entry(tensors, k) for k in adapter.expert_keys(layer_idx, e))
        gate = decoded(g)  # (I, H)
        n, h = gate.shape
        out = torch.empty(n, 3 * h, dtype=torch.float32)
        out[:, :h] = gate
        del gate
        out[:, h:2 * h] = decoded(u)
        out[:, 2 * h:] = decoded(d).T  # down (H, I): its columns
        return out
    base = fused_base(adapter, layer_idx)
    if not has_expert(adapter, layer_idx, tensors, e):
        raise IndexError(f"expert {e} is not one of layer {layer_idx}'s")
    gu = _row(entry(tensors, base + "gate_up_proj"), e)  # (H, 2I): gate and up interleaved
    h, n = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(n, 3 * h, dtype=torch.float32)
    out[:, :h] = gu[:, ::2].T
    out[:, h:2 * h] = gu[:, 1::2].T
    del gu
    out[:, 2 * h:] = _row(entry(tensors, base + "down_proj"), e)  # (I, H)
    return out


def weight_gram(adapter, layer_idx: int, tensors: dict[str, torch.Tensor], num_experts: int) -> torch.Tensor:
    """Gram matrix of the experts' flattened weights, every expert tensor of the layer (GPT-OSS
    biases included) (E, E) float64. Works on the stored tensors one projection (or fused tensor) at a
    time, in column chunks, so only that projection and a bounded float32 buffer exist at once
    (``tensors`` may be a ``lazy.LazyLayer``, which reads an expert tensor when it is asked for; a dot
    product does not depend on the element order, so the on-disk layout serves as is)."""
    gram = torch.zeros(num_experts, num_experts, dtype=torch.float64)

    def flats_by_proj():
        if adapter.expert_layout == "per_expert":
            for p in range(3):
                yield [tensors[adapter.expert_keys(layer_idx, e)[p]].reshape(-1) for e in range(num_experts)]
        else:
            for k in adapter.fused_keys(layer_idx):
                if k in tensors:
                    yield list(tensors[k].reshape(num_experts, -1))

    step = max(1, BLOCK_BYTES // (4 * num_experts))
    for flats in flats_by_proj():
        for c0 in range(0, flats[0].numel(), step):
            block = torch.stack([f[c0:c0 + step] for f in flats]).float()  # (E, chunk)
            gram += (block @ block.T).double()
        flats = block = None  # let go of this projection before the next one is read
    return gram


def gram_to_cosine(gram: torch.Tensor) -> torch.Tensor:
    """cos_ij = G_ij / sqrt(G_ii G_jj) (E, E); an all-zero column gets similarity 0 to the others."""
    d = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / (d[:, None] * d[None, :])


def gram_to_sq_distance(gram: torch.Tensor) -> torch.Tensor:
    """‖a_i − a_j‖² = G_ii + G_jj − 2 G_ij (E, E), clamped at 0."""
    d = gram.diagonal()
    return (d[:, None] + d[None, :] - 2 * gram).clamp_min(0)


# ---- calibration statistics ---------------------------------------------------------------------


@torch.no_grad()
def expert_output(experts: torch.nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """Unweighted f_e(x) (T, H) through transformers' own experts module. Calls the class's forward
    directly: this runs inside the probe's forward hook on the same module, and going through
    ``__call__`` would fire that hook again (and any patched instance forward)."""
    idx = torch.full((x.shape[0], 1), e, dtype=torch.long, device=x.device)
    w = torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device)
    return type(experts).forward(experts, x, idx, w)


class LayerStats:
    """Accumulates one layer's statistics over every MoE call (see module docstring).

    router_gram:  keep Σ_t l_t l_tᵀ of router logits
    outputs:      None, "mean" (Σ_t f_e(x_t)) or "gram" (also Σ_t <f_i(x_t), f_j(x_t)>), all tokens
    saliency:     keep Σ_{t routed to e} g_e(t)·‖f_e(x_t)‖ (REAP-style importance)
    max_tokens:   cap on tokens used for all-token outputs (None: every counted token)

    The sums live on the calls' device and reach the host once, when they are first read
    (``counts``, ``tokens``, ``frequency()``...), after the layer's last call. The routing statistics
    (counts, gate mass, token count, router-logit Gram: all that frequency-weighted merging and DERN
    decide from) and the saliency (C-Prune's importance) are observed without waiting for the
    device, as the scorers are (``scoring.base.Scorer``): tokens that do not count go to a discard
    row ``E`` instead of being selected out, and a padding token's logits are replaced by zeros, not
    multiplied by a mask (a NaN computed there stays out). The saliency takes each routed expert's
    output from the probe (``needs_expert_outputs``: the block's own expert work yields it, as for
    REAP); a call without them (a bare ``MoeCall``) runs the experts on the counted rows instead.
    Only all-token outputs select the counted rows (one wait per call): they run every expert on
    those rows, and running them on padding too could cost many times more under ``--answer-only``.
    """

    def __init__(self, num_experts: int, top_k: int, *, router_gram: bool = False, outputs: str | None = None,
                 saliency: bool = False, max_tokens: int | None = None):
        self.num_experts, self.top_k = num_experts, top_k
        # saliency comes from the slot outputs the probe computes in the block's own expert work
        self.needs_expert_outputs = saliency
        self.want_router_gram, self.want_outputs, self.want_saliency = router_gram, outputs, saliency
        self.max_tokens = max_tokens
        self.output_tokens = 0  # host count: the cap needs it before the experts run
        # On the calls' device while observing (``_acc``), on the host once read (``_host``):
        # counts (E+1,) and gate_mass (E+1,), row E the discard row; tokens () int64; router_gram
        # (E, E); output_sum (E, H); output_gram (E, E); saliency_sum (E+1,). Absent keys: not kept.
        self._acc: dict[str, torch.Tensor] = {}
        self._host: dict[str, torch.Tensor] | None = None

    def _zeros(self, name: str, *shape: int, device, dtype=torch.float64) -> torch.Tensor:
        if name not in self._acc:
            self._acc[name] = torch.zeros(shape, dtype=dtype, device=device)
        return self._acc[name]

    @torch.no_grad()
    def observe(self, call: MoeCall) -> None:
        idx, w = call.top_k_index, call.top_k_weights  # (T, k)
        if idx.shape[0] == 0:
            return
        self._host = None  # read before: the next read sums this call in too
        E, dev = self.num_experts, idx.device
        mask = None if call.token_mask is None else call.token_mask.to(dev)
        counts, gate_mass = self._zeros("counts", E + 1, device=dev), self._zeros("gate_mass", E + 1, device=dev)
        rows = (idx if mask is None else torch.where(mask[:, None], idx, E)).reshape(-1)
        counts.index_put_((rows,), torch.ones(rows.numel(), dtype=torch.float64, device=dev), accumulate=True)
        gate_mass.index_put_((rows,), w.reshape(-1).double(), accumulate=True)
        tokens = self._zeros("tokens", device=dev, dtype=torch.long)
        tokens += idx.shape[0] if mask is None else mask.sum()
        if self.want_router_gram:
            lg = call.router_logits.double()  # (T, E)
            if mask is not None:
                lg = torch.where(mask[:, None], lg, 0.0)
            self._zeros("router_gram", E, E, device=dev).add_(lg.T @ lg)
        # saliency from each slot's own output, when the probe computed them (``needs_expert_outputs``)
        slot_saliency = self.want_saliency and call.expert_outputs is not None
        if slot_saliency:
            norms = call.expert_outputs.float().norm(dim=-1)  # (T, k): ‖f_{idx[t,j]}(x_t)‖
            self._zeros("saliency_sum", E + 1, device=dev).index_put_(
                (rows,), (norms * w.float()).reshape(-1).double(), accumulate=True)
        run_saliency = self.want_saliency and not slot_saliency  # a bare call: run the experts for it
        if not (self.want_outputs or run_saliency):
            return
        sel = slice(None) if mask is None else mask
        idx, w = idx[sel], w[sel]  # (n, k)
        x = call.moe_input.reshape(-1, call.moe_input.shape[-1])[sel]  # (n, H)
        n = idx.shape[0]
        if n == 0:
            return
        if self.want_outputs and (self.max_tokens is None or self.output_tokens < self.max_tokens):
            take = n if self.max_tokens is None else min(n, self.max_tokens - self.output_tokens)
            self._all_token_outputs(call.experts, x[:take], idx[:take], w[:take], saliency=run_saliency)
            if run_saliency and take < n:
                self._routed_saliency(call.experts, x[take:], idx[take:], w[take:])
        elif run_saliency:
            self._routed_saliency(call.experts, x, idx, w)

    def _all_token_outputs(self, experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, saliency: bool) -> None:
        E, H, dev = self.num_experts, x.shape[1], x.device
        output_sum = self._zeros("output_sum", E, H, device=dev)
        output_gram = self._zeros("output_gram", E, E, device=dev) if self.want_outputs == "gram" else None
        saliency_sum = self._zeros("saliency_sum", E + 1, device=dev) if saliency else None
        self.output_tokens += x.shape[0]
        step = max(1, BLOCK_BYTES // (4 * E * H))
        for t0 in range(0, x.shape[0], step):
            xb = x[t0:t0 + step]
            outs = torch.stack([expert_output(experts, xb, e).float() for e in range(E)])  # (E, b, H)
            output_sum += outs.sum(1).double()
            if output_gram is not None:
                flat = outs.reshape(E, -1)
                output_gram += (flat @ flat.T).double()
            if saliency_sum is not None:
                norms = outs.norm(dim=-1)  # (E, b)
                ib, wb = idx[t0:t0 + step], w[t0:t0 + step]  # (b, k)
                routed = norms.T.gather(1, ib)  # (b, k): ‖f_{idx[t,j]}(x_t)‖
                saliency_sum.index_put_((ib.reshape(-1),), (routed * wb).reshape(-1).double(), accumulate=True)

    def _routed_saliency(self, experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
        saliency_sum = self._zeros("saliency_sum", self.num_experts + 1, device=x.device)
        for e in range(self.num_experts):
            t, j = (idx == e).nonzero(as_tuple=True)
            if t.numel():
                norms = expert_output(experts, x[t], e).float().norm(dim=-1)  # (m,)
                saliency_sum[e] += (norms * w[t, j]).sum().double()

    # ---- the totals on the host (reading them waits for the device once) ----------------------
    def _settled(self) -> dict[str, torch.Tensor]:
        if self._host is None:
            self._host = {k: v.cpu() for k, v in self._acc.items()}
        return self._host

    def _total(self, name: str, *shape: int) -> torch.Tensor:
        t = self._settled().get(name)
        return torch.zeros(shape, dtype=torch.float64) if t is None else t

    @property
    def counts(self) -> torch.Tensor:
        """Top-k assignments per expert over the counted tokens (E,) float64."""
        return self._total("counts", self.num_experts + 1)[:self.num_experts]

    @property
    def gate_mass(self) -> torch.Tensor:
        """Σ of the routing weights each expert got over the counted tokens (E,) float64."""
        return self._total("gate_mass", self.num_experts + 1)[:self.num_experts]

    @property
    def tokens(self) -> int:
        """Counted tokens seen."""
        return int(self._total("tokens"))

    @property
    def router_gram(self) -> torch.Tensor | None:
        if not self.want_router_gram:
            return None
        return self._total("router_gram", self.num_experts, self.num_experts)

    @property
    def output_sum(self) -> torch.Tensor | None:
        return self._settled().get("output_sum")

    @property
    def output_gram(self) -> torch.Tensor | None:
        if self.want_outputs != "gram":
            return None
        return self._total("output_gram", self.num_experts, self.num_experts)

    @property
    def saliency_sum(self) -> torch.Tensor:
        return self._total("saliency_sum", self.num_experts + 1)[:self.num_experts]

    # ---- reading ------------------------------------------------------------------------------
    def frequency(self) -> torch.Tensor:
        """f_e: share of top-k assignments (E,), sums to 1 over experts."""
        return self.counts / max(1.0, self.tokens * self.top_k)

    def router_similarity(self) -> torch.Tensor:
        """M-SMoE's router-logit similarity (cos + 1) / 2 of logit columns over tokens (E, E)."""
        if self.router_gram is None:
            raise RuntimeError("LayerStats was built without router_gram")
        return (gram_to_cosine(self.router_gram) + 1) / 2

    def mean_outputs(self) -> torch.Tensor:
        """Mean of f_e(x) over every counted token (E, H) float64."""
        if self.output_sum is None:
            raise RuntimeError("no expert outputs were collected (no tokens, or outputs=None)")
        return self.output_sum / max(1, self.output_tokens)

    def output_similarity(self) -> torch.Tensor:
        """Token-wise output cosine Σ_t<f_i,f_j> / sqrt(Σ‖f_i‖² Σ‖f_j‖²) (E, E)."""
        if self.output_gram is None:
            raise RuntimeError("LayerStats was built without outputs='gram'")
        return gram_to_cosine(self.output_gram)

    def saliency(self) -> torch.Tensor:
        return self.saliency_sum / max(1, self.tokens)
