"""Super-expert protection ("Super Experts" in MoE LLMs,
arXiv 2507.23279).

Super experts produce rare, extreme outliers in their down_proj output; those drive the massive
activations and attention sinks of the whole model, so pruning even a handful of them breaks it.
With m_{l,e} = max over tokens routed to expert e of layer l of |f_e(x)| (f_e = the expert's
down_proj output, unweighted), expert (l, e) is a super expert iff

    m_{l,e} > P99.5({m}) over all experts of all MoE layers   and   m_{l,e} > max({m}) / 10

(the paper's profiler thresholds, also REAP's ``--perserve_outliers``; here over every MoE layer).
Super experts are never dropped, whatever the method.

The thresholds are model-wide but lowmoe decides layer by layer, so a prune run profiles first:
``profile`` streams a few calibration sequences (default 4) through the *original* model, layer
by layer in memory, and records m for every expert. Its cost is one extra read of the checkpoint
plus the forward pass of those few sequences (≈ n_seqs / n_calibration of the scoring compute);
super experts are a property of the weights, independent of the data (the paper), so a few
sequences suffice. ``lowmoe score`` needs no pre-pass: it takes m from the scoring pass itself
and applies the thresholds after the last layer (``MaximaObserver``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ...engine.hf import MoeCall, MoeProbe, run_layer
from ...engine.progress import progress as progress_bar

log = logging.getLogger(__name__)

PERCENTILE = 99.5
GLOBAL_FRACTION = 0.1


def max_abs_per_expert(call: MoeCall, num_experts: int) -> torch.Tensor:
    """(E,) float64: max |f_e(x)| over this call's tokens routed to each expert (0 if none)."""
    out = call.expert_outputs  # (T, k, H)
    slot_max = out.detach().float().abs().amax(dim=-1)  # (T, k)
    m = torch.zeros(num_experts, dtype=torch.float32, device=slot_max.device)
    m.scatter_reduce_(0, call.top_k_index.reshape(-1).to(slot_max.device), slot_max.reshape(-1), reduce="amax")
    return m.double().cpu()


def find_super_experts(maxima: dict[int, torch.Tensor], percentile: float = PERCENTILE,
                       global_fraction: float = GLOBAL_FRACTION) -> tuple[dict[int, set[int]], dict]:
    """Apply the two thresholds to every expert's max |down_proj output|.
    Returns ({layer_idx: {expert_idx}}, summary for the report)."""
    if not maxima:
        return {}, {}
    layers = sorted(maxima)
    allm = torch.cat([maxima[L].double().reshape(-1) for L in layers])
    q = float(torch.quantile(allm, percentile / 100.0))
    g = float(allm.max())
    cut = max(q, g * global_fraction)
    found = {L: {int(e) for e in torch.nonzero(maxima[L] > cut).reshape(-1)} for L in layers}
    found = {L: s for L, s in found.items() if s}
    summary = {"percentile": percentile, "percentile_value": q, "global_max": g, "global_fraction": global_fraction,
               "threshold": cut,
               "super_experts": [{"layer": L, "expert": e, "max_abs_output": float(maxima[L][e])}
                                 for L in sorted(found) for e in sorted(found[L])]}
    return found, summary


@dataclass
class SuperExpertGuard:
    """Protection observer with precomputed super experts (from ``profile``)."""

    found: dict[int, set[int]]
    summary: dict = field(default_factory=dict)
    needs_expert_outputs: bool = False

    def observe(self, call: MoeCall) -> None:
        pass

    def protected(self, layer_idx: int) -> set[int]:
        return set(self.found.get(layer_idx, ()))


class MaximaObserver:
    """Records m_{l,e} during a streamed pass; ``protected(l)`` applies the thresholds to the layers
    seen so far (exact once every layer has passed -- what ``lowmoe score`` uses -- and a running
    approximation when a decision is needed earlier)."""

    needs_expert_outputs = True

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.maxima: dict[int, torch.Tensor] = {}
        self._current = torch.zeros(num_experts, dtype=torch.float64)

    def observe(self, call: MoeCall) -> None:
        self._current = torch.maximum(self._current, max_abs_per_expert(call, self.num_experts))

    __call__ = observe  # usable directly as a MoeProbe callback

    def commit(self, layer_idx: int) -> None:
        self.maxima[layer_idx] = self._current
        self._current = torch.zeros(self.num_experts, dtype=torch.float64)

    def protected(self, layer_idx: int) -> set[int]:
        if layer_idx not in self.maxima:
            self.commit(layer_idx)
        found, _ = find_super_experts(self.maxima)
        return set(found.get(layer_idx, ()))

    def result(self) -> tuple[dict[int, set[int]], dict]:
        return find_super_experts(self.maxima)


@torch.no_grad()
def profile(stream, n_seqs: int = 4, progress: bool = True) -> SuperExpertGuard:
    """Stream the first ``n_seqs`` calibration sequences through the original model, one layer at
    a time (hidden states kept in memory: n_seqs × seq_len × hidden), recording every expert's
    max |down_proj output|; returns the guard holding the super experts."""
    ck, skel, adapter = stream.ck, stream.skel, stream.ck.adapter
    ids = stream.tokens.input_ids[:n_seqs]
    key = "model.embed_tokens.weight"
    w = ck.read([key])[key].to(stream.device, stream.dtype)
    h = torch.nn.functional.embedding(ids.to(stream.device), w)  # (n, S, H)
    del w
    inputs = stream.inputs_for(h)
    moe = set(ck.moe_layers())
    obs = MaximaObserver(ck.num_experts)
    reader = stream.layers(0, moe, lazy=True)  # layer L+1 is read while L computes; experts in groups
    layers = progress_bar(reader, len(reader), "super-expert profile", progress)
    for layer_idx, data in layers:
        is_moe = layer_idx in moe
        module = stream.materialize(layer_idx, data.runtime, experts=data.experts)  # experts read in groups
        del data
        if is_moe:
            with MoeProbe(adapter, module, obs):
                h = run_layer(skel, module, layer_idx, h, inputs)
            obs.commit(layer_idx)
        else:
            h = run_layer(skel, module, layer_idx, h, inputs)
        del module
    found, summary = obs.result()
    summary["profile_sequences"] = int(ids.shape[0])
    if found:
        log.info("super experts (never dropped): %s", ", ".join(f"layer {L} expert {e}" for L in sorted(found) for e in sorted(found[L])))
    else:
        log.info("no super experts found (threshold %.4g)", summary.get("threshold", float("nan")))
    return SuperExpertGuard(found, summary)
